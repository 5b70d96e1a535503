//! sd_notify towards whoever started us (systemd, with `Type=notify` or
//! `Type=notify-reload`): READY, RELOADING with MONOTONIC_USEC, STOPPING
//! and STATUS, as datagrams to our own `$NOTIFY_SOCKET`. As libsystemd's
//! sd_notify, a send waits while systemd's queue is full (a dropped
//! READY=1 would get the service killed at its start timeout), but for
//! at most [`SEND_TIMEOUT`]: a stuck receiver cannot stall the loop for
//! long. A message still lost is a warning, never fatal.

use std::os::unix::ffi::OsStrExt;

use std::time::Duration;

use rustix::net::{
    self, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};

const SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Upstream {
    fd: std::os::fd::OwnedFd,
    addr: SocketAddrUnix,
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
            SocketFlags::CLOEXEC,
            None,
        )
        .ok()?;
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(SEND_TIMEOUT)).ok()?;
        Some(Upstream { fd, addr })
    }

    pub fn send(&self, msg: &str) {
        let sent = loop {
            match net::sendto(&self.fd, msg.as_bytes(), SendFlags::NOSIGNAL, &self.addr) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other,
            }
        };
        if let Err(e) = sent {
            let first = msg.lines().next().unwrap_or_default();
            crate::warn!("unable to tell our own NOTIFY_SOCKET {first}: {e}");
        }
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
