//! The event loop and the deploy state machine of SPEC §5.
//!
//! One thread, one `poll(2)` over: the signalfd, each generation's pidfd,
//! exec-report pipe (until it exec'd) and notify socket (with its stream
//! connections), the control socket with its clients and its inotify
//! watch, the upward NOTIFY_SOCKET while a message waits to be sent, and
//! the listeners (for a hang-up only). Every timer is a deadline folded
//! into poll's timeout, so an idle supervisor sleeps in poll with no
//! timeout at all.
//!
//! Events and their handlers:
//!
//! | event                         | handler          |
//! |-------------------------------|------------------|
//! | SIGHUP, `deploy`, STOPPING=1  | `request_deploy` |
//! | child exec'd or could not     | `on_exec_report` |
//! | READY=1 from a starting gen   | `promote`        |
//! | worker reaped                 | `on_exit`        |
//! | ready deadline                | `fail_deploy`    |
//! | drain/kill deadline           | `kill_overdue`   |
//! | restart backoff deadline      | `start_deploy`   |
//! | SIGTERM/SIGINT, `stop`        | `begin_stop`     |
//! | a control request             | `on_request`     |
//! | a notify message              | `on_notify_event`|
//! | a listener hung up            | `on_listener_hang_up` |
//! | relisten deadline             | `relisten`       |
//!
//! Past start-up nothing here is fatal: a misbehaving worker or client
//! is logged and its generation or connection changes state.
//!
//! The stop (`stop`), control requests (`requests`), what workers say on
//! their notify sockets (`messages`) and the repair of listeners a worker
//! shut down (`listeners`) are `Supervisor` methods in child modules of
//! their own; `status` renders the supervisor's state for `status`.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::cli::{OnCrash, RunConfig, format_duration};
use crate::control::{self, ClientId, Control};
use crate::generation::{Exit, Generation, State};
use crate::listen::Listener;
use crate::notify::NotifySocket;
use crate::reap;
use crate::rundir::RunDir;
use crate::signals::{self, Signals};
use crate::spawn;
use crate::upstream::Upstream;
use crate::{debug, info, warn};

mod listeners;
mod messages;
mod requests;
mod status;
mod stop;

use stop::{StopCause, Stopping};

/// First crash-restart delay; doubles up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Readiness this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// How long to wait before polling again after poll itself failed.
const POLL_RETRY: Duration = Duration::from_millis(100);

/// How long a failed new generation gets between stop signal and SIGKILL.
const FAILED_GRACE: Duration = Duration::from_secs(5);

/// Signals passed on to the active worker (SPEC §7).
const FORWARDED: [i32; 6] = [
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
    libc::SIGWINCH,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Why a deploy started, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Boot,
    Sighup,
    Control,
    CrashRestart,
    Replace,
}

impl Origin {
    /// Asked for by someone (counted as a deploy), not boot or restart.
    fn is_requested(self) -> bool {
        matches!(self, Origin::Sighup | Origin::Control | Origin::Replace)
    }

    fn name(self) -> &'static str {
        match self {
            Origin::Boot => "start",
            Origin::Sighup => "SIGHUP",
            Origin::Control => "control socket",
            Origin::CrashRestart => "crash restart",
            Origin::Replace => "STOPPING=1 from the active generation",
        }
    }
}

/// The deploy under way.
struct Deploy {
    n: u64,
    origin: Origin,
    waiters: Vec<ClientId>,
}

/// What a deploy runs: resolved when it starts, not when it is asked
/// for, so a queued rollback goes back from what is current by then.
#[derive(Clone)]
enum Target {
    /// The current command (SIGHUP, `deploy` without a command, restarts).
    Current,
    /// A new command given to `deploy`.
    Command(Rc<[OsString]>),
    /// The command current before the last command change.
    Rollback,
}

/// Deploy requests that arrived while one ran, collapsed into one.
impl Target {
    /// What the log calls the request.
    fn verb(&self) -> &'static str {
        match self {
            Target::Current | Target::Command(_) => "deploy",
            Target::Rollback => "rollback",
        }
    }
}

struct Queued {
    target: Target,
    origin: Origin,
    waiters: Vec<ClientId>,
}

#[derive(Default)]
struct Counters {
    deploys_ok: u64,
    deploys_failed: u64,
    crash_restarts: u64,
}

/// Where a poll entry came from.
#[derive(Clone, Copy)]
enum Source {
    Signals,
    Pidfd(u64),
    ExecReport(u64),
    Notify(u64, RawFd),
    Control(control::Token),
    Upstream,
    /// A listening socket reported a hang-up: a worker shut it down.
    Listener(usize),
}

pub struct Supervisor {
    cfg: RunConfig,
    listeners: Vec<Listener>,
    fd_names: String,
    signals: Signals,
    rundir: RunDir,
    upstream: Option<Upstream>,
    control: Option<Control>,
    base_env: Vec<(OsString, OsString)>,
    drain_grace_ms: Option<u64>,
    started: Instant,

    gens: Vec<Generation>,
    next_gen: u64,
    active: Option<u64>,
    deploy: Option<Deploy>,
    queued: Option<Queued>,
    restart_at: Option<Instant>,
    /// A replacement asked for (STOPPING=1) by a generation ready for
    /// less than 10 s waits until then, with the crash backoff: a worker
    /// that asks at once, every time, cannot spawn without bound.
    replace_at: Option<Instant>,
    /// How the last active generation ended, while nothing has replaced
    /// it: a stop then exits with that status (SPEC §7), not 0.
    crashed: Option<Exit>,
    backoff: Duration,
    /// Since when some generation has been serving without a gap (a
    /// deploy is no gap); a crash that ends a stretch of 10 s or more
    /// restarts with the shortest backoff.
    serving_since: Option<Instant>,
    current_cmd: Rc<[OsString]>,
    previous_cmd: Option<Rc<[OsString]>>,
    booted: bool,
    stop: Option<Stopping>,
    /// Children that left their generation's group (see
    /// `report_strays`), each logged once.
    known_strays: Vec<i32>,
    /// When to try again the TCP listeners that could not listen again.
    relisten_at: Option<Instant>,
    /// poll(2) itself failed last turn (logged once per episode).
    poll_failing: std::cell::Cell<bool>,
    /// Process groups that got SIGKILL after their generation was let go:
    /// what is left in them is dying, not a stray.
    killed_groups: Vec<i32>,
    /// Exit status decided by an event (boot failure, `--on-crash exit`).
    exit_code: Option<i32>,
    counters: Counters,
    last_failure: Option<String>,
}

/// Everything start-up prepared, handed to the loop.
pub struct Parts {
    pub cfg: RunConfig,
    pub listeners: Vec<Listener>,
    pub signals: Signals,
    pub rundir: RunDir,
    pub upstream: Option<Upstream>,
    pub control: Option<Control>,
}

impl Supervisor {
    pub fn new(p: Parts) -> Supervisor {
        let fd_names = p
            .listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":");
        let drain_ms = p.cfg.drain_timeout.as_millis() as u64;
        let drain_grace_ms = std::env::var_os("DRAIN_GRACE_MS")
            .is_none()
            .then(|| drain_ms.saturating_sub(2000).max(drain_ms / 2));
        let current_cmd: Rc<[OsString]> = p.cfg.command.clone().into();
        Supervisor {
            cfg: p.cfg,
            listeners: p.listeners,
            fd_names,
            signals: p.signals,
            rundir: p.rundir,
            upstream: p.upstream,
            control: p.control,
            base_env: spawn::base_environment(),
            drain_grace_ms,
            started: Instant::now(),
            gens: Vec::new(),
            next_gen: 1,
            active: None,
            deploy: None,
            queued: None,
            restart_at: None,
            replace_at: None,
            crashed: None,
            backoff: BACKOFF_MIN,
            serving_since: None,
            current_cmd,
            previous_cmd: None,
            booted: false,
            stop: None,
            known_strays: Vec::new(),
            relisten_at: None,
            poll_failing: std::cell::Cell::new(false),
            killed_groups: Vec::new(),
            exit_code: None,
            counters: Counters::default(),
            last_failure: None,
        }
    }

    /// Start the first generation and run until stopped; the exit status.
    pub fn run(mut self) -> i32 {
        self.start_deploy(Target::Current, Origin::Boot, Vec::new(), Instant::now());
        loop {
            if let Some(code) = self.finished() {
                info!("exiting with status {code}");
                if let Some(c) = self.control.as_mut() {
                    let waiters = self.stop.as_mut().map(|s| std::mem::take(&mut s.waiters));
                    for id in waiters.unwrap_or_default() {
                        c.finish(id, true, &format!("exited with status {code}"));
                    }
                    c.last_call(Instant::now(), code);
                    c.flush_all();
                }
                return code;
            }
            self.turn();
        }
    }

    /// One poll and everything it reported.
    fn turn(&mut self) {
        let now = Instant::now();
        let timeout = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        let fired = self.wait(timeout);
        let now = Instant::now();
        let mut reap = false;
        let mut exited_gens = Vec::new();
        for (source, flags) in fired {
            match source {
                Source::Notify(n, fd) => self.on_notify(n, fd, now),
                Source::Pidfd(n) => {
                    reap = true;
                    exited_gens.push(n);
                }
                Source::ExecReport(n) => self.on_exec_report(n),
                Source::Signals => reap |= self.on_signals(now),
                Source::Control(token) => self.on_control(token, flags, now),
                Source::Upstream => self.upstream.iter().for_each(Upstream::flush),
                Source::Listener(i) => self.on_listener_hang_up(i, flags, now),
            }
        }
        if reap {
            self.reap(now);
        }
        // Backstop: a pidfd said exited but waitpid had nothing (someone
        // made the kernel auto-reap). Without this the pidfd would stay
        // readable and the loop would spin.
        for n in exited_gens {
            if let Some(pid) = self
                .gens
                .iter()
                .find(|g| g.n == n && g.running())
                .map(|g| g.pid)
                && reap::lost(pid)
            {
                warn!(
                    "{} exited but its status was lost (was SIGCHLD ignored?)",
                    self.tag(n)
                );
                self.on_exit(n, Exit::Code(1), now);
                self.sweep();
            }
        }
        self.expire(Instant::now());
    }

    fn wait(&self, timeout: Option<Duration>) -> Vec<(Source, PollFlags)> {
        let mut fds = Vec::with_capacity(8);
        let mut sources = Vec::with_capacity(8);
        fds.push(PollFd::new(&self.signals.fd, PollFlags::IN));
        sources.push(Source::Signals);
        for g in &self.gens {
            if let Some(p) = &g.pidfd {
                fds.push(PollFd::new(p, PollFlags::IN));
                sources.push(Source::Pidfd(g.n));
            }
            if let Some(p) = &g.exec_report {
                fds.push(PollFd::new(p, PollFlags::IN));
                sources.push(Source::ExecReport(g.n));
            }
            if let Some(ns) = &g.notify {
                for fd in ns.poll_fds() {
                    sources.push(Source::Notify(g.n, fd.as_raw_fd()));
                    fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
                }
            }
        }
        if let Some(c) = &self.control {
            for (token, fd, flags) in c.poll_fds() {
                sources.push(Source::Control(token));
                fds.push(PollFd::from_borrowed_fd(fd, flags));
            }
        }
        if let Some(fd) = self.upstream.as_ref().and_then(Upstream::poll_fd) {
            sources.push(Source::Upstream);
            fds.push(PollFd::from_borrowed_fd(fd, PollFlags::OUT));
        }
        // Never readable for us (we do not accept): only a hang-up (a TCP
        // listener shut down) or RDHUP (a unix one) is reported.
        for (i, l) in self.listeners.iter().enumerate() {
            if !l.unwatched {
                sources.push(Source::Listener(i));
                fds.push(PollFd::new(&l.fd, PollFlags::RDHUP));
            }
        }
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        });
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) => {}
            Err(Errno::INTR) => return Vec::new(),
            Err(e) => {
                // ENOMEM, or a poll set the kernel refuses: nothing here
                // clears it, so pause rather than spin, and say it once.
                if !self.poll_failing.replace(true) {
                    warn!(
                        "poll failed: {}; retrying every {}",
                        crate::error::os_text(e),
                        format_duration(POLL_RETRY)
                    );
                }
                let pause = Timespec {
                    tv_sec: 0,
                    tv_nsec: POLL_RETRY.subsec_nanos() as _,
                };
                let _ = poll(&mut [], Some(&pause));
                return Vec::new();
            }
        }
        self.poll_failing.set(false);
        fds.iter()
            .zip(sources)
            .filter(|(fd, _)| !fd.revents().is_empty())
            .map(|(fd, s)| (s, fd.revents()))
            .collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let gens = self.gens.iter().flat_map(|g| {
            let stream = g.notify.as_ref().and_then(|n| n.deadline());
            g.deadline.into_iter().chain(stream)
        });
        let orphans = self.stop.as_ref().and_then(|s| s.orphan_deadline);
        let control = self.control.as_ref().and_then(|c| c.deadline());
        gens.chain(self.restart_at)
            .chain(self.replace_at)
            .chain(self.relisten_at)
            .chain(orphans)
            .chain(control)
            .min()
    }

    fn gen_mut(&mut self, n: u64) -> Option<&mut Generation> {
        self.gens.iter_mut().find(|g| g.n == n)
    }

    fn tag(&self, n: u64) -> String {
        self.gens
            .iter()
            .find(|g| g.n == n)
            .map_or_else(|| format!("gen {n}"), Generation::tag)
    }

    // ---- signals -------------------------------------------------------

    /// Returns whether to reap.
    fn on_signals(&mut self, now: Instant) -> bool {
        let mut reap = false;
        for sig in self.signals.read() {
            match sig {
                libc::SIGCHLD => reap = true,
                libc::SIGHUP => self.request_deploy(Target::Current, Origin::Sighup, None, now),
                libc::SIGTERM | libc::SIGINT => self.begin_stop(StopCause::Signal(sig), now),
                s if FORWARDED.contains(&s) => match self.active_gen() {
                    Some(g) => {
                        debug!("{} forwarding {}", g.tag(), signals::name(s));
                        g.signal_worker(s);
                    }
                    None => info!("{} not forwarded: no active generation", signals::name(s)),
                },
                s => debug!("ignoring {}", signals::name(s)),
            }
        }
        reap
    }

    // ---- deploys -------------------------------------------------------

    fn request_deploy(
        &mut self,
        target: Target,
        origin: Origin,
        waiter: Option<ClientId>,
        now: Instant,
    ) {
        if self.stop.is_some() {
            if let Some(id) = waiter {
                self.conclude(vec![id], false, "the supervisor is stopping");
            }
            return;
        }
        if let Some(d) = &self.deploy {
            if origin == Origin::Replace {
                // The deploy under way replaces the leaving generation when
                // it succeeds; if it fails, deploy_failed starts another.
                let leaving = self.active.map_or_else(String::new, |n| self.tag(n));
                info!("{} will replace {leaving}, which is leaving", self.tag(d.n));
                return;
            }
            // Logged once per queued deploy: a storm of SIGHUPs (which
            // any worker can send) is one line, not one per signal.
            let line = format!(
                "{} requested ({}); queued behind gen {}",
                target.verb(),
                origin.name(),
                d.n
            );
            // A new command or a rollback changes what the queued deploy
            // will run: always worth a line.
            if self.queued.is_none() || !matches!(target, Target::Current) {
                info!("{line}");
            } else {
                debug!("{line} (collapsed into the one already queued)");
            }
            let q = self.queued.get_or_insert(Queued {
                target: Target::Current,
                origin,
                waiters: Vec::new(),
            });
            // The newest request's command wins (SPEC §5.4); a request for
            // "the current command" (SIGHUP, `deploy` alone) does not erase
            // a new command or a rollback someone is waiting to see.
            if !matches!(target, Target::Current) {
                q.target = target;
            }
            q.origin = origin;
            // Clients that went away are no longer waiting: the list stays
            // bounded by the control socket's client limit.
            let control = self.control.as_ref();
            q.waiters
                .retain(|&id| control.is_some_and(|c| c.waiting(id)));
            q.waiters.extend(waiter);
            if let Some(id) = waiter {
                self.tell(id, "deploy queued behind the one under way");
            }
            return;
        }
        info!("{} requested ({})", target.verb(), origin.name());
        self.start_deploy(target, origin, waiter.into_iter().collect(), now);
    }

    fn start_deploy(
        &mut self,
        target: Target,
        origin: Origin,
        waiters: Vec<ClientId>,
        now: Instant,
    ) {
        let command = match target {
            Target::Current => self.current_cmd.clone(),
            Target::Command(c) => c,
            Target::Rollback => match self.previous_cmd.clone() {
                Some(c) => {
                    let line = format!("rolling back to: {}", crate::log::shell_words(&c));
                    for &id in &waiters {
                        self.tell(id, &line);
                    }
                    c
                }
                None => {
                    info!("rollback refused: the command has not changed since start");
                    self.conclude(
                        waiters,
                        false,
                        "nothing to roll back to: the command has not changed since start",
                    );
                    return self.next_queued(now);
                }
            },
        };
        self.restart_at = None;
        self.replace_at = None;
        let n = self.next_gen;
        self.next_gen += 1;
        // Before anything can fail: a deploy that fails before its worker
        // exists (env file, socket, fork) still ends with READY=1 upstream.
        if let Some(u) = self.upstream_booted() {
            u.reloading();
        }
        let notify_path = self.rundir.socket_path(&format!("notify.{n}"));
        let notify = match NotifySocket::bind(&notify_path, self.cfg.notify_mode) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!(
                    "unable to create notify socket {}: {}",
                    crate::log::printable(&notify_path.to_string_lossy()),
                    crate::error::os_text(e)
                );
                return self.spawn_failed(n, origin, reason, waiters, now);
            }
        };
        let req = spawn::Request {
            command: &command,
            base_env: &self.base_env,
            env_file: self.cfg.env_file.as_deref(),
            chdir: self.cfg.chdir.as_deref(),
            listen_fds: self.listeners.len(),
            fd_names: &self.fd_names,
            notify_path: notify.path(),
            generation: n,
            drain_grace_ms: self.drain_grace_ms,
            death_signal: self.cfg.stop_signal,
        };
        let child = match spawn::spawn(&req) {
            Ok(c) => c,
            Err(reason) => return self.spawn_failed(n, origin, reason, waiters, now),
        };
        let ready_deadline = self.cfg.ready_timeout.map(|t| now + t);
        let g = Generation::new(n, child, notify, command.clone(), now, ready_deadline);
        info!("{} spawned", g.tag());
        debug!("{} command: {}", g.tag(), crate::log::shell_words(&command));
        let line = format!("spawned gen {n} pid {}", g.pid);
        self.gens.push(g);
        for &id in &waiters {
            self.tell(id, &line);
        }
        self.deploy = Some(Deploy { n, origin, waiters });
    }

    /// A deploy that never got a process (env file, fork, socket).
    fn spawn_failed(
        &mut self,
        n: u64,
        origin: Origin,
        reason: String,
        waiters: Vec<ClientId>,
        now: Instant,
    ) {
        warn!("gen {n} deploy failed: {reason}");
        self.deploy = Some(Deploy { n, origin, waiters });
        self.deploy_failed(n, reason, Exit::Code(1), now);
    }

    /// READY=1 from generation `n`.
    fn promote(&mut self, n: u64, now: Instant) {
        let stopping = self.stop.is_some();
        let Some(g) = self.gen_mut(n) else { return };
        if g.state != State::Starting || stopping {
            debug!("{} READY=1 while {} (ignored)", g.tag(), g.state.name());
            return;
        }
        // READY=1 and the exit can arrive in the same poll turn: a worker
        // that is already dead must not retire the one that serves.
        if g.pidfd
            .as_ref()
            .is_some_and(|p| reap::pidfd_exited(p, Some(Duration::ZERO)))
        {
            debug!(
                "{} READY=1 from a worker that already exited (ignored)",
                g.tag()
            );
            return;
        }
        g.state = State::Ready;
        g.ready_at = Some(now);
        g.deadline = None;
        let took = now.saturating_duration_since(g.started);
        let command = g.command.clone();
        let tag = g.tag();
        info!("{tag} ready in {}ms", took.as_millis());
        self.serving_since.get_or_insert(now);
        if let Some(d) = &self.deploy {
            let line = format!("gen {n} ready in {} ms", took.as_millis());
            for &id in &d.waiters.clone() {
                self.tell(id, &line);
            }
        }
        self.crashed = None;
        if let Some(old) = self.active.replace(n) {
            self.retire(old, now);
        }
        if command != self.current_cmd {
            self.previous_cmd = Some(std::mem::replace(&mut self.current_cmd, command));
        }
        if let Some(u) = &self.upstream {
            u.send(&format!("READY=1\nSTATUS=serving: {tag}"));
        }
        if !self.booted {
            self.booted = true;
        } else if self
            .deploy
            .as_ref()
            .is_some_and(|d| d.n == n && d.origin.is_requested())
        {
            self.counters.deploys_ok += 1;
        }
        if self.deploy.as_ref().is_some_and(|d| d.n == n) {
            let d = self.deploy.take().expect("checked above");
            if !matches!(d.origin, Origin::Boot | Origin::CrashRestart) {
                debug!("deploy of {tag} done");
            }
            self.conclude(d.waiters, true, &format!("deployed {tag}"));
            self.next_queued(now);
        }
    }

    /// Ask the previously active generation to drain.
    fn retire(&mut self, n: u64, now: Instant) {
        let (sig, drain) = (self.cfg.stop_signal, self.cfg.drain_timeout);
        let Some(g) = self.gen_mut(n) else { return };
        g.state = State::Draining;
        g.deadline = Some(now + drain);
        g.ask_to_stop(sig);
        info!(
            "{} draining ({}, deadline {})",
            g.tag(),
            signals::name(sig),
            format_duration(drain)
        );
        let line = format!("draining gen {n}");
        if let Some(d) = &self.deploy {
            for &id in &d.waiters.clone() {
                self.tell(id, &line);
            }
        }
    }

    /// The deploy of generation `n` failed closed: stop `n`, keep the
    /// active generation and the current command.
    fn fail_deploy(&mut self, n: u64, reason: String, exit: Exit, now: Instant) {
        let sig = self.cfg.stop_signal;
        if let Some(g) = self.gen_mut(n) {
            warn!("{} deploy failed: {reason}", g.tag());
            g.state = State::Failed;
            if g.running() {
                g.ask_to_stop(sig);
                g.deadline = Some(now + FAILED_GRACE);
            } else {
                g.deadline = None;
            }
        }
        self.deploy_failed(n, reason, exit, now);
    }

    fn deploy_failed(&mut self, n: u64, reason: String, exit: Exit, now: Instant) {
        if self
            .deploy
            .as_ref()
            .is_some_and(|d| d.origin.is_requested())
        {
            self.counters.deploys_failed += 1;
        }
        self.last_failure = Some(format!("gen {n}: {reason}"));
        let (origin, waiters) = self
            .deploy
            .take()
            .map_or((None, Vec::new()), |d| (Some(d.origin), d.waiters));
        self.conclude(
            waiters,
            false,
            &format!("deploy of gen {n} failed: {reason}"),
        );
        if let Some(u) = self.upstream_booted() {
            let serving = self.active_gen();
            u.send(&match serving {
                Some(g) => format!("READY=1\nSTATUS=deploy failed; serving: {}", g.tag()),
                None => "READY=1\nSTATUS=deploy failed; nothing is serving".to_string(),
            });
        }
        if !self.booted {
            // SPEC §5.6: the first generation must become ready. A worker
            // that exited 0 without ever being ready still failed.
            self.exit_code = Some(match exit.code() {
                0 => 1,
                c => c,
            });
            self.begin_stop(StopCause::BootFailed, now);
            return;
        }
        self.next_queued(now);
        let leaving = self.active_gen().is_some_and(|g| g.leaving);
        if self.deploy.is_none() && self.stop.is_none() {
            if leaving && origin != Some(Origin::Replace) {
                // The active generation said STOPPING=1 while this deploy
                // ran: it still needs a replacement. (One try: if that
                // fails too, it serves until it exits, then the crash
                // restart takes over.)
                self.request_deploy(Target::Current, Origin::Replace, None, now);
            } else if self.active.is_none() {
                self.schedule_restart(n, now);
            }
        }
    }

    fn next_queued(&mut self, now: Instant) {
        if self.stop.is_some() {
            return;
        }
        if let Some(q) = self.queued.take() {
            info!("starting the queued deploy ({})", q.origin.name());
            self.start_deploy(q.target, q.origin, q.waiters, now);
        }
    }

    fn schedule_restart(&mut self, failed: u64, now: Instant) {
        let wait = self.take_backoff();
        self.restart_at = Some(now + wait);
        info!(
            "{}: nothing is serving; restarting in {}",
            self.tag(failed),
            format_duration(wait)
        );
    }

    /// The service manager to tell about deploys: only once the first
    /// generation was ready (before that, systemd is still starting us).
    fn upstream_booted(&self) -> Option<&Upstream> {
        self.upstream.as_ref().filter(|_| self.booted)
    }

    /// The current restart backoff, doubled (up to 10 s) for next time.
    fn take_backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (wait * 2).min(BACKOFF_MAX);
        wait
    }

    // ---- exits ---------------------------------------------------------

    /// The single reaper: `waitpid(-1, WNOHANG)` until nothing is left,
    /// collecting every exited child, ours or orphaned.
    fn reap(&mut self, now: Instant) {
        for (pid, exit) in reap::collect() {
            match self.gens.iter().find(|g| g.pid == pid && g.running()) {
                Some(g) => {
                    let n = g.n;
                    self.on_exit(n, exit, now);
                }
                None => debug!("reaped pid {pid} ({exit})"),
            }
        }
        self.sweep();
        self.check_strays(now);
    }

    /// Generation `n`'s child exec'd, or said why it could not: one line
    /// naming what failed, before the exit status that follows.
    fn on_exec_report(&mut self, n: u64) {
        let chdir = self.cfg.chdir.clone();
        let Some(g) = self.gen_mut(n) else { return };
        let Some(pipe) = &g.exec_report else { return };
        match spawn::read_exec_report(pipe) {
            spawn::ExecReport::Pending => return,
            spawn::ExecReport::Done => {
                // Cleared first: while it is set, signal_group defers.
                g.exec_report = None;
                if let Some(sig) = g.deferred_signal.take() {
                    debug!("{} exec'd; sending {} now", g.tag(), signals::name(sig));
                    g.signal_group(sig);
                }
            }
            spawn::ExecReport::Failed(stage, e) => {
                // Said once, with the exit status, when it is reaped.
                let why = spawn::failure_reason(stage, &e, &g.command, chdir.as_deref());
                debug!("{} {why}", g.tag());
                g.exec_error = Some(why);
            }
        }
        g.exec_report = None;
    }

    /// Generation `n`'s worker exited with `exit`.
    fn on_exit(&mut self, n: u64, exit: Exit, now: Instant) {
        // Its report is complete by now (the write end died with it). The
        // exit is recorded first: a deferred signal then goes to what is
        // left of the group only, never to the reaped (reusable) pid.
        if let Some(g) = self.gen_mut(n) {
            g.exit = Some(exit);
        }
        self.on_exec_report(n);
        let stopping = self.stop.is_some();
        let Some(g) = self.gen_mut(n) else { return };
        g.pidfd = None;
        let (state, tag, leaving) = (g.state, g.tag(), g.leaving);
        match state {
            State::Starting => {
                let reason = match self.gen_mut(n).and_then(|g| g.exec_error.take()) {
                    Some(why) => format!("{why} (exited with {exit})"),
                    None => format!("exited with {exit} before READY=1"),
                };
                self.fail_deploy(n, reason, exit, now);
            }
            // Leaving on its own (STOPPING=1) with its replacement under
            // way: that deploy takes over. Otherwise nothing would serve:
            // restart, as after a crash.
            State::Ready if !(stopping || leaving && self.deploy.is_some()) => {
                self.on_crash(n, exit, now)
            }
            State::Ready => {
                info!("{tag} exited with {exit}");
                if self.active == Some(n) {
                    self.active = None;
                }
            }
            State::Draining | State::Failed => {
                match self.gen_mut(n).and_then(|g| g.exec_error.take()) {
                    // Stopped before it could exec: why it never ran.
                    Some(why) => warn!("{tag} {why} (exited with {exit})"),
                    None => info!("{tag} exited with {exit}"),
                }
            }
        }
        if let Some(stop) = self.stop.as_mut() {
            if stop.active == Some(n) {
                stop.active_exit = Some(exit);
            }
            if exit != Exit::Code(0) {
                stop.clean = false;
            }
        }
        self.drain_leftovers(n, now);
    }

    /// Whatever generation `n`'s worker left in its group gets the stop
    /// signal and a deadline: the drain's, or 5 s for a failed deploy's
    /// (§5.3). Not after a SIGKILL of the group: that is already on its
    /// way.
    fn drain_leftovers(&mut self, n: u64, now: Instant) {
        let sig = self.cfg.stop_signal;
        let drain = self.cfg.drain_timeout;
        if let Some(g) = self.gen_mut(n)
            && g.deadline.is_none()
            && !g.killed
            && g.group_alive()
        {
            let grace = if g.state == State::Failed {
                FAILED_GRACE
            } else {
                drain
            };
            info!(
                "{} left processes in its group: {} now, SIGKILL in {}",
                g.tag(),
                signals::name(sig),
                format_duration(grace)
            );
            g.ask_to_stop(sig);
            g.deadline = Some(now + grace);
            // What is left drains: a stop or a deploy that follows does
            // not signal it again or move its deadline.
            if g.state == State::Ready {
                g.state = State::Draining;
            }
        }
    }

    /// The active generation died on its own.
    fn on_crash(&mut self, n: u64, exit: Exit, now: Instant) {
        let tag = self.tag(n);
        self.active = None;
        self.crashed = Some(exit);
        if self.cfg.on_crash == OnCrash::Exit {
            warn!("{tag} crashed ({exit}); exiting (--on-crash exit)");
            self.exit_code = Some(match exit.code() {
                0 => 1,
                c => c,
            });
            self.begin_stop(StopCause::OnCrashExit, now);
            return;
        }
        self.counters.crash_restarts += 1;
        let served_for = self
            .serving_since
            .take()
            .map(|t| now.saturating_duration_since(t));
        if served_for.is_some_and(|d| d >= BACKOFF_RESET) {
            self.backoff = BACKOFF_MIN;
        }
        let status = match &self.deploy {
            Some(d) => format!("{tag} crashed ({exit}); gen {} is already starting", d.n),
            None => {
                let wait = self.take_backoff();
                self.restart_at = Some(now + wait);
                format!(
                    "{tag} crashed ({exit}); restarting in {}",
                    format_duration(wait)
                )
            }
        };
        warn!("{status}");
        // systemd's view must not keep naming the generation that died.
        if let Some(u) = self.upstream_booted() {
            u.send(&format!("STATUS={status}"));
        }
    }

    /// Drop generations whose worker is reaped and whose group is empty.
    fn sweep(&mut self) {
        self.gens
            .retain(|g| g.running() || (g.deadline.is_some() && g.group_alive()));
    }

    // ---- deadlines -----------------------------------------------------

    fn expire(&mut self, now: Instant) {
        let due: Vec<(u64, State)> = self
            .gens
            .iter()
            .filter(|g| g.deadline.is_some_and(|d| d <= now))
            .map(|g| (g.n, g.state))
            .collect();
        for (n, state) in due {
            match state {
                State::Starting => {
                    // The configured timeout, or, when EXTEND_TIMEOUT_USEC
                    // moved the deadline, the time actually waited.
                    let t = match self.gens.iter().find(|g| g.n == n) {
                        Some(g) if g.extended => format!(
                            "{} (EXTEND_TIMEOUT_USEC)",
                            format_duration(now.duration_since(g.started))
                        ),
                        _ => self
                            .cfg
                            .ready_timeout
                            .map_or_else(String::new, format_duration),
                    };
                    self.fail_deploy(n, format!("no READY=1 within {t}"), Exit::Code(1), now);
                }
                State::Ready | State::Draining | State::Failed => self.kill_overdue(n),
            }
        }
        let mut stream_events = Vec::new();
        for g in &mut self.gens {
            if let Some(ns) = g.notify.as_mut()
                && ns.deadline().is_some_and(|d| d <= now)
            {
                let mut ev = Vec::new();
                ns.expire(now, &mut ev);
                stream_events.extend(ev.into_iter().map(|e| (g.n, e)));
            }
        }
        for (n, e) in stream_events {
            self.on_notify_event(n, e, now);
        }
        if self.restart_at.is_some_and(|t| t <= now) {
            self.start_deploy(Target::Current, Origin::CrashRestart, Vec::new(), now);
        }
        if self.relisten_at.is_some_and(|t| t <= now) {
            self.relisten(now);
        }
        if self.replace_at.is_some_and(|t| t <= now) {
            self.replace_at = None;
            let leaving = self.active_gen().is_some_and(|g| g.leaving);
            if leaving {
                self.request_deploy(Target::Current, Origin::Replace, None, now);
            }
        }
        // They stay `strays` until reaped: the exit waits for that.
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.orphan_deadline.is_some_and(|t| t <= now))
        {
            self.check_strays(now);
        }
        if let Some(c) = self.control.as_mut() {
            c.expire(now);
        }
    }

    /// SIGKILL to a generation's whole process group at its deadline.
    fn kill_overdue(&mut self, n: u64) {
        let Some(g) = self.gen_mut(n) else { return };
        g.deadline = None;
        g.signal_group(libc::SIGKILL);
        g.killed = true;
        let deadline = match g.state {
            State::Failed => "stop deadline (failed deploy)",
            _ => "drain deadline",
        };
        if g.running() {
            warn!("{} killed at {deadline}", g.tag());
        } else {
            warn!(
                "{} processes left in its group killed at {deadline}",
                g.tag()
            );
        }
        let (gone, pgid) = (!g.running(), g.pid);
        if let Some(stop) = self.stop.as_mut() {
            stop.clean = false;
        }
        self.killed_groups.push(pgid);
        if gone {
            // Only leftovers were in the group; SIGKILL cannot be caught.
            self.gens.retain(|g| g.n != n);
        }
    }

    /// The active generation, if any.
    fn active_gen(&self) -> Option<&Generation> {
        self.active
            .and_then(|n| self.gens.iter().find(|g| g.n == n))
    }

    /// A ready generation serves (not leaving on its own).
    fn serving(&self) -> bool {
        self.active_gen()
            .is_some_and(|g| g.state == State::Ready && g.running() && !g.leaving)
    }

    /// A stop has begun: generations drain and nothing new starts.
    fn stopping(&self) -> bool {
        self.stop.is_some()
    }

    fn deploying(&self) -> Option<u64> {
        self.deploy.as_ref().map(|d| d.n)
    }
}
