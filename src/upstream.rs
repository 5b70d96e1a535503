//! sd_notify towards whoever started us (systemd, with `Type=notify` or
//! `Type=notify-reload`): READY, RELOADING with MONOTONIC_USEC, STOPPING
//! and STATUS, as datagrams to our own `$NOTIFY_SOCKET`.
//!
//! The socket is connected, so that poll reports it writable only when
//! the receiver's queue has room. A message that meets a full queue waits
//! in ours, in order, and goes out when the event loop sees it writable:
//! nothing is dropped for a busy systemd (a lost READY=1 would get the
//! service killed at its start timeout) and the loop never blocks on it.
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
                "unable to reach our own NOTIFY_SOCKET {}: {e}",
                path.to_string_lossy()
            );
        }
        Some(Upstream {
            fd,
            addr,
            pending: RefCell::new(VecDeque::new()),
        })
    }

    /// Send `msg`, or queue it behind those still waiting for room. A full
    /// queue makes room by dropping its oldest message that only says
    /// STATUS= (a newer one follows); READY, RELOADING and STOPPING are
    /// dropped only when nothing else can go, with a warning.
    pub fn send(&self, msg: &str) {
        let mut pending = self.pending.borrow_mut();
        if pending.len() >= MAX_PENDING {
            match pending.iter().position(|m| m.starts_with(b"STATUS=")) {
                Some(i) => {
                    pending.remove(i);
                }
                None => {
                    crate::warn!(
                        "our own NOTIFY_SOCKET reads nothing ({MAX_PENDING} messages waiting); dropped {}",
                        first_line(msg.as_bytes())
                    );
                    return;
                }
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
                        "unable to tell our own NOTIFY_SOCKET {}: {e}",
                        first_line(msg)
                    );
                }
            }
            pending.pop_front();
        }
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
