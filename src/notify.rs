//! Per-generation notify sockets (`NOTIFY_SOCKET`) and the sd_notify
//! message format. Each generation gets its own socket, so which
//! generation spoke is known from the socket it spoke on, never guessed
//! from a sender pid. Two modes: `dgram` is sd_notify(3)'s; `stream` is
//! for runtimes without unix datagrams (Node.js): connect, write lines,
//! close.
//!
//! Limits (SPEC §4): 4096 bytes per datagram or per stream connection, 5 s
//! of silence closes a stream connection, 16 open stream connections per
//! generation (more wait in the listen backlog). Only root or our own uid
//! is heard. Whatever a worker sends, memory stays bounded and nothing is
//! fatal: bad input comes back as [`Event::Malformed`] for the caller to
//! log once.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix,
    SocketFlags, SocketType, sockopt,
};

use crate::accept::{self, Accepted};
use crate::cli::NotifyMode;

/// Largest message, per datagram or per stream connection.
pub const MAX_MESSAGE: usize = 4096;
/// A stream connection silent this long is closed.
pub const STREAM_IDLE: Duration = Duration::from_secs(5);
/// Open stream connections per generation.
pub const MAX_STREAMS: usize = 16;
/// Ignored keys reported per message; the rest are dropped unreported.
pub const MAX_IGNORED: usize = 16;
/// Datagrams read per poll wakeup, so that a worker flooding its notify
/// socket cannot starve signals, the control socket or other generations.
pub const DATAGRAMS_PER_WAKEUP: usize = 32;

/// One thing a worker told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    Status(String),
    Stopping,
    /// `EXTEND_TIMEOUT_USEC`, in microseconds.
    ExtendTimeout(u64),
    Errno(i32),
    /// A key we do not act on (`MAINPID`, `FDSTORE`, `WATCHDOG`, …).
    Ignored(String),
}

/// What reading a notify socket produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    /// Dropped input, with why.
    Malformed(String),
    /// A sender with another uid.
    Denied(u32),
    /// This many stream connections were closed after [`STREAM_IDLE`] of
    /// silence (what they had sent was parsed first).
    IdleClosed(usize),
}

/// Parse one datagram or one stream line. A chunk with NUL bytes or
/// invalid UTF-8 is dropped whole; a line without `=` is dropped alone.
/// However many lines a datagram holds, it yields at most one
/// [`Event::Malformed`] and [`MAX_IGNORED`] ignored keys; a stream
/// connection is bounded by its 4096 bytes. A flood costs the supervisor
/// CPU, never memory.
pub fn parse(chunk: &[u8], out: &mut Vec<Event>) {
    if chunk.contains(&0) {
        out.push(Event::Malformed("message contains a NUL byte".into()));
        return;
    }
    let Ok(text) = std::str::from_utf8(chunk) else {
        out.push(Event::Malformed("message is not valid UTF-8".into()));
        return;
    };
    let mut first_bad: Option<String> = None;
    let mut bad = 0usize;
    let mut ignored = 0usize;
    // Where this message's event for each acted-on key is: a key repeated
    // in one message yields one event, at its first place, with its last
    // value (sd_notify's "later assignments win").
    let mut seen: [Option<usize>; 5] = [None; 5];
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            bad += 1;
            first_bad.get_or_insert_with(|| format!("line without '=': {:.40}", line));
            continue;
        };
        let msg = match key {
            "READY" if value == "1" => Message::Ready,
            "STOPPING" if value == "1" => Message::Stopping,
            "STATUS" => Message::Status(value.chars().take(200).collect()),
            "EXTEND_TIMEOUT_USEC" => match value.parse::<u64>() {
                // Capped so that `now + n µs` cannot overflow.
                Ok(n) => Message::ExtendTimeout(n.min(crate::cli::MAX_DURATION.as_micros() as u64)),
                Err(_) => {
                    bad += 1;
                    first_bad.get_or_insert_with(|| format!("bad EXTEND_TIMEOUT_USEC={value:.20}"));
                    continue;
                }
            },
            "ERRNO" => match value.parse() {
                Ok(n) => Message::Errno(n),
                Err(_) => {
                    bad += 1;
                    first_bad.get_or_insert_with(|| format!("bad ERRNO={value:.20}"));
                    continue;
                }
            },
            _ => {
                ignored += 1;
                if ignored > MAX_IGNORED {
                    continue;
                }
                Message::Ignored(format!("{:.40}", line))
            }
        };
        let slot = match msg {
            Message::Ready => Some(0),
            Message::Stopping => Some(1),
            Message::Status(_) => Some(2),
            Message::ExtendTimeout(_) => Some(3),
            Message::Errno(_) => Some(4),
            Message::Ignored(_) => None,
        };
        match slot.and_then(|k| seen[k].map(|at| (k, at))) {
            Some((_, at)) => out[at] = Event::Message(msg),
            None => {
                if let Some(k) = slot {
                    seen[k] = Some(out.len());
                }
                out.push(Event::Message(msg));
            }
        }
    }
    if let Some(mut why) = first_bad {
        if bad > 1 {
            why.push_str(&format!(" (and {} more bad line(s))", bad - 1));
        }
        out.push(Event::Malformed(why));
    }
}

/// An accepted stream connection.
#[derive(Debug)]
struct Stream {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Bytes received so far (the 4096 bound is per connection).
    total: usize,
    deadline: Instant,
}

/// A generation's notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    path: PathBuf,
    mode: NotifyMode,
    streams: Vec<Stream>,
    /// Accepting is paused after EMFILE until then.
    paused_until: Option<Instant>,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl NotifySocket {
    /// Create and bind the socket at `path` (inside our 0700 directory).
    pub fn bind(path: &Path, mode: NotifyMode) -> rustix::io::Result<NotifySocket> {
        let _ = std::fs::remove_file(path);
        let kind = match mode {
            NotifyMode::Dgram => SocketType::DGRAM,
            NotifyMode::Stream => SocketType::STREAM,
        };
        let fd = net::socket_with(
            AddressFamily::UNIX,
            kind,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        if mode == NotifyMode::Dgram {
            // Credentials ride along with every datagram; set before bind
            // so that no datagram can arrive without them.
            sockopt::set_socket_passcred(&fd, true)?;
        }
        net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        let sock = NotifySocket {
            fd,
            path: path.to_path_buf(),
            mode,
            streams: Vec::new(),
            paused_until: None,
        };
        if mode == NotifyMode::Stream {
            net::listen(&sock.fd, 128)?;
        }
        Ok(sock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fds to poll for input: the socket itself (unless the stream
    /// limit is reached) and every open stream connection.
    pub fn poll_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> + '_ {
        let accepting = self.streams.len() < MAX_STREAMS && self.paused_until.is_none();
        let listen = (self.mode == NotifyMode::Dgram || accepting).then(|| self.fd.as_fd());
        listen
            .into_iter()
            .chain(self.streams.iter().map(|s| s.fd.as_fd()))
    }

    /// Earliest stream idle deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.streams
            .iter()
            .map(|s| s.deadline)
            .chain(self.paused_until)
            .min()
    }

    /// `fd` became readable (the socket or one of its connections).
    /// Reads at most one datagram, so that the caller can act on its
    /// events before reading the next; true when another may be waiting.
    pub fn on_readable(&mut self, fd: RawFd, now: Instant, out: &mut Vec<Event>) -> bool {
        if fd == self.fd.as_raw_fd() {
            match self.mode {
                NotifyMode::Dgram => return self.receive_datagram(out),
                NotifyMode::Stream => self.accept_streams(now, out),
            }
        } else if let Some(i) = self.streams.iter().position(|s| s.fd.as_raw_fd() == fd)
            && !self.read_stream(i, now, out)
        {
            self.streams.swap_remove(i);
        }
        false
    }

    /// Close stream connections silent past their deadline.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Event>) {
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
        }
        let before = self.streams.len();
        self.streams.retain_mut(|s| {
            if s.deadline > now {
                return true;
            }
            // Closed for silence is closed: what came before counts, as at
            // EOF (sd_notify senders write no final newline).
            let rest = std::mem::take(&mut s.buf);
            if !rest.is_empty() {
                parse(&rest, out);
            }
            false
        });
        if self.streams.len() < before {
            out.push(Event::IdleClosed(before - self.streams.len()));
        }
    }

    /// Read one datagram; false when there was none.
    fn receive_datagram(&mut self, out: &mut Vec<Event>) -> bool {
        let mut buf = [0u8; MAX_MESSAGE];
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16), ScmCredentials(1))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = net::recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            );
            let msg = match got {
                Ok(m) => m,
                Err(Errno::INTR) => continue,
                Err(_) => return false, // EAGAIN: drained
            };
            let mut uid = None;
            for c in control.drain() {
                // Passed fds (FDSTORE=1 and the like) are dropped: closed.
                if let RecvAncillaryMessage::ScmCredentials(cred) = c {
                    uid = Some(cred.uid.as_raw());
                }
            }
            match uid {
                Some(u) if accept::allowed(u) => {}
                Some(u) => out.push(Event::Denied(u)),
                None => out.push(Event::Malformed("datagram without credentials".into())),
            }
            if uid.is_some_and(accept::allowed) {
                if msg.bytes > MAX_MESSAGE {
                    out.push(Event::Malformed(format!(
                        "datagram of {} bytes (limit {MAX_MESSAGE})",
                        msg.bytes
                    )));
                } else {
                    parse(&buf[..msg.bytes], out);
                }
            }
            return true;
        }
    }

    fn accept_streams(&mut self, now: Instant, out: &mut Vec<Event>) {
        while self.streams.len() < MAX_STREAMS {
            let fd = match accept::next(&self.fd) {
                Accepted::Peer(fd) => fd,
                Accepted::Stranger { uid, .. } => {
                    out.push(Event::Denied(uid));
                    continue;
                }
                Accepted::Exhausted(e) => {
                    out.push(Event::Malformed(format!(
                        "unable to accept a notify connection: {}",
                        crate::error::os_text(e)
                    )));
                    self.paused_until = Some(now + accept::PAUSE);
                    return;
                }
                Accepted::None => return,
            };
            self.streams.push(Stream {
                fd,
                buf: Vec::new(),
                total: 0,
                deadline: now + STREAM_IDLE,
            });
        }
    }

    /// Read what is there; false when the connection is done.
    fn read_stream(&mut self, i: usize, now: Instant, out: &mut Vec<Event>) -> bool {
        let s = &mut self.streams[i];
        let mut chunk = [0u8; 1024];
        loop {
            match rustix::io::read(&s.fd, &mut chunk) {
                Ok(0) => {
                    let rest = std::mem::take(&mut s.buf);
                    if !rest.is_empty() {
                        parse(&rest, out);
                    }
                    return false;
                }
                Ok(n) => {
                    // Silence is counted from the last bytes received.
                    s.deadline = now + STREAM_IDLE;
                    s.total += n;
                    if s.total > MAX_MESSAGE {
                        out.push(Event::Malformed(format!(
                            "notify connection sent more than {MAX_MESSAGE} bytes"
                        )));
                        return false;
                    }
                    s.buf.extend_from_slice(&chunk[..n]);
                    // Act on complete lines now: a sender that writes
                    // READY=1 and keeps the connection open is still heard.
                    // Each line on its own, so that what is dropped with a
                    // bad line never depends on how the reads fell.
                    if let Some(end) = s.buf.iter().rposition(|&b| b == b'\n') {
                        let lines: Vec<u8> = s.buf.drain(..=end).collect();
                        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                            parse(line, out);
                        }
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return true,
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(b: &[u8]) -> Vec<Event> {
        let mut v = Vec::new();
        parse(b, &mut v);
        v
    }

    #[test]
    fn keys() {
        assert_eq!(
            parsed(b"READY=1\nSTATUS=warming up\n"),
            [
                Event::Message(Message::Ready),
                Event::Message(Message::Status("warming up".into()))
            ]
        );
        assert_eq!(
            parsed(b"EXTEND_TIMEOUT_USEC=5000000"),
            [Event::Message(Message::ExtendTimeout(5_000_000))]
        );
        assert_eq!(
            parsed(b"MAINPID=4"),
            [Event::Message(Message::Ignored("MAINPID=4".into()))]
        );
        assert_eq!(
            parsed(b"READY=0"),
            [Event::Message(Message::Ignored("READY=0".into()))]
        );
    }

    #[test]
    fn garbage_is_dropped() {
        assert!(matches!(parsed(b"READY=1\0")[..], [Event::Malformed(_)]));
        assert!(matches!(parsed(b"\xffREADY=1")[..], [Event::Malformed(_)]));
        assert!(matches!(
            parsed(b"garbage\nREADY=1")[..],
            [Event::Message(Message::Ready), Event::Malformed(_)]
        ));
    }

    #[test]
    fn a_flood_of_lines_makes_few_events() {
        let junk = b"a\n".repeat(MAX_MESSAGE / 2);
        assert_eq!(
            parsed(&junk),
            [Event::Malformed(format!(
                "line without '=': a (and {} more bad line(s))",
                MAX_MESSAGE / 2 - 1
            ))]
        );
        let keys = b"X=1\n".repeat(MAX_MESSAGE / 4);
        assert_eq!(parsed(&keys).len(), MAX_IGNORED);
        let errnos = b"ERRNO=1\n".repeat(MAX_MESSAGE / 8 - 1);
        assert_eq!(
            parsed(&[&errnos[..], b"ERRNO=5\nREADY=1"].concat()),
            [
                Event::Message(Message::Errno(5)),
                Event::Message(Message::Ready)
            ]
        );
    }
}
