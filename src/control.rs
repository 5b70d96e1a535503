//! The control socket (SPEC §6): a unix stream socket, mode 0600, whose
//! peers must be root or our own uid, served by the supervisor's poll
//! loop without ever blocking it. This module owns the client
//! connections (the wire format is [`crate::protocol`]); the supervisor
//! decides what a request does and answers through [`Control::progress`]
//! and [`Control::finish`].
//!
//! A request must be complete within [`REQUEST_TIMEOUT`]; replies are
//! queued up to [`MAX_OUTPUT`] bytes per client, and a client that reads
//! nothing past that is dropped. A client that goes away does not cancel
//! what it asked for.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

use crate::accept::{self, Accepted};
use crate::error::{Error, Result};
use crate::listen::{self, Occupied};
use crate::protocol::{
    MAX_OUTPUT, MAX_REQUEST, Request, check_request_line, find_end, parse_request,
};
use crate::{debug, warn};

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Once its last line is queued, how long a client may take none of the
/// rest of its reply; then it is closed (and the queued reply freed).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once. One more makes room by closing the oldest
/// client that has been connected for [`EVICT_AFTER`] without sending a
/// complete request or reading its whole reply, so idle clients never
/// lock out `status` for long; with none of those, more wait in the
/// backlog.
pub const MAX_CLIENTS: usize = 128;
/// How long a client may send nothing, or take none of its reply, before
/// it may be closed to make room (a real client sends its request at
/// once and reads).
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// Clients waiting on a deploy, rollback or stop at once; more are
/// answered with an error, so that `status` always finds a slot.
pub const MAX_WAITING: usize = 64;

pub type ClientId = u64;

/// What a poll entry is: the poll loop hands it back to [`Control::on_ready`].
/// Clients are named by id, never by fd number, which a client accepted
/// later in the same turn may reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Socket,
    Watch,
    Client(ClientId),
}

/// The default control path, in SPEC §6 order.
pub fn default_path() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("CONTAINERFLIP_CONTROL") {
        return p.into();
    }
    if let Some(d) = crate::rundir::runtime_dir_from_env(|_| true) {
        return d.join("containerflip.sock");
    }
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return "/run/containerflip.sock".into();
    }
    format!("/tmp/containerflip-{}.sock", uid.as_raw()).into()
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the request, until the deadline.
    Reading,
    /// Request handed to the supervisor; waiting for its result.
    Waiting,
    /// Result queued; close once it is written, or at the reply deadline.
    Closing,
}

struct Client {
    id: ClientId,
    fd: OwnedFd,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    deadline: Option<Instant>,
    connected: Instant,
    /// When the client last took some of its reply (see `wrote`).
    last_read: Instant,
    /// Some reply was written since the last `expire`, which turns it
    /// into `last_read` (flush has no clock).
    wrote: bool,
    /// The client shut down its sending side after its request (`nc -N`,
    /// socat): it still reads the answer.
    read_shut: bool,
}

pub struct Control {
    fd: OwnedFd,
    path: PathBuf,
    /// inotify on the socket file (best effort): a worker, which runs as
    /// our user, removing or replacing it is seen at once and the socket
    /// is bound again, rather than every client finding nobody there.
    watch: Option<OwnedFd>,
    /// The file we bound, as (st_dev, st_ino).
    file: (u64, u64),
    clients: Vec<Client>,
    next_id: ClientId,
    /// Accepting is paused after EMFILE until then.
    paused_until: Option<Instant>,
    /// EMFILE was logged; quiet until an accept works again.
    accept_failing: bool,
    /// Whether a connection could be accepted, as of the last `expire`
    /// (which the event loop calls every turn).
    room: bool,
}

impl Drop for Control {
    fn drop(&mut self) {
        // Only our own socket file: not what replaced it.
        if file_id(&self.path) == Some(self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Control {
    /// Bind `path` with mode 0600. A live socket there is another
    /// supervisor: refuse. A stale one is replaced.
    pub fn bind(path: &Path) -> Result<Control> {
        let (fd, file) = bind_socket(path)?;
        Ok(Control {
            fd,
            path: path.to_path_buf(),
            watch: watch_file(path),
            file,
            clients: Vec::new(),
            next_id: 1,
            paused_until: None,
            room: true,
            accept_failing: false,
        })
    }

    /// The socket file changed (inotify): if it is no longer the one we
    /// bound (removed, renamed, replaced), bind the path again. Clients
    /// already connected are kept; connections still in the old socket's
    /// backlog were accepted just before.
    fn on_file_changed(&mut self) {
        if let Some(w) = &self.watch {
            // What happened is read from the file system, not the events.
            let mut buf = [std::mem::MaybeUninit::uninit(); 512];
            let mut events = rustix::fs::inotify::Reader::new(w, &mut buf);
            while events.next().is_ok() {}
        }
        let shown = self.path.display();
        if file_id(&self.path) == Some(self.file) {
            return; // a chmod, say
        }
        match bind_socket(&self.path) {
            Ok((fd, file)) => {
                (self.fd, self.file) = (fd, file);
                self.watch = watch_file(&self.path);
                warn!(
                    "control socket {shown} was removed or replaced (by a worker?); bound it again"
                );
            }
            Err(e) => {
                self.watch = None;
                warn!(
                    "control socket {shown} was removed or replaced and cannot be bound again ({e}); \
                     SIGHUP still deploys"
                );
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn poll_fds(&self) -> impl Iterator<Item = (Token, BorrowedFd<'_>, PollFlags)> + '_ {
        let accepting = self.room && self.paused_until.is_none();
        let listen = accepting.then(|| (Token::Socket, self.fd.as_fd(), PollFlags::IN));
        let watch = self
            .watch
            .as_ref()
            .map(|w| (Token::Watch, w.as_fd(), PollFlags::IN));
        listen
            .into_iter()
            .chain(watch)
            .chain(self.clients.iter().map(|c| {
                let mut flags = PollFlags::empty();
                if c.phase == Phase::Reading && !c.read_shut {
                    // Only the request is read. A waiting client's stray bytes
                    // stay unread (it cannot make us spin on them), and its
                    // going away still shows: a hang-up is always reported.
                    flags |= PollFlags::IN;
                }
                if !c.output.is_empty() {
                    flags |= PollFlags::OUT;
                }
                (Token::Client(c.id), c.fd.as_fd(), flags)
            }))
    }

    pub fn deadline(&self) -> Option<Instant> {
        // Full: wake when the oldest silent client may be closed for room.
        let room_at = (!self.room)
            .then(|| self.eviction_candidate().map(|(_, at)| at))
            .flatten();
        self.clients
            .iter()
            .filter_map(|c| c.deadline)
            .chain(self.paused_until)
            .chain(room_at)
            .min()
    }

    /// Handle readiness of `fd`; returns complete requests.
    pub fn on_ready(
        &mut self,
        token: Token,
        flags: PollFlags,
        now: Instant,
    ) -> Vec<(ClientId, Request)> {
        let mut out = Vec::new();
        let id = match token {
            Token::Socket => {
                self.accept(now, &mut out);
                return out;
            }
            Token::Watch => {
                self.accept(now, &mut out);
                self.on_file_changed();
                return out;
            }
            Token::Client(id) => id,
        };
        // Gone already (evicted earlier in this turn): its event is stale,
        // and its fd number may be a newer client's by now.
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return out;
        };
        if flags.intersects(PollFlags::OUT) {
            self.flush(i);
        }
        let hung_up = flags.intersects(PollFlags::HUP | PollFlags::ERR);
        if (hung_up || flags.intersects(PollFlags::IN))
            && let Some(req) = self.read(i, hung_up)
        {
            out.push((self.clients[i].id, req));
        }
        self.clients
            .retain(|c| !(c.phase == Phase::Closing && c.output.is_empty()));
        out
    }

    /// Room for one more client, making it if need be (`evict`).
    fn has_room(&self, now: Instant) -> bool {
        self.clients.len() < MAX_CLIENTS
            || self.eviction_candidate().is_some_and(|(_, at)| at <= now)
    }

    /// The client to close to make room, and from when it may be: the
    /// longest-connected one still sending its request, or else the one
    /// that has taken nothing of its reply for longest (a slow reader is
    /// not idle). A waiting client is never one: it is owed a result.
    fn eviction_candidate(&self) -> Option<(usize, Instant)> {
        let idle_since = |c: &Client| match c.phase {
            Phase::Reading => c.connected,
            _ => c.last_read,
        };
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.phase != Phase::Waiting)
            .min_by_key(|(_, c)| (c.phase != Phase::Reading, idle_since(c), c.id))
            .map(|(i, c)| (i, idle_since(c) + EVICT_AFTER))
    }

    /// Over the limit: close the oldest client without a request, or with
    /// a reply it does not read. What a client still sending has sent is
    /// read first: a request that is complete is served, not evicted (it
    /// arrived before we got to it). Logged with -v only: a flood of
    /// connections must not flood the log.
    fn evict(&mut self, now: Instant, out: &mut Vec<(ClientId, Request)>) {
        while self.clients.len() > MAX_CLIENTS {
            let Some((i, _)) = self.eviction_candidate().filter(|&(_, at)| at <= now) else {
                return;
            };
            if self.clients[i].phase == Phase::Reading {
                if let Some(req) = self.read(i, false) {
                    out.push((self.clients[i].id, req));
                    continue;
                }
                if self.clients[i].phase != Phase::Reading {
                    // Gone, or refused by `read`: no longer a candidate.
                    self.clients
                        .retain(|c| !(c.phase == Phase::Closing && c.output.is_empty()));
                    continue;
                }
            }
            let c = self.clients.remove(i);
            if c.phase == Phase::Closing {
                debug!("control client closed to make room: it does not read its reply");
                continue;
            }
            debug!("control client closed to make room: {MAX_CLIENTS} connections");
            let msg = format!(
                "error too many connections ({MAX_CLIENTS}); closed the oldest one without a request\n"
            );
            let _ = net::send(
                &c.fd,
                msg.as_bytes(),
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            );
        }
    }

    fn accept(&mut self, now: Instant, out: &mut Vec<(ClientId, Request)>) {
        while self.has_room(now) {
            let fd = match accept::next(&self.fd) {
                Accepted::Peer(fd) => fd,
                Accepted::Stranger { fd, pid, uid } => {
                    let me = rustix::process::getuid().as_raw();
                    warn!(
                        "control connection from uid {uid} pid {pid} refused: only root and uid {me} may control this supervisor"
                    );
                    let msg = format!(
                        "error permission denied: uid {uid} may not control this supervisor\n"
                    );
                    let _ = net::send(
                        &fd,
                        msg.as_bytes(),
                        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                    );
                    continue;
                }
                Accepted::Exhausted(e) => {
                    if !self.accept_failing {
                        self.accept_failing = true;
                        warn!(
                            "control socket: unable to accept ({}); retrying every {}ms",
                            crate::error::os_text(e),
                            accept::PAUSE.as_millis()
                        );
                    }
                    self.paused_until = Some(now + accept::PAUSE);
                    return;
                }
                Accepted::None => return,
            };
            self.accept_failing = false;
            let id = self.next_id;
            self.next_id += 1;
            self.clients.push(Client {
                id,
                fd,
                input: Vec::new(),
                output: Vec::new(),
                phase: Phase::Reading,
                deadline: Some(now + REQUEST_TIMEOUT),
                connected: now,
                last_read: now,
                wrote: false,
                read_shut: false,
            });
            self.evict(now, out);
        }
    }

    /// Read what is there. Returns a request once the empty line arrives.
    /// `hung_up`: poll said the connection is closed both ways.
    fn read(&mut self, i: usize, hung_up: bool) -> Option<Request> {
        let mut buf = [0u8; 16 * 1024];
        // Counted before this client's request is (it is not waiting yet).
        let waiting = self.waiting_count();
        loop {
            let c = &mut self.clients[i];
            // A request being read never grows past MAX_REQUEST + 1
            // bytes: enough to know it is too large.
            let room = match c.phase {
                Phase::Reading => (MAX_REQUEST + 1 - c.input.len()).min(buf.len()),
                _ => buf.len(),
            };
            match rustix::io::read(&c.fd, &mut buf[..room]) {
                Ok(0) if c.phase == Phase::Waiting && !hung_up && !c.read_shut => {
                    // The client is done sending, not reading: it gets its
                    // answer. It stops being watched for input.
                    c.read_shut = true;
                    return None;
                }
                Ok(0) if c.phase == Phase::Reading && !c.input.is_empty() && !hung_up => {
                    // Half-closed before the empty line: say what is missing.
                    let e = "incomplete request (end it with an empty line)";
                    warn!("control request refused: {e}");
                    self.finish_at(i, false, e);
                    return None;
                }
                Ok(0) => {
                    // Gone. A waiting request carries on without it.
                    c.output.clear();
                    c.phase = Phase::Closing;
                    return None;
                }
                Ok(n) => {
                    if c.phase != Phase::Reading {
                        continue; // one request per connection; ignore the rest
                    }
                    c.input.extend_from_slice(&buf[..n]);
                    if let Err(e) = check_request_line(&c.input) {
                        warn!("control request refused: {e}");
                        self.finish_at(i, false, &e);
                        return None;
                    }
                    let end = find_end(&c.input);
                    // The request's size, its empty line included.
                    let size = match end {
                        Some(0) => 1,
                        Some(e) => e + 2,
                        None => c.input.len(),
                    };
                    if size > MAX_REQUEST {
                        let e = format!("request larger than {MAX_REQUEST} bytes");
                        warn!("control request refused: {e}");
                        self.finish_at(i, false, &e);
                        return None;
                    }
                    if let Some(end) = end {
                        let input = std::mem::take(&mut c.input);
                        c.deadline = None;
                        match parse_request(&input[..end]) {
                            Ok(req)
                                if !matches!(req, Request::Status(_) | Request::Stop)
                                    && waiting >= MAX_WAITING =>
                            {
                                let e = format!(
                                    "too many clients waiting ({MAX_WAITING}); try again later"
                                );
                                warn!("control request refused: {e}");
                                self.finish_at(i, false, &e);
                                return None;
                            }
                            Ok(req) => {
                                debug!(
                                    "control request: {}",
                                    crate::log::printable(
                                        String::from_utf8_lossy(&input[..end])
                                            .lines()
                                            .next()
                                            .unwrap_or("")
                                    )
                                );
                                c.phase = Phase::Waiting;
                                return Some(req);
                            }
                            Err(e) => {
                                warn!("control request refused: {e}");
                                self.finish_at(i, false, &e);
                                return None;
                            }
                        }
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return None,
                Err(_) => {
                    c.output.clear();
                    c.phase = Phase::Closing;
                    return None;
                }
            }
        }
    }

    /// Whether client `id` is still connected and waiting for a result.
    pub fn waiting(&self, id: ClientId) -> bool {
        self.clients
            .iter()
            .any(|c| c.id == id && c.phase == Phase::Waiting)
    }

    fn waiting_count(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| c.phase == Phase::Waiting)
            .count()
    }

    /// Run every turn of the event loop: answer clients whose request did
    /// not arrive in time, close those that took none of their reply for
    /// [`REPLY_TIMEOUT`] (and arm that deadline), and note whether there
    /// is room for another connection.
    pub fn expire(&mut self, now: Instant) {
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
        }
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.deadline.is_none_or(|d| d > now) {
                continue;
            }
            if c.phase == Phase::Closing {
                debug!(
                    "control client did not read its reply within {}s; closed",
                    REPLY_TIMEOUT.as_secs()
                );
                c.output.clear();
            } else {
                debug!(
                    "control client sent no complete request within {}s",
                    REQUEST_TIMEOUT.as_secs()
                );
                self.finish_at(i, false, "no complete request in time");
            }
        }
        self.clients
            .retain(|c| !(c.phase == Phase::Closing && c.output.is_empty()));
        // A reply whose last line is queued but not yet all read: closed
        // if the client takes none of it for REPLY_TIMEOUT.
        for c in &mut self.clients {
            let wrote = std::mem::take(&mut c.wrote);
            if wrote {
                c.last_read = now;
            }
            if c.phase == Phase::Closing && (wrote || c.deadline.is_none()) {
                c.deadline = Some(now + REPLY_TIMEOUT);
            }
        }
        self.room = self.has_room(now);
    }

    /// Queue a `progress` line for a waiting client.
    pub fn progress(&mut self, id: ClientId, text: &str) {
        self.send_line(id, "progress", text);
    }

    /// Queue `data` lines (multi-line output) for a client.
    pub fn data(&mut self, id: ClientId, text: &str) {
        for line in text.lines() {
            self.send_line(id, "data", line);
        }
    }

    /// Queue the final line and close after it.
    pub fn finish(&mut self, id: ClientId, ok: bool, text: &str) {
        if let Some(i) = self.clients.iter().position(|c| c.id == id) {
            self.finish_at(i, ok, text);
            self.clients
                .retain(|c| !(c.phase == Phase::Closing && c.output.is_empty()));
        }
    }

    fn finish_at(&mut self, i: usize, ok: bool, text: &str) {
        let id = self.clients[i].id;
        self.send_line(id, if ok { "ok" } else { "error" }, text);
        let c = &mut self.clients[i];
        c.phase = Phase::Closing;
        c.deadline = None;
        self.flush(i);
    }

    fn send_line(&mut self, id: ClientId, kind: &str, text: &str) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return; // the client went away; what it asked for goes on
        };
        let c = &mut self.clients[i];
        if c.phase == Phase::Closing {
            return;
        }
        let line = format!("{kind} {}\n", text.replace('\n', " "));
        if c.output.len() + line.len() > MAX_OUTPUT {
            debug!("control client reads nothing; dropping it");
            c.output.clear();
            c.phase = Phase::Closing;
            return;
        }
        c.output.extend_from_slice(line.as_bytes());
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.clients[i];
        while !c.output.is_empty() {
            match net::send(&c.fd, &c.output, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Ok(n) => {
                    c.output.drain(..n);
                    c.wrote = true;
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return,
                Err(_) => {
                    c.output.clear();
                    c.phase = Phase::Closing;
                    return;
                }
            }
        }
    }

    /// At exit: answer what is already queued (connections in the backlog,
    /// requests sent but not yet read) rather than let the close reset
    /// them. `stop` hears the exit status; anything else, that the
    /// supervisor is gone.
    pub fn last_call(&mut self, now: Instant, code: i32) {
        let mut requests = Vec::new();
        self.accept(now, &mut requests);
        for i in 0..self.clients.len() {
            if self.clients[i].phase == Phase::Reading
                && let Some(req) = self.read(i, false)
            {
                requests.push((self.clients[i].id, req));
            }
        }
        for (id, req) in requests {
            match req {
                Request::Stop => self.finish(id, true, &format!("exited with status {code}")),
                _ => self.finish(
                    id,
                    false,
                    &format!("the supervisor is exiting (status {code})"),
                ),
            }
        }
    }

    /// Last chance before exit: write what we can without waiting.
    pub fn flush_all(&mut self) {
        for i in 0..self.clients.len() {
            self.flush(i);
        }
    }
}

/// Create, bind (mode 0600) and listen on the control socket at `path`;
/// also returns the file's identity for `Control::on_file_changed`.
fn bind_socket(path: &Path) -> Result<(OwnedFd, (u64, u64))> {
    let shown = path.display();
    let addr = SocketAddrUnix::new(path)
        .map_err(|e| Error::os(format!("use control socket {shown}"), e))?;
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| Error::os("create the control socket", e))?;
    listen::remove_stale_socket(path, &addr).map_err(|why| match why {
        Occupied::Live => Error::msg(
            format!("bind control socket {shown}"),
            "another supervisor answers there (give this one its own --control PATH)",
        ),
        other => Error::msg(format!("bind control socket {shown}"), other.to_string()),
    })?;
    // umask makes the socket 0600 from the start: a chmod after bind
    // would leave a window. We are single-threaded, so this is safe.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = net::bind(&fd, &addr);
    rustix::process::umask(old);
    bound.map_err(|e| Error::os(format!("bind control socket {shown}"), e))?;
    let listening = net::listen(&fd, 256)
        .map_err(|e| Error::os(format!("listen on control socket {shown}"), e))
        .and_then(|()| {
            file_id(path).ok_or_else(|| Error::msg(format!("stat {shown}"), "it is gone"))
        });
    match listening {
        Ok(file) => Ok((fd, file)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// (st_dev, st_ino) of what is at `path` now.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// An inotify descriptor that becomes readable when the file at `path`
/// loses a link (unlink, rename over it: IN_ATTRIB), is moved, or goes.
/// None if inotify is not available: then nothing is watched.
fn watch_file(path: &Path) -> Option<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok()?;
    let flags = WatchFlags::ATTRIB | WatchFlags::DELETE_SELF | WatchFlags::MOVE_SELF;
    inotify::add_watch(&fd, path, flags).ok()?;
    Some(fd)
}
