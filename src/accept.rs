//! Accepting on the supervisor's own unix stream sockets (the control
//! socket, stream-mode notify sockets): non-blocking and close-on-exec,
//! interrupted or aborted connections skipped, running out of
//! descriptors reported so the caller can pause instead of spinning, and
//! the peer's credentials checked. What a connection is for is left to
//! the caller.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{self, SocketFlags};

/// How long to stop accepting after running out of descriptors: the
/// pending connection keeps the socket readable, so polling it sooner
/// would spin.
pub const PAUSE: Duration = Duration::from_millis(250);

pub enum Accepted {
    /// A connection from root or our own uid.
    Peer(OwnedFd),
    /// A connection from another uid, for the caller to refuse.
    Stranger { fd: OwnedFd, pid: i32, uid: u32 },
    /// Out of descriptors (or kernel memory): pause for [`PAUSE`].
    Exhausted(Errno),
    /// Nothing (more) to accept.
    None,
}

/// The next connection waiting on `listener`.
pub fn next(listener: &OwnedFd) -> Accepted {
    loop {
        let fd = match net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
            Ok(fd) => fd,
            // Gone before we took it, or a signal: the next one.
            Err(Errno::INTR | Errno::CONNABORTED) => continue,
            Err(e @ (Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)) => {
                return Accepted::Exhausted(e);
            }
            Err(_) => return Accepted::None,
        };
        match crate::sys::peer_cred(fd.as_fd()) {
            Ok((_, uid)) if allowed(uid) => return Accepted::Peer(fd),
            Ok((pid, uid)) => return Accepted::Stranger { fd, pid, uid },
            // Its credentials cannot be read: closed unheard.
            Err(_) => continue,
        }
    }
}

/// Root and the supervisor's own uid may talk to it.
pub fn allowed(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::getuid().as_raw()
}
