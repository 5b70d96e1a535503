//! sd_notify towards whoever started us (systemd, with `Type=notify` or
//! `Type=notify-reload`): READY, RELOADING with MONOTONIC_USEC, STOPPING
//! and STATUS, as datagrams to our own `$NOTIFY_SOCKET`.
//!
//! The socket is connected, so that poll reports it writable only when
//! the receiver's queue has room. A message that meets a full queue waits
//! in ours, in order, and goes out when the event loop sees it writable:
//! nothing is dropped for a busy systemd (a lost READY=1 would get the
//! service killed at its start timeout) and the loop never blocks on it.
//! Only a receiver that reads nothing while 64 messages pile up loses
//! some, the oldest first (see `send`).
//! A message the socket refuses outright is a warning, never fatal; a
//! receiver that went away and came back at the same address (or was not
//! there yet at start) is connected to again at the next message.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

/// Messages waiting for room at most (see `send` for what makes room).
const MAX_PENDING: usize = 64;

pub struct Upstream {
    fd: std::os::fd::OwnedFd,
    addr: SocketAddrUnix,
    pending: RefCell<VecDeque<Vec<u8>>>,
    /// A drop was warned about; quiet until the queue empties again.
    dropping: std::cell::Cell<bool>,
}

impl Upstream {
    /// From `$NOTIFY_SOCKET`, which the caller removes from what workers
    /// inherit. `@name` is an abstract address.
    pub fn from_env() -> Option<Upstream> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddrUnix::new_abstract_name(name),
            None if bytes.starts_with(b"/") => SocketAddrUnix::new(bytes),
            None => return None,
        }
        .ok()?;
        let fd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .ok()?;
        // Not there yet is no reason to give up: each send that finds the
        // socket unconnected connects again (see `send_one`).
        if let Err(e) = net::connect(&fd, &addr) {
            crate::warn!(
                "unable to reach our own NOTIFY_SOCKET {}: {}",
                crate::log::printable(&path.to_string_lossy()),
                crate::error::os_text(e)
            );
        }
        Some(Upstream {
            fd,
            addr,
            pending: RefCell::new(VecDeque::new()),
            dropping: Default::default(),
        })
    }

    /// Send `msg`, or queue it behind those still waiting for room. A full
    /// queue makes room by dropping its oldest message that only says
    /// STATUS= (a newer one follows), or else its oldest message, with a
    /// warning: the newest state (READY=1 after a RELOADING=1, STOPPING=1)
    /// is the one the receiver must end up with.
    pub fn send(&self, msg: &str) {
        let mut pending = self.pending.borrow_mut();
        if pending.len() >= MAX_PENDING {
            let status_only = pending.iter().position(|m| m.starts_with(b"STATUS="));
            let dropped = pending.remove(status_only.unwrap_or(0));
            if let (None, Some(old), false) = (status_only, dropped, self.dropping.get()) {
                self.dropping.set(true);
                crate::warn!(
                    "our own NOTIFY_SOCKET reads nothing ({MAX_PENDING} messages waiting); dropping the oldest, from {}",
                    first_line(&old)
                );
            }
        }
        pending.push_back(msg.as_bytes().to_vec());
        drop(pending);
        self.flush();
    }

    /// Send what waits, in order, until the receiver's queue is full.
    pub fn flush(&self) {
        let mut pending = self.pending.borrow_mut();
        while let Some(msg) = pending.front() {
            match self.send_one(msg) {
                Ok(()) => {}
                Err(Errno::AGAIN) => return,
                Err(e) => {
                    crate::warn!(
                        "unable to tell our own NOTIFY_SOCKET {}: {}",
                        first_line(msg),
                        crate::error::os_text(e)
                    );
                }
            }
            pending.pop_front();
        }
        self.dropping.set(false);
    }

    /// One datagram. A receiver that went away (systemd re-executing, a
    /// socket bound anew at the same path) leaves us unconnected: connect
    /// again and retry once.
    fn send_one(&self, msg: &[u8]) -> rustix::io::Result<()> {
        let send = || loop {
            match net::send(&self.fd, msg, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Err(Errno::INTR) => continue,
                other => return other.map(drop),
            }
        };
        match send() {
            Err(Errno::CONNREFUSED | Errno::NOTCONN | Errno::CONNRESET | Errno::DESTADDRREQ) => {
                net::connect(&self.fd, &self.addr)?;
                send()
            }
            other => other,
        }
    }

    /// The socket to watch for room, while messages wait.
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.pending.borrow().is_empty()).then(|| self.fd.as_fd())
    }

    /// `RELOADING=1` with the CLOCK_MONOTONIC time systemd asks for.
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=deploying"
        ));
    }
}

fn first_line(msg: &[u8]) -> String {
    let line = msg.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Upstream connected to a fresh non-blocking receiver at a temp
    /// path named after `name` (the caller removes the path).
    fn connected(
        name: &str,
    ) -> (
        Upstream,
        std::os::unix::net::UnixDatagram,
        std::path::PathBuf,
    ) {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let addr = SocketAddrUnix::new(path.as_path()).unwrap();
        let fd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        net::connect(&fd, &addr).unwrap();
        let up = Upstream {
            fd,
            addr,
            pending: RefCell::new(VecDeque::new()),
            dropping: Default::default(),
        };
        (up, rx, path)
    }

    /// A receiver that reads nothing for a while: whatever had to be
    /// dropped meanwhile, the last message it reads is the newest one.
    #[test]
    fn a_full_queue_keeps_the_newest_state() {
        let (up, rx, path) = connected("cf-upstream");
        // Far more than the receiver's queue and ours hold together.
        for i in 0..1000 {
            up.send(&format!("RELOADING=1\nX={i}"));
            up.send(&format!("READY=1\nX={i}"));
        }
        assert_eq!(up.pending.borrow().len(), MAX_PENDING);
        let mut last = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match rx.recv(&mut buf) {
                Ok(n) => last = buf[..n].to_vec(),
                Err(_) if up.poll_fd().is_some() => up.flush(),
                Err(_) => break,
            }
        }
        assert_eq!(String::from_utf8_lossy(&last), "READY=1\nX=999");
        std::fs::remove_file(&path).unwrap();
    }

    /// A full queue drops STATUS-only messages before anything else: a
    /// READY=1 waiting behind a flood of STATUS= updates still arrives.
    #[test]
    fn a_full_queue_drops_status_only_messages_first() {
        let (up, rx, path) = connected("cf-upstream-st");
        // Fill the receiver's queue, until messages wait in ours.
        let mut i = 0;
        while up.poll_fd().is_none() {
            up.send(&format!("STATUS=filler {i}"));
            i += 1;
            assert!(i < 100_000, "the receiver's queue never filled");
        }
        // The one that matters waits first in ours, then a flood.
        up.send("READY=1\nSTATUS=serving");
        for i in 0..1000 {
            up.send(&format!("STATUS=update {i}"));
        }
        assert_eq!(up.pending.borrow().len(), MAX_PENDING);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match rx.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) if up.poll_fd().is_some() => up.flush(),
                Err(_) => break,
            }
        }
        assert!(
            got.iter().any(|m| m == "READY=1\nSTATUS=serving"),
            "READY=1 was dropped for STATUS= updates"
        );
        assert_eq!(got.last().map(String::as_str), Some("STATUS=update 999"));
        std::fs::remove_file(&path).unwrap();
    }
}
