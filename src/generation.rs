//! One generation: a started worker and everything in its process group,
//! with its state, its deadline and what it told us.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use rustix::process::WaitStatus;

use crate::notify::NotifySocket;
use crate::signals;
use crate::spawn::Child;
use crate::sys;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn from_wait(status: WaitStatus) -> Exit {
        match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(1),
        }
    }

    /// Shell convention: the code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "status {c}"),
            Exit::Signal(s) => write!(f, "signal {}", signals::name(*s)),
        }
    }
}

/// SPEC §1: starting → ready (active) → draining → exited; a generation
/// that fails before readiness is `Failed` while it is being stopped.
/// "Exited" is not a state here: it is `exit.is_some()`, and a generation
/// leaves the table once its worker is reaped and its group is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    Draining,
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Failed => "failed",
        }
    }
}

#[derive(Debug)]
pub struct Generation {
    pub n: u64,
    pub pid: i32,
    /// Wakes the loop when the worker exits; dropped once it is reaped.
    pub pidfd: Option<OwnedFd>,
    /// The exec-report pipe, until the child exec'd or said why not.
    pub exec_report: Option<OwnedFd>,
    /// A signal for the group that came before the exec: the child drops
    /// signals that were pending before its `setpgid`, so it is sent once
    /// the exec is reported.
    pub deferred_signal: Option<i32>,
    pub notify: Option<NotifySocket>,
    pub command: Rc<[OsString]>,
    pub state: State,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    /// Ready deadline while starting; SIGKILL deadline while draining or
    /// failed.
    pub deadline: Option<Instant>,
    /// EXTEND_TIMEOUT_USEC moved `deadline` away from the configured one.
    pub extended: bool,
    /// Why the child never became the worker (`unable to execute …`),
    /// from its exec report: the reason a failed deploy gives.
    pub exec_error: Option<String>,
    /// Last `STATUS=`.
    pub status_text: Option<String>,
    /// Set once the worker is reaped.
    pub exit: Option<Exit>,
    /// Sent `STOPPING=1`: leaving on its own.
    pub leaving: bool,
    /// Malformed notify input was already logged once.
    pub noisy: bool,
    /// A refused sender was already logged once (apart from `noisy`: a
    /// refused uid must not silence this worker's own bad messages).
    pub refused_logged: bool,
    /// ERRNO= and EXTEND_TIMEOUT_USEC= lines still to be logged; past
    /// that they are acted on silently (a worker cannot flood the log).
    pub notify_log_left: u32,
    /// The whole group got SIGKILL: whatever is left in it is dying.
    pub killed: bool,
}

/// ERRNO= and EXTEND_TIMEOUT_USEC= lines logged per generation.
const NOTIFY_LOG_LINES: u32 = 64;

impl Generation {
    /// Generation `n`, just spawned as `child` and starting: ready by
    /// `ready_deadline` or failed.
    pub fn new(
        n: u64,
        child: Child,
        notify: NotifySocket,
        command: Rc<[OsString]>,
        now: Instant,
        ready_deadline: Option<Instant>,
    ) -> Generation {
        Generation {
            n,
            pid: child.pid,
            pidfd: Some(child.pidfd),
            exec_report: Some(child.exec_report),
            deferred_signal: None,
            notify: Some(notify),
            command,
            state: State::Starting,
            started: now,
            ready_at: None,
            deadline: ready_deadline,
            extended: false,
            exec_error: None,
            status_text: None,
            exit: None,
            leaving: false,
            noisy: false,
            refused_logged: false,
            notify_log_left: NOTIFY_LOG_LINES + 1,
            killed: false,
        }
    }

    /// Whether one more ERRNO=/EXTEND_TIMEOUT_USEC= line may be logged;
    /// says so once when the allowance runs out.
    pub fn may_log_notify(&mut self) -> bool {
        match self.notify_log_left {
            0 => false,
            1 => {
                self.notify_log_left = 0;
                crate::info!(
                    "{} sends many ERRNO=/EXTEND_TIMEOUT_USEC= messages; acting on them without logging",
                    self.tag()
                );
                false
            }
            _ => {
                self.notify_log_left -= 1;
                true
            }
        }
    }

    /// "gen 5 pid 1234", the prefix of every log line about it.
    pub fn tag(&self) -> String {
        format!("gen {} pid {}", self.n, self.pid)
    }

    /// Signal the whole process group (the worker is its leader). Falls
    /// back to the worker alone if the group does not exist yet. Before
    /// the exec, only SIGKILL goes out at once; see `deferred_signal`.
    pub fn signal_group(&mut self, sig: i32) {
        if sig != libc::SIGKILL && self.exec_report.is_some() {
            self.deferred_signal = Some(sig);
            return;
        }
        if sys::kill(-self.pid, sig).is_err() && self.exit.is_none() {
            let _ = sys::kill(self.pid, sig);
        }
    }

    /// The stop signal to the group, then SIGCONT, as systemd does: a
    /// worker stopped by a forwarded TTIN/TTOU (or a debugger) would
    /// otherwise hear nothing until its SIGKILL.
    pub fn ask_to_stop(&mut self, sig: i32) {
        self.signal_group(sig);
        if sig != libc::SIGKILL && self.exec_report.is_none() {
            self.signal_group(libc::SIGCONT);
        }
    }

    /// Signal the worker process only (forwarded signals).
    pub fn signal_worker(&self, sig: i32) {
        if self.exit.is_none() {
            let _ = sys::kill(self.pid, sig);
        }
    }

    /// Whether anything is left in the process group. A group id is not
    /// reused while any member lives, so this cannot hit a stranger.
    pub fn group_alive(&self) -> bool {
        match sys::kill(-self.pid, 0) {
            Ok(()) => true,
            Err(e) => e.raw_os_error() != Some(libc::ESRCH),
        }
    }

    /// Whether the worker process is still running (not yet reaped).
    pub fn running(&self) -> bool {
        self.exit.is_none()
    }
}
