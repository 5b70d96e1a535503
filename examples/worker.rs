//! An example containerflip worker in plain Rust (std only), and the probe
//! the integration tests run.
//!
//! # What a containerflip worker does
//!
//! 1. **Take the listening sockets it is given.** containerflip passes them
//!    the systemd way: fds 3, 4, … with `LISTEN_FDS=N` and `LISTEN_PID` set
//!    to the worker's own pid (check it: a variable meant for someone else
//!    must be ignored). A socket may be TCP or unix; this worker asks the fd
//!    for its address to find out which. Without `LISTEN_FDS` it binds
//!    `127.0.0.1:$PORT` itself, so it also runs on its own.
//! 2. **Say when it is ready.** It sends `READY=1` to `$NOTIFY_SOCKET`
//!    (sd_notify's protocol). The socket is a unix datagram socket by
//!    default; with `--notify-mode stream` it is a stream socket, which a
//!    datagram send rejects (`EPROTOTYPE` for a path, `ECONNREFUSED` for an
//!    abstract name), so this worker falls back to connect + write + close.
//!    A leading `@` means an abstract address.
//!    Until `READY=1` the previous generation keeps serving, so a worker
//!    should only say it once it can really answer. This one also waits
//!    until then before it accepts a connection.
//! 3. **Drain on the stop signal** (SIGTERM by default; SIGINT too): stop
//!    accepting, let requests in flight finish, answer the *next* request on
//!    each keep-alive connection with `Connection: close` and close it, and
//!    exit 0 once no connection is left. Idle keep-alive connections are
//!    never closed early, because a client may be sending on one at that very
//!    moment; they are closed when the client closes them or when
//!    `$DRAIN_GRACE_MS` (set by containerflip a little below its drain
//!    deadline) runs out.
//!
//! The signal handler only writes the signal number into a pipe (the
//! self-pipe trick: `write(2)` is async-signal-safe); the main thread polls
//! that pipe together with the listeners and does everything else. Each
//! connection is served by its own thread. The handled signals are blocked
//! in those threads, so they are always delivered to the main thread, and
//! they are installed without `SA_RESTART`, so they also interrupt an
//! `accept(2)` that blocks because another generation took the connection
//! that woke this one up (the listening socket is shared by every
//! generation). Changing the shared socket to non-blocking mode is not an
//! option: `O_NONBLOCK` belongs to the open file description, which every
//! generation and the supervisor share. (A signal handled in the instant
//! between `poll` and `accept` still leaves `accept` blocked until the next
//! connection arrives; under load that is at once, and without load no
//! other generation takes connections away.)
//!
//! # The HTTP it serves
//!
//! Every request gets `200 OK`, body `gen G pid P\n`, headers
//! `X-Generation: $CONTAINERFLIP_GENERATION` and `X-Pid`. `/slow?ms=N`
//! answers after N milliseconds; `/until-drain` answers once this worker
//! has started draining (a request that is in flight for sure when the
//! drain starts, for tests). HTTP/1.1 keep-alive is the default;
//! HTTP/1.0 without `Connection: keep-alive`, or `Connection: close`, closes.
//!
//! # Environment
//!
//! | variable | meaning |
//! |---|---|
//! | `PORT` | port to bind without `LISTEN_FDS` (default 8080) |
//! | `WORKER_READY_DELAY_MS` | wait this long before `READY=1` (default 0) |
//! | `WORKER_NO_READY=1` | never send `READY=1`, but serve |
//! | `WORKER_EXIT_BEFORE_READY=CODE` | after the delay, exit with CODE instead |
//! | `WORKER_IGNORE_TERM=1` | record SIGTERM but keep serving |
//! | `WORKER_RECORD=DIR` | write `DIR/PID.start` (what the worker was given: `pid=`, `ppid=`, `pgid=`, one `arg=HEX` per argv element, `env.NAME=` for the `LISTEN_*`, `NOTIFY_SOCKET`, `CONTAINERFLIP_GENERATION` and `DRAIN_GRACE_MS` variables, `listen.FD=tcp ADDR` or `unix PATH`, `fds=` open at start, `sigmask=` and `sigign=` from /proc) and append to `DIR/PID.events` (`ready`, `serving`, `signal N`, `exit N`) |
//! | `WORKER_RECORD_ENV=A,B` | more variables to put in the `.start` record |
//! | `WORKER_SPAWN=sleeper\|orphan\|daemon` | start a process that sleeps forever: a child in our process group, a grandchild whose parent exits at once, or such a grandchild that also calls `setsid()`; its pid goes to `DIR/PID.grandchild`; with `WORKER_IGNORE_TERM=1` it too records the signals it gets (in `DIR/ITSPID.events`) and keeps sleeping |
//!
//! Exit status: 0 after a drain, the code of `WORKER_EXIT_BEFORE_READY`, and
//! 1 with a one-line message on stderr when setting up fails.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString, c_int, c_uint, c_ulong, c_void};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{self, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The few libc functions std does not wrap. std links libc, so declaring
// them is enough. Constants are Linux's (the same on x86_64 and aarch64).

/// glibc's `sigset_t`: 1024 bits.
#[repr(C)]
struct SigSet([c_ulong; 1024 / (8 * std::mem::size_of::<c_ulong>())]);

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

const POLLIN: i16 = 0x1;
const O_NONBLOCK: c_int = 0o4000;
const O_CLOEXEC: c_int = 0o2000000;
const SOCK_CLOEXEC: c_int = O_CLOEXEC;
const SIG_BLOCK: c_int = 0;
const SIG_SETMASK: c_int = 2;
const SIG_ERR: usize = !0;

const SIGHUP: c_int = 1;
const SIGINT: c_int = 2;
const SIGQUIT: c_int = 3;
const SIGUSR1: c_int = 10;
const SIGUSR2: c_int = 12;
const SIGTERM: c_int = 15;
const SIGWINCH: c_int = 28;

/// The signals this worker handles (and records).
const HANDLED: [c_int; 7] = [SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP, SIGQUIT, SIGWINCH];

unsafe extern "C" {
    /// signal(2): glibc gives it BSD semantics (handler stays, SA_RESTART).
    fn signal(signum: c_int, handler: usize) -> usize;
    /// siginterrupt(3): clear SA_RESTART, so the signal interrupts accept(2).
    fn siginterrupt(sig: c_int, flag: c_int) -> c_int;
    fn pthread_sigmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigaddset(set: *mut SigSet, signum: c_int) -> c_int;
    fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    fn write(fd: c_int, buf: *const c_void, count: usize) -> isize;
    fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
    fn accept4(fd: c_int, addr: *mut c_void, len: *mut c_uint, flags: c_int) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn getpgrp() -> c_int;
    fn setsid() -> c_int;
}

/// Write end of the self-pipe, for the signal handler (-1: not yet open).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The signal handler: one byte, the signal number, into the self-pipe.
/// Only async-signal-safe work: an atomic load and write(2), with errno
/// saved and restored around it, since the interrupted code may be about to
/// read errno. The write end is non-blocking: a full pipe loses a byte (the
/// main loop has plenty to read then), it never blocks the handler.
extern "C" fn on_signal(sig: c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: __errno_location returns this thread's errno, valid for the
    // thread's life; write(2) is async-signal-safe and `byte` outlives it.
    unsafe {
        let errno = __errno_location();
        let saved = *errno;
        write(fd, (&raw const byte).cast(), 1);
        *errno = saved;
    }
}

/// A set holding the handled signals.
fn handled_set() -> SigSet {
    let mut set = SigSet([0; 1024 / (8 * std::mem::size_of::<c_ulong>())]);
    // SAFETY: `set` is a valid, writable sigset_t; the numbers are valid.
    unsafe {
        sigemptyset(&mut set);
        for sig in HANDLED {
            sigaddset(&mut set, sig);
        }
    }
    set
}

/// Opens the self-pipe and installs the handler for every signal in
/// `HANDLED`. Returns the read end.
fn install_signal_handlers() -> io::Result<File> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: `fds` has room for the two fds pipe2(2) writes.
    if unsafe { pipe2(fds.as_mut_ptr(), O_NONBLOCK | O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fds and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The write end stays open for the life of the process.
    SIGNAL_PIPE.store(write.into_raw_fd(), Ordering::Relaxed);
    for sig in HANDLED {
        // SAFETY: `on_signal` is async-signal-safe (see above), and
        // siginterrupt only changes the flags of the handler just set.
        let failed = unsafe {
            signal(sig, on_signal as extern "C" fn(c_int) as usize) == SIG_ERR
                || siginterrupt(sig, 1) != 0
        };
        if failed {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(File::from(read))
}

/// Spawns a thread with the handled signals blocked, so they go to the main
/// thread only. The mask is inherited from the thread that spawns, hence
/// block, spawn, restore.
fn spawn_masked(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let set = handled_set();
    let mut old = handled_set();
    // SAFETY: both sets are valid sigset_t values.
    unsafe { pthread_sigmask(SIG_BLOCK, &set, &mut old) };
    let spawned = std::thread::Builder::new().spawn(f);
    // SAFETY: `old` is the mask pthread_sigmask just filled in.
    unsafe { pthread_sigmask(SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned.map(drop)
}

/// poll(2) on `fds` for reading; `timeout` None waits forever. EINTR is
/// reported as no fd ready (the self-pipe will say why).
fn poll_read(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd> = fds
        .iter()
        .map(|&fd| PollFd {
            fd,
            events: POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        // Round up, so a deadline is not polled for again and again with 0.
        Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as c_int,
    };
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
    let n = unsafe { poll(pfds.as_mut_ptr(), pfds.len() as c_ulong, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// accept4(2) that, unlike std's `accept`, gives up on EINTR instead of
/// retrying, so a signal can pull the main thread out of it.
fn accept_once(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address and length are allowed; the result is a new fd
    // that nothing else owns.
    let conn = unsafe { accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), SOCK_CLOEXEC) };
    if conn < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(conn) })
}

// ---------------------------------------------------------------------------
// Listeners and connections, TCP or unix.

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Wraps an inherited listening socket, whichever family it is.
    fn adopt(fd: RawFd) -> io::Result<Listener> {
        // SAFETY: LISTEN_FDS/LISTEN_PID say fds 3.. are ours; each is
        // wrapped once and owned from here on.
        let tcp = unsafe { TcpListener::from_raw_fd(fd) };
        if tcp.local_addr().is_ok() {
            // Move it off fd 3.. onto a CLOEXEC duplicate, so the helper
            // processes this worker may spawn do not hold the socket.
            return Ok(Listener::Tcp(tcp.try_clone()?));
        }
        // SAFETY: the fd is still ours; the TcpListener gave it back.
        let unix = unsafe { UnixListener::from_raw_fd(tcp.into_raw_fd()) };
        unix.local_addr()?;
        Ok(Listener::Unix(unix.try_clone()?))
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => Conn::Tcp(TcpStream::from(accept_once(l.as_raw_fd())?)),
            Listener::Unix(l) => Conn::Unix(UnixStream::from(accept_once(l.as_raw_fd())?)),
        })
    }

    /// `tcp ADDR` or `unix PATH`, for the record.
    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(e) => format!("tcp ? ({e})"),
            },
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix {}", p.display()),
                    None => format!("unix {a:?}"),
                },
                Err(e) => format!("unix ? ({e})"),
            },
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Shared state between the main thread and the connection threads.

struct Shared {
    generation: String,
    pid: u32,
    /// Set once, when the drain starts; `drain_started` is notified then.
    draining: AtomicBool,
    drain_lock: Mutex<()>,
    drain_started: Condvar,
    /// Open connections: a duplicate to shut it down at the grace deadline,
    /// and whether a request is being answered on it right now.
    conns: Mutex<HashMap<u64, (Conn, bool)>>,
}

impl Shared {
    fn start_draining(&self) {
        let _guard = self.drain_lock.lock().unwrap();
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.notify_all();
    }

    fn wait_for_drain(&self) {
        let guard = self.drain_lock.lock().unwrap();
        let _unused = self
            .drain_started
            .wait_while(guard, |_| !self.draining.load(Ordering::SeqCst))
            .unwrap();
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(entry) = self.conns.lock().unwrap().get_mut(&id) {
            entry.1 = busy;
        }
    }
}

/// Wakes the main loop (byte 0 in the self-pipe: not a signal).
fn wake_main() {
    on_signal(0);
}

/// Serves one connection until either side closes it.
fn serve_connection(shared: Arc<Shared>, id: u64, conn: Conn) {
    let mut reader = BufReader::new(conn);
    while let Ok(true) = serve_request(&shared, id, &mut reader) {}
    // Drop our duplicate first: the connection closes with the last fd.
    shared.conns.lock().unwrap().remove(&id);
    drop(reader);
    wake_main();
}

/// Reads one request and answers it. Ok(true): keep the connection open.
fn serve_request(shared: &Shared, id: u64, reader: &mut BufReader<Conn>) -> io::Result<bool> {
    const MAX_HEAD: usize = 64 * 1024;
    let mut head = Vec::new();
    // The request head ends with an empty line. Bare \n line ends are
    // accepted too, as RFC 9112 §2.2 allows.
    loop {
        let before = head.len();
        let n = reader
            .by_ref()
            .take((MAX_HEAD + 1 - before) as u64)
            .read_until(b'\n', &mut head)?;
        if n == 0 {
            return Ok(false); // EOF (between requests: the client closed)
        }
        if before == 0 {
            shared.set_busy(id, true);
        }
        if head.len() > MAX_HEAD {
            return respond(
                shared,
                reader.get_mut(),
                431,
                "head too large\n",
                true,
                false,
            )
            .map(|_| false);
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                head.clear(); // a stray empty line before a request
                continue;
            }
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return respond(shared, reader.get_mut(), 400, "bad request\n", true, false).map(|_| false);
    }
    let mut keep_alive = version != "HTTP/1.0";
    let mut body_len = 0u64;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    // Skip the body: this server never looks at it.
    let skipped = io::copy(&mut reader.by_ref().take(body_len), &mut io::sink())?;
    if skipped < body_len {
        return Ok(false);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/slow" {
        let ms = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
    } else if path == "/until-drain" {
        shared.wait_for_drain();
    }
    let body = format!("gen {} pid {}\n", shared.generation, shared.pid);
    // Decided after the work is done: a request in flight when the drain
    // starts is the one that carries `Connection: close`.
    let close = !keep_alive || shared.draining.load(Ordering::SeqCst);
    respond(
        shared,
        reader.get_mut(),
        200,
        &body,
        close,
        method == "HEAD",
    )?;
    shared.set_busy(id, false);
    Ok(!close)
}

fn respond(
    shared: &Shared,
    conn: &mut Conn,
    status: u16,
    body: &str,
    close: bool,
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Request Header Fields Too Large",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: {}\r\n\
         X-Generation: {}\r\n\
         X-Pid: {}\r\n\
         Connection: {}\r\n\r\n{}",
        body.len(),
        shared.generation,
        shared.pid,
        if close { "close" } else { "keep-alive" },
        if head_only { "" } else { body },
    );
    conn.write_all(response.as_bytes())
}

// ---------------------------------------------------------------------------
// Readiness.

/// Sends `msg` to `$NOTIFY_SOCKET` the way sd_notify does, with a fallback
/// to a stream connection for `--notify-mode stream`.
fn notify(socket: &OsStr, msg: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    let dgram = UnixDatagram::unbound()?;
    match dgram.send_to_addr(msg.as_bytes(), &addr) {
        Ok(_) => Ok(()),
        // Not a datagram socket at that address: EPROTOTYPE for a path;
        // ECONNREFUSED for an abstract name, since the kernel looks those up
        // by name *and* socket type.
        Err(e) if matches!(e.raw_os_error(), Some(91 | 111)) => {
            let mut stream = UnixStream::connect_addr(&addr).map_err(|_| e)?;
            // Dropping the stream closes it: that ends the message.
            stream.write_all(msg.as_bytes())
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// The probe's records.

/// What the process was given, captured before it opens anything.
struct Inherited {
    fds: Vec<RawFd>,
    sigmask: String,
    sigign: String,
}

fn inherited() -> Inherited {
    // List /proc/self/fd, then drop the fd used to read it: after the
    // directory is closed, only the fds that still exist count.
    let listed: Vec<RawFd> = match fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut fds: Vec<RawFd> = listed
        .into_iter()
        .filter(|fd| fs::read_link(format!("/proc/self/fd/{fd}")).is_ok())
        .collect();
    fds.sort_unstable();
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Inherited {
        fds,
        sigmask: field("SigBlk:"),
        sigign: field("SigIgn:"),
    }
}

/// Writes `path` atomically: a temporary file renamed over it.
fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn start_record(pid: u32, inh: &Inherited, listeners: &[(String, Listener)]) -> Vec<u8> {
    // SAFETY: getpgrp(2) cannot fail and touches no memory.
    let pgid = unsafe { getpgrp() };
    let mut out = format!(
        "pid={pid}\nppid={}\npgid={pgid}\n",
        std::os::unix::process::parent_id()
    )
    .into_bytes();
    for arg in std::env::args_os() {
        out.extend(format!("arg={}\n", hex(arg.as_bytes())).bytes());
    }
    let mut names: Vec<String> = [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "CONTAINERFLIP_GENERATION",
        "DRAIN_GRACE_MS",
    ]
    .map(String::from)
    .into();
    if let Ok(extra) = std::env::var("WORKER_RECORD_ENV") {
        names.extend(extra.split(',').filter(|s| !s.is_empty()).map(String::from));
    }
    for name in names {
        if let Some(value) = std::env::var_os(&name) {
            out.extend(format!("env.{name}=").bytes());
            out.extend(value.as_bytes());
            out.push(b'\n');
        }
    }
    for (from, listener) in listeners {
        out.extend(format!("listen.{from}={}\n", listener.describe()).bytes());
    }
    let fds: Vec<String> = inh.fds.iter().map(|fd| fd.to_string()).collect();
    out.extend(
        format!(
            "fds={}\nsigmask={}\nsigign={}\n",
            fds.join(","),
            inh.sigmask,
            inh.sigign
        )
        .bytes(),
    );
    out
}

/// The `.events` file: one write(2) per line, O_APPEND.
struct Events(Option<File>);

impl Events {
    fn record(&self, line: &str) {
        if let Some(mut file) = self.0.as_ref() {
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}

// ---------------------------------------------------------------------------
// Helper processes for WORKER_SPAWN, and the roles they run.

/// Re-runs this executable in `role`. Its stdin and stderr are /dev/null,
/// so a helper that outlives us holds no one's pipes; its stdout is
/// `stdout`, where the sleeper says `ready` once it is set up.
fn spawn_role(role: &str, worker_pid: u32, stdout: Stdio) -> io::Result<process::Child> {
    let exe = std::env::current_exe()?;
    Command::new(&exe)
        .arg0(format!("{} ({role})", exe.display()))
        .env("WORKER_ROLE", role)
        .env("WORKER_PARENT", worker_pid.to_string())
        .env_remove("WORKER_SPAWN")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
}

/// Spawns the helper of `WORKER_SPAWN` and waits until its sleeper is set
/// up (its signal handlers in place, its pid file written): a test may
/// signal it as soon as this worker says READY=1, or exits.
fn spawn_helper(kind: &str, worker_pid: u32) -> io::Result<()> {
    let mut child = spawn_role(kind, worker_pid, Stdio::piped())?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line != "ready\n" {
        return Err(io::Error::other("the helper died before it was ready"));
    }
    // The orphan and daemon roles exit at once: reap them. A sleeper is
    // left alone; it lives as long as the process group.
    if kind != "sleeper" {
        child.wait()?;
    }
    Ok(())
}

/// Runs a helper role; never returns.
fn run_role(role: &OsStr) -> ! {
    let parent: u32 = std::env::var("WORKER_PARENT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    match role.as_bytes() {
        b"orphan" | b"daemon" => {
            let sleeper = if role == "daemon" {
                "daemon-sleeper"
            } else {
                "sleeper"
            };
            // Exit at once without waiting: the grandchild is orphaned. It
            // inherits our stdout, the worker's pipe, to say it is ready.
            let code = if spawn_role(sleeper, parent, Stdio::inherit()).is_ok() {
                0
            } else {
                1
            };
            process::exit(code)
        }
        b"sleeper" | b"daemon-sleeper" => {
            if role == "daemon-sleeper" {
                // SAFETY: setsid(2) touches no memory; we are not a group
                // leader (our parent's group), so it succeeds.
                unsafe { setsid() };
            }
            // With WORKER_IGNORE_TERM, like the worker: record each signal
            // in DIR/OWNPID.events and keep sleeping, so a test can count
            // the stop signals we got.
            let record = std::env::var_os("WORKER_RECORD").map(PathBuf::from);
            let signals = env_flag("WORKER_IGNORE_TERM").then(|| {
                install_signal_handlers().unwrap_or_else(|e| fail("unable to set up signals", e))
            });
            let events = Events(record.as_ref().and_then(|dir| {
                let path = dir.join(format!("{}.events", process::id()));
                OpenOptions::new().create(true).append(true).open(path).ok()
            }));
            if let Some(dir) = &record {
                let path = dir.join(format!("{parent}.grandchild"));
                let _ = write_atomically(&path, format!("{}\n", process::id()).as_bytes());
            }
            let _ = io::stdout().write_all(b"ready\n");
            let Some(mut signals) = signals else {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            };
            let mut byte = [0u8; 1];
            loop {
                if poll_read(&[signals.as_raw_fd()], None).is_ok_and(|r| r[0])
                    && signals.read(&mut byte).is_ok_and(|n| n == 1)
                {
                    events.record(&format!("signal {}", byte[0]));
                }
            }
        }
        _ => fail("unknown WORKER_ROLE", ""),
    }
}

// ---------------------------------------------------------------------------

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("worker: {what}: {err}");
    process::exit(1)
}

fn env_ms(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| fail(&format!("bad {name} {v:?}"), e)),
        Err(_) => default,
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// The listeners, each with where it came from (its inherited fd, or
/// `bound`): inherited ones when LISTEN_FDS is addressed to us, else
/// 127.0.0.1:$PORT.
fn listeners(pid: u32) -> Vec<(String, Listener)> {
    let fds: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let for_us = std::env::var("LISTEN_PID").is_ok_and(|p| p == pid.to_string());
    if fds >= 1 && for_us {
        return (0..fds)
            .map(|i| {
                let fd = 3 + i as RawFd;
                let l = Listener::adopt(fd)
                    .unwrap_or_else(|e| fail(&format!("fd {fd} is not a listening socket"), e));
                (fd.to_string(), l)
            })
            .collect();
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let addr = format!("127.0.0.1:{port}");
    match TcpListener::bind(&addr) {
        Ok(l) => vec![("bound".to_string(), Listener::Tcp(l))],
        Err(e) => fail(&format!("unable to bind {addr}"), e),
    }
}

fn main() {
    // Before anything opens an fd or changes a signal.
    let inh = inherited();
    if let Some(role) = std::env::var_os("WORKER_ROLE") {
        run_role(&role);
    }
    let pid = process::id();
    let record_dir = std::env::var_os("WORKER_RECORD").map(PathBuf::from);
    let events = Events(record_dir.as_ref().map(|dir| {
        let path = dir.join(format!("{pid}.events"));
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| fail(&format!("unable to open {}", path.display()), e))
    }));
    let signals = install_signal_handlers().unwrap_or_else(|e| fail("unable to set up signals", e));
    let listeners = listeners(pid);
    if let Some(dir) = &record_dir {
        let path = dir.join(format!("{pid}.start"));
        write_atomically(&path, &start_record(pid, &inh, &listeners))
            .unwrap_or_else(|e| fail(&format!("unable to write {}", path.display()), e));
    }

    match std::env::var("WORKER_SPAWN").as_deref() {
        Err(_) | Ok("") => {}
        Ok(kind @ ("sleeper" | "orphan" | "daemon")) => {
            spawn_helper(kind, pid).unwrap_or_else(|e| fail("unable to spawn a helper", e))
        }
        Ok(other) => fail("bad WORKER_SPAWN", other),
    }

    let ready_delay = Duration::from_millis(env_ms("WORKER_READY_DELAY_MS", 0));
    let grace = Duration::from_millis(env_ms("DRAIN_GRACE_MS", 28_000));
    let exit_before_ready: Option<i32> = std::env::var("WORKER_EXIT_BEFORE_READY").ok().map(|v| {
        v.parse()
            .unwrap_or_else(|e| fail(&format!("bad WORKER_EXIT_BEFORE_READY {v:?}"), e))
    });
    let no_ready = env_flag("WORKER_NO_READY");
    let ignore_term = env_flag("WORKER_IGNORE_TERM");
    let notify_socket: Option<OsString> =
        std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());

    let shared = Arc::new(Shared {
        generation: std::env::var("CONTAINERFLIP_GENERATION").unwrap_or_default(),
        pid,
        draining: AtomicBool::new(false),
        drain_lock: Mutex::new(()),
        drain_started: Condvar::new(),
        conns: Mutex::new(HashMap::new()),
    });
    let exit = |code: i32| {
        events.record(&format!("exit {code}"));
        process::exit(code)
    };

    let ready_at = Instant::now() + ready_delay;
    let mut serving = false;
    let mut drain_deadline: Option<Instant> = None;
    let mut grace_over = false;
    let mut next_id = 0u64;
    loop {
        let now = Instant::now();
        let timeout = match drain_deadline {
            None if !serving => Some(ready_at.saturating_duration_since(now)),
            None => None,
            Some(_) if grace_over => None,
            Some(deadline) => Some(deadline.saturating_duration_since(now)),
        };
        let mut fds = vec![signals.as_raw_fd()];
        if serving && drain_deadline.is_none() {
            fds.extend(listeners.iter().map(|(_, l)| l.fd()));
        }
        let ready = poll_read(&fds, timeout).unwrap_or_else(|e| fail("poll", e));

        if ready[0] {
            let mut buf = [0u8; 64];
            let n = match (&signals).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    0
                }
                Err(e) => fail("reading the signal pipe", e),
            };
            for &sig in &buf[..n] {
                if sig == 0 {
                    continue; // a connection closed: checked below
                }
                events.record(&format!("signal {sig}"));
                let sig = c_int::from(sig);
                let stop = sig == SIGINT || (sig == SIGTERM && !ignore_term);
                if stop && drain_deadline.is_none() {
                    drain_deadline = Some(Instant::now() + grace);
                    shared.start_draining();
                }
            }
        }

        if let Some(deadline) = drain_deadline {
            let conns = shared.conns.lock().unwrap();
            if conns.is_empty() {
                drop(conns);
                exit(0);
            }
            if !grace_over && Instant::now() >= deadline {
                // Grace is over: close the idle keep-alive connections. A
                // request being answered still finishes.
                for (conn, busy) in conns.values() {
                    if !busy {
                        conn.shutdown();
                    }
                }
                grace_over = true;
            }
            continue;
        }

        if !serving && Instant::now() >= ready_at {
            if let Some(code) = exit_before_ready {
                exit(code);
            }
            if let (false, Some(socket)) = (no_ready, &notify_socket) {
                notify(socket, "READY=1\nSTATUS=serving").unwrap_or_else(|e| {
                    fail(&format!("unable to notify {}", socket.to_string_lossy()), e)
                });
                events.record("ready");
            }
            serving = true;
            events.record("serving");
            continue; // poll the listeners from now on
        }

        for (i, (_, listener)) in listeners.iter().enumerate() {
            if !ready.get(i + 1).copied().unwrap_or(false) {
                continue;
            }
            let conn = match listener.accept() {
                Ok(conn) => conn,
                // EINTR: a signal (read at the next turn). Others, such as
                // ECONNABORTED or EMFILE, concern one connection: carry on.
                Err(_) => continue,
            };
            let dup = match conn.try_clone() {
                Ok(dup) => dup,
                Err(_) => continue,
            };
            let id = next_id;
            next_id += 1;
            shared.conns.lock().unwrap().insert(id, (dup, false));
            let s = Arc::clone(&shared);
            if spawn_masked(move || serve_connection(s, id, conn)).is_err() {
                shared.conns.lock().unwrap().remove(&id);
            }
        }
    }
}
