//! The client commands: `deploy`, `rollback`, `status` and `stop` speak
//! the control protocol (see `protocol`) to a running supervisor and turn
//! its answer into output and an exit code: 0 done, 1 failed, 3 nobody
//! answers at the control path.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control;
use crate::protocol;

/// Exit code when no supervisor answers.
pub const NO_SUPERVISOR: i32 = 3;

/// How long a supervisor may take to say anything at all.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

enum Outcome {
    Ok(String),
    Failed(String),
    /// Closed on before a single reply line: the supervisor was exiting
    /// and had stopped accepting (the kernel reset what was still in its
    /// backlog). No supervisor answered, exit 3, but for `stop` that is
    /// what it asked for.
    Gone(String),
}

pub fn deploy(
    control: Option<PathBuf>,
    timeout: Option<Duration>,
    command: Option<Vec<OsString>>,
) -> i32 {
    let req = protocol::encode_request("deploy", None, command.as_deref());
    finish(exchange(control, &req, timeout, &mut |kind, text| {
        if kind == "progress" {
            crate::log::out(text);
        }
    }))
}

pub fn rollback(control: Option<PathBuf>) -> i32 {
    let req = protocol::encode_request("rollback", None, None);
    finish(exchange(control, &req, None, &mut |kind, text| {
        if kind == "progress" {
            crate::log::out(text);
        }
    }))
}

pub fn status(control: Option<PathBuf>, json: bool, check: bool) -> i32 {
    let param = match (json, check) {
        (true, true) => "json-check",
        (true, false) => "json",
        (false, true) => "check",
        (false, false) => "text",
    };
    let req = protocol::encode_request("status", Some(param), None);
    let mut data = false;
    let result = exchange(
        control,
        &req,
        Some(Duration::from_secs(30)),
        &mut |kind, text| {
            if kind == "data" {
                data = true;
                crate::log::out(text);
            }
        },
    );
    if !check {
        return finish(result);
    }
    // A health check: the verdict whichever way it goes, on stdout; after
    // the JSON object, only in the exit status. An error that came instead
    // of the object (a supervisor too old for json-check) is an error.
    match (json, data, &result) {
        (false, _, Ok(Outcome::Ok(text) | Outcome::Failed(text))) => crate::log::out(text),
        (true, false, Ok(Outcome::Failed(_))) => return finish(result),
        _ => {}
    }
    match result {
        Ok(Outcome::Ok(_)) => 0,
        Ok(Outcome::Failed(_)) => 1,
        other => finish(other),
    }
}

pub fn stop(control: Option<PathBuf>) -> i32 {
    let req = protocol::encode_request("stop", None, None);
    let mut supervisor = None;
    let result = exchange_with(control, &req, None, &mut |_, _| {}, &mut |stream| {
        // Learn who answers so that we can wait for it to be gone: the
        // last line comes just before the supervisor exits, not after.
        supervisor = crate::sys::peer_cred(stream.as_fd())
            .ok()
            .and_then(|(pid, _)| rustix::process::Pid::from_raw(pid))
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            });
    });
    match result {
        Ok(Outcome::Ok(text)) => {
            if let Some(pidfd) = &supervisor {
                crate::reap::pidfd_exited(pidfd, None);
            }
            // "exited with status N": the supervisor's own exit status.
            crate::log::out(&format!("supervisor {text}"));
            0
        }
        // It closed without a word: it was already exiting (another stop,
        // a signal). What we asked for happens; its status is not ours to
        // hear. Bounded: a supervisor that lingers was not exiting.
        // Without a pidfd (its pid is not visible here: another PID
        // namespace) the close alone says it: a supervisor closes on a
        // client without a word only when it exits.
        Ok(Outcome::Gone(_))
            if supervisor
                .as_ref()
                .is_none_or(|p| crate::reap::pidfd_exited(p, Some(Duration::from_secs(30)))) =>
        {
            crate::log::out("supervisor exited (it was already exiting; status not reported)");
            0
        }
        other => finish(other),
    }
}

fn finish(r: Result<Outcome, (i32, String)>) -> i32 {
    match r {
        Ok(Outcome::Ok(text)) => {
            if !text.is_empty() {
                crate::log::out(&text);
            }
            0
        }
        Ok(Outcome::Failed(text)) => {
            crate::log::line(format_args!("{text}"));
            1
        }
        Ok(Outcome::Gone(text)) => {
            crate::log::line(format_args!("{text}"));
            NO_SUPERVISOR
        }
        Err((code, text)) => {
            crate::log::line(format_args!("{text}"));
            code
        }
    }
}

/// Send one request and read reply lines until `ok`/`error`, passing
/// `progress` and `data` lines to `each` as they arrive.
fn exchange(
    path: Option<PathBuf>,
    request: &[u8],
    timeout: Option<Duration>,
    each: &mut dyn FnMut(&str, &str),
) -> Result<Outcome, (i32, String)> {
    exchange_with(path, request, timeout, each, &mut |_| {})
}

/// Connect to the control socket at `path` (the default path when
/// None) within the first-reply deadline, and check that whoever listens
/// there is root or us. Also returns the path as shown in messages.
fn connect_checked(
    path: Option<PathBuf>,
    timeout: Option<Duration>,
) -> Result<(UnixStream, String), (i32, String)> {
    let path = path.unwrap_or_else(control::default_path);
    let shown = crate::log::printable(&path.to_string_lossy());
    // A stuck supervisor's full backlog would hold connect(2) for ever:
    // connecting is bounded like the first reply (and by --timeout).
    let connect_within = timeout.map_or(ACK_TIMEOUT, |t| t.min(ACK_TIMEOUT));
    let stream = connect(&path, Some(connect_within)).map_err(|e| {
        (
            NO_SUPERVISOR,
            format!(
                "no supervisor answers at {shown}: {}",
                crate::error::os_message(&e)
            ),
        )
    })?;
    // Whoever listens at a shared path (the /tmp fallback) must be root
    // or us before it hears our request or we believe its answer.
    let me = rustix::process::geteuid().as_raw();
    match crate::sys::peer_cred(stream.as_fd()) {
        Ok((_, uid)) if uid == 0 || uid == me || me == 0 => {}
        Ok((_, uid)) => {
            return Err((
                NO_SUPERVISOR,
                format!(
                    "refusing to talk to {shown}: what listens there runs as uid {uid}, \
                     neither root nor uid {me}"
                ),
            ));
        }
        Err(e) => {
            return Err((
                NO_SUPERVISOR,
                format!(
                    "no supervisor answers at {shown}: unable to read its credentials: {}",
                    crate::error::os_message(&e)
                ),
            ));
        }
    }
    Ok((stream, shown))
}

/// [`exchange`], calling `connected` with the stream first.
fn exchange_with(
    path: Option<PathBuf>,
    request: &[u8],
    timeout: Option<Duration>,
    each: &mut dyn FnMut(&str, &str),
    connected: &mut dyn FnMut(&UnixStream),
) -> Result<Outcome, (i32, String)> {
    let (stream, shown) = connect_checked(path, timeout)?;
    let lost = |e: std::io::Error| {
        (
            1,
            format!(
                "connection to {shown} lost: {}",
                crate::error::os_message(&e)
            ),
        )
    };
    connected(&stream);
    // A live supervisor answers every request at once (a progress line or
    // the result), so one that says nothing for ACK_TIMEOUT is stuck
    // (stopped, frozen): that is no supervisor answering, exit 3.
    let ack_by = Instant::now() + ACK_TIMEOUT;
    let _ = stream.set_write_timeout(Some(ACK_TIMEOUT));
    // A refused peer gets one `error` line and a closed connection, maybe
    // before our request is written: on a write error, still read it.
    let write_error = (&stream).write_all(request).err();
    let give_up = timeout.map(|t| (Instant::now() + t, t));
    let mut reader = BufReader::new(&stream);
    let mut line = Vec::new();
    let unanswered = || {
        Outcome::Gone(format!(
            "no supervisor answers at {shown}: it closed the connection without a reply"
        ))
    };
    let mut replied = false;
    loop {
        let now = Instant::now();
        if !replied && now >= ack_by {
            return Err((
                NO_SUPERVISOR,
                format!(
                    "no supervisor answers at {shown}: no reply within {}",
                    crate::cli::format_duration(ACK_TIMEOUT)
                ),
            ));
        }
        if let Some((at, t)) = give_up
            && now >= at
        {
            return Err((
                1,
                format!(
                    "gave up waiting after {} (the supervisor carries on)",
                    crate::cli::format_duration(t)
                ),
            ));
        }
        // Wait for the next line until the nearer deadline, or for ever.
        let until = [(!replied).then_some(ack_by), give_up.map(|(at, _)| at)]
            .into_iter()
            .flatten()
            .min();
        stream
            .set_read_timeout(until.map(|d| (d - now).max(Duration::from_millis(1))))
            .map_err(lost)?;
        // A line cut short by a read timeout is continued, not dropped.
        if line.ends_with(b"\n") {
            line.clear();
        }
        // No reply line is longer than the supervisor queues for a client.
        let room = protocol::MAX_OUTPUT.saturating_sub(line.len());
        match std::io::Read::take(&mut reader, room as u64).read_until(b'\n', &mut line) {
            Ok(_) if line.len() >= protocol::MAX_OUTPUT && !line.ends_with(b"\n") => {
                return Err((
                    1,
                    format!(
                        "the supervisor at {shown} sent a reply line longer than {} KiB",
                        protocol::MAX_OUTPUT / 1024
                    ),
                ));
            }
            Ok(0) if !replied => return Ok(unanswered()),
            Ok(0) if write_error.is_some() => {
                return Err(lost(write_error.expect("checked")));
            }
            Ok(0) => {
                return Err((
                    1,
                    format!("the supervisor at {shown} closed the connection without a result"),
                ));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if !replied && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(unanswered());
            }
            Err(e) => return Err(lost(write_error.unwrap_or(e))),
        }
        replied = true;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\n');
        let (kind, rest) = text.split_once(' ').unwrap_or((text, ""));
        match kind {
            "ok" => return Ok(Outcome::Ok(rest.to_string())),
            "error" => return Ok(Outcome::Failed(rest.to_string())),
            _ => each(kind, rest),
        }
    }
}

/// Connect to `path`; with a timeout, a supervisor whose backlog is full
/// (stuck) is given up on after it, as unix connect(2) honours
/// SO_SNDTIMEO.
fn connect(path: &Path, timeout: Option<Duration>) -> std::io::Result<UnixStream> {
    use rustix::net::{self, AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    if let Some(t) = timeout {
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(t))?;
    }
    net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    if timeout.is_some() {
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, None)?;
    }
    Ok(UnixStream::from(fd))
}
