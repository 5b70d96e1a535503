//! The service's listening sockets: parse `--listen`, bind them (or adopt
//! the ones systemd passed us), and park them at fds 3, 4, … in the
//! supervisor itself, close-on-exec, so that a child only has to clear
//! the flag to hand them on at the numbers `LISTEN_FDS` promises. The
//! supervisor never accepts on them; it only keeps them open.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};

use crate::error::{Error, Result, os_message, os_text};
use crate::sys;

/// First fd handed to workers (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: RawFd = 3;

/// One `--listen` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: Option<String>,
    pub addr: Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// All addresses, dual-stack (`PORT`, `:PORT`).
    Any(u16),
    Tcp(SocketAddr),
    /// A path, or an abstract name when it starts with `@`.
    Unix(PathBuf),
    Fd(RawFd),
}

/// One address family of a TCP address: not bound, all its addresses
/// (`Some(None)`), or one.
type Family = Option<Option<IpAddr>>;

impl Addr {
    /// Whether binding both would collide with ourselves: the same address
    /// twice, or a port on all addresses and on one of them. Port 0 (the
    /// kernel picks) never collides.
    pub fn clashes(&self, other: &Addr) -> bool {
        match (self.tcp(), other.tcp()) {
            (Some((p, v4, v6)), Some((q, w4, w6))) => {
                // Per family: both bind it, and one of them on all its
                // addresses, or both on the same one.
                let overlap = |a: Family, b: Family| match (a, b) {
                    (Some(None), Some(_)) | (Some(_), Some(None)) => true,
                    (Some(Some(x)), Some(Some(y))) => x == y,
                    _ => false,
                };
                p != 0 && p == q && (overlap(v4, w4) || overlap(v6, w6))
            }
            (None, None) => self == other,
            _ => false,
        }
    }

    /// A TCP address as (port, IPv4 part, IPv6 part): per family, `None`
    /// when not bound, `Some(None)` for all its addresses, else the one.
    /// `PORT` and `[::]:PORT` are dual-stack (IPV6_V6ONLY cleared).
    fn tcp(&self) -> Option<(u16, Family, Family)> {
        // [::ffff:a.b.c.d] is an IPv4 address on a dual-stack socket.
        if let Addr::Tcp(SocketAddr::V6(a)) = self
            && let Some(v4) = a.ip().to_ipv4_mapped()
        {
            let ip = (!v4.is_unspecified()).then_some(IpAddr::V4(v4));
            return Some((a.port(), Some(ip), None));
        }
        match self {
            Addr::Any(p) => Some((*p, Some(None), Some(None))),
            Addr::Tcp(a) if a.ip().is_unspecified() && a.is_ipv6() => {
                Some((a.port(), Some(None), Some(None)))
            }
            Addr::Tcp(a) if a.ip().is_unspecified() => Some((a.port(), Some(None), None)),
            Addr::Tcp(a) if a.is_ipv4() => Some((a.port(), Some(Some(a.ip())), None)),
            Addr::Tcp(a) => Some((a.port(), None, Some(Some(a.ip())))),
            _ => None,
        }
    }
}

/// sd_listen_fds_with_names(3): names are 1 to 255 printable ASCII
/// characters (space included) without ':' (the separator in
/// `LISTEN_FDNAMES`), as systemd's fdname_is_valid checks.
fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 255 && n.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

impl Spec {
    pub fn parse(s: &str) -> std::result::Result<Spec, String> {
        let (name, addr) = match s.split_once('=') {
            Some((n, a)) if !n.contains([':', '/', '[']) => (Some(n), a),
            _ => (None, s),
        };
        if let Some(n) = name.filter(|n| !valid_name(n)) {
            return Err(format!(
                "bad name '{}': use 1 to 255 printable characters without ':'",
                crate::log::printable(n)
            ));
        }
        let addr = if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            if path.len() > 107 {
                return Err("unix socket path longer than 107 bytes".into());
            }
            Addr::Unix(PathBuf::from(path))
        } else if let Some(n) = addr.strip_prefix("fd:") {
            match n.parse::<RawFd>() {
                Ok(fd) if fd >= FIRST_FD => Addr::Fd(fd),
                _ => return Err("fd: needs a descriptor number of 3 or more".into()),
            }
        } else if let Some(port) = addr.strip_prefix(':') {
            if port.contains(':') {
                return Err(IPV6_BRACKETS.into());
            }
            Addr::Any(parse_port(port)?)
        } else if addr.bytes().all(|b| b.is_ascii_digit()) {
            Addr::Any(parse_port(addr)?)
        } else {
            match addr.parse::<SocketAddr>() {
                Ok(a) => Addr::Tcp(a),
                // Say which part is wrong where it is clear.
                Err(_) if addr.contains('=') => {
                    return Err("bad name before '=': it may not contain ':', '/' or '['".into());
                }
                Err(_) if !addr.starts_with('[') && addr.matches(':').count() > 1 => {
                    return Err(IPV6_BRACKETS.into());
                }
                Err(_) => match addr.rsplit_once(':') {
                    Some((_, port))
                        if !port.is_empty()
                            && port.bytes().all(|b| b.is_ascii_digit())
                            && port.parse::<u16>().is_err() =>
                    {
                        return Err(parse_port(port).unwrap_err());
                    }
                    _ => {
                        return Err(
                            "expected PORT, :PORT, IPV4:PORT, [IPV6]:PORT, unix:PATH or fd:N (host names are not resolved)"
                                .into(),
                        );
                    }
                },
            }
        };
        Ok(Spec {
            name: name.map(str::to_string),
            addr,
        })
    }
}

const IPV6_BRACKETS: &str = "an IPv6 address goes in brackets: [::1]:8080";

fn parse_port(s: &str) -> std::result::Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("bad port '{s}': expected 0 to 65535"))
}

/// A socket we hold for our whole life, parked at fd `3 + index`.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// The name for `LISTEN_FDNAMES` (`unknown` when none was given).
    pub name: String,
    /// What it is bound to, for logs and `status`.
    pub display: String,
    /// A TCP socket's address, port resolved (for `listen_again`).
    pub tcp_addr: Option<SocketAddr>,
    /// A socket file we created and remove at exit.
    pub unix_path: Option<PathBuf>,
    /// No longer polled for a hang-up: it could not listen again (see
    /// [`Listener::listen_again`]), or it reported an error.
    pub unwatched: bool,
    /// Shut down by a worker and not listening again.
    pub dead: bool,
}

impl Listener {
    /// Whether the socket still listens. shutdown(2) on a listening
    /// socket, by any process holding it, disconnects it for every holder:
    /// a worker doing that to its fd 3 stops the whole service.
    /// (A unix socket keeps SO_ACCEPTCONN when shut down: `dead` says it.)
    pub fn listening(&self) -> bool {
        !self.dead && sockopt::socket_acceptconn(&self.fd).unwrap_or(true)
    }

    /// Listen again on the very socket every generation holds (their
    /// fd 3… stay valid), bound again to its address if the kernel let go
    /// of the port (it does for a port it chose, `:0`). A unix socket that
    /// was shut down stays so: it cannot be repaired in place.
    pub fn listen_again(&self, backlog: i32) -> std::result::Result<(), String> {
        let Some(addr) = self.tcp_addr else {
            return Err("a unix socket that was shut down refuses connections for good".into());
        };
        // A second shutdown(2) leaves the closed socket marked shut down,
        // and connections accepted after listen(2) would inherit the mark:
        // connect(AF_UNSPEC) resets it.
        let _ = net::connect_unspec(&self.fd);
        // getsockname may still show the old port after the kernel let go
        // of it: bind, and EINVAL says it is still bound (we asked for the
        // port ourselves).
        match net::bind(&self.fd, &addr) {
            Ok(()) | Err(Errno::INVAL) => {}
            Err(e) => return Err(format!("binding {addr} again: {}", os_text(e))),
        }
        net::listen(&self.fd, backlog).map_err(|e| format!("listening again: {}", os_text(e)))?;
        match inet_name(&self.fd) {
            Some(a) if a == addr => Ok(()),
            other => {
                // Not on a port of ours: stop listening there.
                let _ = net::connect_unspec(&self.fd);
                Err(format!(
                    "it listens on {} instead",
                    other.map_or_else(|| "?".into(), |a| a.to_string())
                ))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Bind or adopt every spec, then park the sockets at 3, 4, … in the
/// order given. A new descriptor takes the lowest free number, which a
/// later `fd:N` must never name (`-l 8080 -l fd:3`, or `-l fd:3 -l fd:4`,
/// with only fd 3 inherited, would hand out one socket twice): every N
/// must be open before anything is made, and stays open (adopting copies
/// it), so nothing made here can take its number.
pub fn open_all(specs: &[Spec], backlog: i32, inherited: &Inherited) -> Result<Vec<Listener>> {
    for spec in specs {
        if let Addr::Fd(n) = spec.addr
            && !sys::is_open(n)
        {
            return Err(Error::msg(
                format!("adopt fd:{n}"),
                "no such open file descriptor",
            ));
        }
    }
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut l = open(spec, backlog)?;
        if spec.name.is_none()
            && let Addr::Fd(fd) = spec.addr
            && let Some(n) = inherited.name_of(fd)
        {
            l.name = n.to_string();
        }
        out.push(l);
    }
    park(out)
}

/// Sockets passed to us by socket activation (`LISTEN_FDS` with
/// `LISTEN_PID` equal to our pid), see sd_listen_fds(3).
#[derive(Debug, Default)]
pub struct Inherited {
    pub count: i32,
    pub names: Vec<String>,
}

/// More inherited sockets than this is a broken environment, not a
/// service: say so rather than walk the whole fd space.
const MAX_INHERITED: i32 = 4096;

impl Inherited {
    /// Read (not yet adopt) what systemd passed to this very process.
    pub fn from_env() -> Result<Inherited> {
        let pid = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<i32>().ok());
        if pid != Some(rustix::process::getpid().as_raw_nonzero().get()) {
            return Ok(Inherited::default());
        }
        // Addressed to us, the count must make sense (sd_listen_fds(3)
        // fails on it too): a typo must not read as "no sockets".
        let raw = std::env::var_os("LISTEN_FDS").unwrap_or_default();
        let count = match raw.to_str().map(|n| n.parse::<i32>()) {
            _ if raw.is_empty() => 0,
            Some(Ok(n)) if n >= 0 => n,
            _ => {
                return Err(Error::msg(
                    format!("adopt LISTEN_FDS='{}'", raw.to_string_lossy()),
                    "not a number of descriptors",
                ));
            }
        };
        if count > MAX_INHERITED {
            return Err(Error::msg(
                format!("adopt LISTEN_FDS={count}"),
                format!("more than the {MAX_INHERITED} inherited sockets supported"),
            ));
        }
        // A name systemd would not give (a newline, an escape) is not
        // passed on to workers, nor printed: `unknown` instead.
        let names = std::env::var_os("LISTEN_FDNAMES")
            .map(|n| {
                let n = n.to_string_lossy();
                n.split(':')
                    .take(count as usize)
                    .enumerate()
                    .map(|(i, n)| {
                        if n.is_empty() || valid_name(n) {
                            return n.to_string();
                        }
                        crate::warn!(
                            "LISTEN_FDNAMES: name {} of fd {} is not 1 to 255 printable characters; using 'unknown'",
                            i + 1,
                            FIRST_FD + i as RawFd
                        );
                        String::new()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Inherited { count, names })
    }

    fn name_of(&self, fd: RawFd) -> Option<&str> {
        let i = usize::try_from(fd - FIRST_FD).ok()?;
        self.names
            .get(i)
            .map(String::as_str)
            .filter(|n| !n.is_empty())
    }

    /// `--listen fd:3 --listen fd:4 …` for every inherited socket.
    pub fn specs(&self) -> Vec<Spec> {
        (0..self.count)
            .map(|i| Spec {
                name: None,
                addr: Addr::Fd(FIRST_FD + i),
            })
            .collect()
    }
}

fn open(spec: &Spec, backlog: i32) -> Result<Listener> {
    let unnamed = || spec.name.clone().unwrap_or_else(|| "unknown".into());
    match &spec.addr {
        Addr::Any(port) => {
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port);
            match bind_tcp(v6, backlog) {
                Err((Errno::AFNOSUPPORT, _)) => {
                    let v4 = SocketAddr::from(([0, 0, 0, 0], *port));
                    tcp_listener(v4, backlog, unnamed())
                }
                Err((e, what)) => Err(Error::os(format!("{what} [::]:{port}"), e)),
                Ok(fd) => finish_tcp(fd, unnamed()),
            }
        }
        Addr::Tcp(addr) => tcp_listener(*addr, backlog, unnamed()),
        Addr::Unix(path) => bind_unix(path, backlog, unnamed()),
        Addr::Fd(fd) => adopt(*fd, unnamed()),
    }
}

/// The IPv4/IPv6 address `fd` is bound to (None for a unix socket).
fn inet_name(fd: &OwnedFd) -> Option<SocketAddr> {
    net::getsockname(fd)
        .ok()
        .and_then(|a| SocketAddr::try_from(a).ok())
}

fn tcp_listener(addr: SocketAddr, backlog: i32, name: String) -> Result<Listener> {
    let fd = bind_tcp(addr, backlog).map_err(|(e, what)| Error::os(format!("{what} {addr}"), e))?;
    finish_tcp(fd, name)
}

fn finish_tcp(fd: OwnedFd, name: String) -> Result<Listener> {
    let tcp_addr = inet_name(&fd);
    Ok(Listener {
        fd,
        name,
        display: tcp_addr.map_or_else(|| "?".into(), |a| a.to_string()),
        tcp_addr,
        unix_path: None,
        unwatched: false,
        dead: false,
    })
}

/// socket, SO_REUSEADDR, (dual-stack for `[::]`), bind, listen. The error
/// names the step that failed.
fn bind_tcp(addr: SocketAddr, backlog: i32) -> std::result::Result<OwnedFd, (Errno, &'static str)> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| (e, "create a socket for"))?;
    sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| (e, "set SO_REUSEADDR on"))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual-stack whatever net.ipv6.bindv6only says; `[::1]` stays v6.
        sockopt::set_ipv6_v6only(&fd, false).map_err(|e| (e, "clear IPV6_V6ONLY on"))?;
    }
    net::bind(&fd, &addr).map_err(|e| (e, "bind"))?;
    net::listen(&fd, backlog).map_err(|e| (e, "listen on"))?;
    Ok(fd)
}

fn bind_unix(path: &Path, backlog: i32, name: String) -> Result<Listener> {
    let shown = format!("unix:{}", path.display());
    let bytes = path.as_os_str().as_bytes();
    let abstract_name = bytes.strip_prefix(b"@");
    let addr = match abstract_name {
        Some(n) => SocketAddrUnix::new_abstract_name(n),
        None => SocketAddrUnix::new(path),
    }
    .map_err(|e| Error::os(format!("use {shown}"), e))?;
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Error::os(format!("create a socket for {shown}"), e))?;
    match net::bind(&fd, &addr) {
        Err(Errno::ADDRINUSE) if abstract_name.is_none() => {
            remove_stale_socket(path, &addr).map_err(|why| match why {
                Occupied::Live => Error::os(format!("bind {shown}"), Errno::ADDRINUSE),
                other => Error::msg(format!("bind {shown}"), other.to_string()),
            })?;
            net::bind(&fd, &addr).map_err(|e| Error::os(format!("bind {shown}"), e))?;
        }
        Err(e) => return Err(Error::os(format!("bind {shown}"), e)),
        Ok(()) => {}
    }
    let unix_path = abstract_name.is_none().then(|| path.to_path_buf());
    let l = Listener {
        fd,
        name,
        display: shown.clone(),
        tcp_addr: None,
        unix_path,
        unwatched: false,
        dead: false,
    };
    net::listen(&l.fd, backlog).map_err(|e| Error::os(format!("listen on {shown}"), e))?;
    Ok(l)
}

/// Why a path where we want to bind a socket cannot simply be reused.
#[derive(Debug)]
pub enum Occupied {
    /// A socket someone still listens on.
    Live,
    /// A file, directory or symlink: not ours to remove.
    NotASocket,
    /// The stale socket could not be removed.
    Remove(std::io::Error),
}

impl std::fmt::Display for Occupied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Occupied::Live => f.write_str("something listens there"),
            Occupied::NotASocket => f.write_str("the path exists and is not a socket"),
            Occupied::Remove(e) => write!(f, "removing the stale socket: {}", os_message(e)),
        }
    }
}

/// Remove the socket file at `path` if nobody listens on it: one left by a
/// process that is gone. Anything that is not a socket is left alone —
/// connect(2) answers ECONNREFUSED for a regular file too, so the probe
/// alone cannot tell. Nothing at `path` is fine.
pub fn remove_stale_socket(
    path: &Path,
    addr: &SocketAddrUnix,
) -> std::result::Result<(), Occupied> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Occupied::Remove(e)),
        Ok(m) if !m.file_type().is_socket() => return Err(Occupied::NotASocket),
        Ok(_) => {}
    }
    let live = match net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        // Non-blocking: a live but stuck supervisor with a full backlog
        // answers EAGAIN at once instead of holding up our start.
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    ) {
        // ECONNREFUSED: a socket file with no listener. Anything else
        // (even EAGAIN from a full backlog) means someone is there.
        Ok(probe) => !matches!(net::connect(&probe, addr), Err(Errno::CONNREFUSED)),
        Err(_) => true,
    };
    if live {
        return Err(Occupied::Live);
    }
    std::fs::remove_file(path).map_err(Occupied::Remove)
}

/// Take over an fd we inherited: it must be a listening stream socket.
fn adopt(fd: RawFd, name: String) -> Result<Listener> {
    let what = format!("adopt fd:{fd}");
    let dup = sys::dup_inherited(fd, FIRST_FD).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => Error::msg(&what, "no such open file descriptor"),
        _ => Error::os(&what, e),
    })?;
    match sockopt::socket_type(&dup) {
        Ok(SocketType::STREAM) => {}
        Ok(_) => return Err(Error::msg(what, "not a stream socket")),
        Err(e) => return Err(Error::os(what, e)),
    }
    if !sockopt::socket_acceptconn(&dup).unwrap_or(false) {
        return Err(Error::msg(what, "the socket is not listening"));
    }
    let display = match net::getsockname(&dup) {
        Ok(a) => match SocketAddr::try_from(a.clone()) {
            Ok(s) => format!("fd:{fd} ({s})"),
            Err(_) => match SocketAddrUnix::try_from(a) {
                Ok(u) => match u.path_bytes() {
                    Some(p) => format!("fd:{fd} (unix:{})", OsStr::from_bytes(p).to_string_lossy()),
                    None => format!("fd:{fd} (unix)"),
                },
                Err(_) => format!("fd:{fd}"),
            },
        },
        Err(_) => format!("fd:{fd}"),
    };
    // The original goes away when parking replaces it; the duplicate holds
    // the socket meanwhile.
    let tcp_addr = inet_name(&dup);
    Ok(Listener {
        fd: dup,
        name,
        display,
        tcp_addr,
        unix_path: None,
        unwatched: false,
        dead: false,
    })
}

/// Move the sockets to 3, 4, … in order. First lift every one above the
/// target range so that no move overwrites a socket still to be moved,
/// then `dup3` each into place (closing whatever was inherited there).
fn park(listeners: Vec<Listener>) -> Result<Vec<Listener>> {
    let n = listeners.len() as RawFd;
    let mut lifted = Vec::with_capacity(listeners.len());
    for mut l in listeners {
        let high = rustix::io::fcntl_dupfd_cloexec(&l.fd, FIRST_FD + n)
            .map_err(|e| Error::os(format!("move the socket of {}", l.display), e))?;
        l.fd = high;
        lifted.push(l);
    }
    let mut parked = Vec::with_capacity(lifted.len());
    for (i, mut l) in lifted.into_iter().enumerate() {
        let target = FIRST_FD + i as RawFd;
        let fd = sys::dup_to(l.fd.as_fd().as_raw_fd(), target).map_err(|e| {
            Error::os(
                format!("move the socket of {} to fd {target}", l.display),
                e,
            )
        })?;
        l.fd = fd;
        parked.push(l);
    }
    Ok(parked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_wrong_part() {
        let e = |s: &str| Spec::parse(s).unwrap_err();
        assert_eq!(e("70000"), "bad port '70000': expected 0 to 65535");
        assert_eq!(e("[::1]:99999"), "bad port '99999': expected 0 to 65535");
        assert_eq!(
            e("127.0.0.1:99999"),
            "bad port '99999': expected 0 to 65535"
        );
        assert_eq!(e("::1:8080"), IPV6_BRACKETS);
        assert_eq!(e("fe80::1:8080"), IPV6_BRACKETS);
        assert!(e("a:b=9001").starts_with("bad name before '='"));
        assert!(e("localhost:80").starts_with("expected PORT"));
    }

    #[test]
    fn clashes() {
        let a = |s: &str| Spec::parse(s).unwrap().addr;
        assert!(a("9001").clashes(&a(":9001")));
        assert!(a(":9001").clashes(&a("127.0.0.1:9001")));
        assert!(a("[::1]:9001").clashes(&a("9001")));
        assert!(a("unix:/x.sock").clashes(&a("web=unix:/x.sock")));
        assert!(a("fd:3").clashes(&a("fd:3")));
        assert!(!a("127.0.0.1:0").clashes(&a("127.0.0.1:0")));
        assert!(!a("127.0.0.1:9001").clashes(&a("127.0.0.2:9001")));
        assert!(!a("9001").clashes(&a("9002")));
        assert!(!a("0").clashes(&a("127.0.0.1:0")));
        assert!(a("0.0.0.0:9001").clashes(&a("127.0.0.1:9001")));
        assert!(a("[::]:9001").clashes(&a("127.0.0.1:9001")));
        assert!(a("[::]:9001").clashes(&a("[::1]:9001")));
        assert!(a("0.0.0.0:9001").clashes(&a("9001")));
        assert!(!a("0.0.0.0:9001").clashes(&a("[::1]:9001")));
        assert!(!a("127.0.0.1:9001").clashes(&a("[::1]:9001")));
        assert!(a("[::ffff:127.0.0.1]:9001").clashes(&a("127.0.0.1:9001")));
        assert!(a("[::ffff:0.0.0.0]:9001").clashes(&a("127.0.0.1:9001")));
        assert!(!a("[::ffff:127.0.0.1]:9001").clashes(&a("[::1]:9001")));
    }

    #[test]
    fn specs() {
        assert_eq!(Spec::parse("8080").unwrap().addr, Addr::Any(8080));
        assert_eq!(Spec::parse(":8080").unwrap().addr, Addr::Any(8080));
        assert_eq!(
            Spec::parse("127.0.0.1:80").unwrap().addr,
            Addr::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            Spec::parse("[::1]:80").unwrap().addr,
            Addr::Tcp("[::1]:80".parse().unwrap())
        );
        let s = Spec::parse("web=unix:/run/a.sock").unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.addr, Addr::Unix("/run/a.sock".into()));
        assert_eq!(Spec::parse("fd:3").unwrap().addr, Addr::Fd(3));
        assert!(Spec::parse("fd:1").is_err());
        assert!(Spec::parse("localhost:80").is_err());
        assert!(Spec::parse("99999").is_err());
        // systemd's fdname_is_valid: printable ASCII, space included.
        assert_eq!(Spec::parse("a b=80").unwrap().name.as_deref(), Some("a b"));
        assert!(Spec::parse("a\tb=80").is_err());
        assert!(Spec::parse("\u{e9}=80").is_err());
    }
}
