//! The stop of SPEC §7, as `Supervisor` methods: TERM/INT or `stop`
//! drains every generation and the daemons that left them, SIGKILLs what
//! is left at the deadline (at once on a second TERM/INT), and says when
//! the supervisor may exit and with which status. Children that left
//! their generation's group (strays) are tracked here too: found at each
//! reap, stopped with everything else.

use std::time::Instant;

use super::Supervisor;
use crate::cli::format_duration;
use crate::control::ClientId;
use crate::generation::{Exit, State};
use crate::{info, reap, signals, warn};

pub(super) struct Stopping {
    /// The active generation when the stop began, and how it ended.
    pub(super) active: Option<u64>,
    pub(super) active_exit: Option<Exit>,
    /// Every generation exited 0 before its deadline.
    pub(super) clean: bool,
    /// A TERM/INT arrived: the stop may have begun otherwise (`stop`,
    /// `--on-crash exit`), and only a second signal forces it.
    signalled_once: bool,
    /// A second TERM/INT: everything got SIGKILL.
    forced: bool,
    /// Strays left at this time get SIGKILL.
    pub(super) orphan_deadline: Option<Instant>,
    /// Strays that already got the stop signal.
    signalled: Vec<i32>,
    /// Strays that already got SIGKILL (not sent, nor logged, twice).
    killed: Vec<i32>,
    /// The stop's drain deadline: what is left after it gets SIGKILL.
    pub(super) deadline: Instant,
    /// `stop` clients to tell the exit status.
    pub(super) waiters: Vec<ClientId>,
}

/// What began a stop, for the log and for the second-signal rule.
#[derive(Debug, Clone, Copy)]
pub(super) enum StopCause {
    /// SIGTERM or SIGINT: a second one kills everything.
    Signal(i32),
    Control,
    OnCrashExit,
    BootFailed,
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopCause::Signal(sig) => f.write_str(&signals::name(*sig)),
            StopCause::Control => f.write_str("stop requested over the control socket"),
            StopCause::OnCrashExit => f.write_str("--on-crash exit"),
            StopCause::BootFailed => f.write_str("the first generation failed"),
        }
    }
}

impl Supervisor {
    pub(super) fn finished(&self) -> Option<i32> {
        let stop = self.stop.as_ref()?;
        // Strays (setsid daemons, see `check_strays`) hold the exit too.
        if !self.gens.is_empty() || !self.known_strays.is_empty() {
            return None;
        }
        Some(self.exit_code.unwrap_or(match stop.active_exit {
            Some(e) if e != Exit::Code(0) => e.code(),
            _ if !stop.clean => 1,
            _ => 0,
        }))
    }

    /// TERM/INT or `stop`: stop signal to everything, SIGKILL at the
    /// deadline, exit when nothing is left. The second TERM/INT kills now,
    /// whatever began the stop; other repeated requests change nothing.
    pub(super) fn begin_stop(&mut self, why: StopCause, now: Instant) {
        let by_signal = matches!(why, StopCause::Signal(_));
        if let Some(stop) = self.stop.as_mut() {
            if by_signal && !stop.signalled_once {
                stop.signalled_once = true;
                info!("{why} while stopping: still draining (a second {why} kills everything)");
            } else if by_signal && !stop.forced {
                stop.forced = true;
                warn!("second {why}: killing everything now");
                for g in &mut self.gens {
                    g.signal_group(libc::SIGKILL);
                    g.deadline = None;
                    g.killed = true;
                    self.killed_groups.push(g.pid);
                }
                self.gens.retain(|g| g.running());
                for pid in reap::orphans(&self.gens, &self.killed_groups) {
                    let _ = crate::sys::kill(pid, libc::SIGKILL);
                }
                stop.orphan_deadline = None;
                stop.clean = false;
            }
            return;
        }
        info!("stopping ({why})");
        if let Some(u) = &self.upstream {
            u.send("STOPPING=1\nSTATUS=stopping");
        }
        self.restart_at = None;
        self.replace_at = None;
        let mut waiters = self.deploy.take().map(|d| d.waiters).unwrap_or_default();
        waiters.extend(self.queued.take().map(|q| q.waiters).unwrap_or_default());
        self.conclude(waiters, false, "the supervisor is stopping");
        let (sig, drain) = (self.cfg.stop_signal, self.cfg.drain_timeout);
        for g in &mut self.gens {
            // One already draining keeps its deadline, unless an
            // EXTEND_TIMEOUT_USEC put it past this stop's.
            if g.state == State::Draining {
                g.deadline = g.deadline.map(|d| d.min(now + drain));
            }
            if matches!(g.state, State::Starting | State::Ready) && (g.running() || g.group_alive())
            {
                g.ask_to_stop(sig);
                g.state = State::Draining;
                g.deadline = Some(now + drain);
                info!(
                    "{} draining ({}, deadline {})",
                    g.tag(),
                    signals::name(sig),
                    format_duration(drain)
                );
            }
        }
        // Daemons that left their generation's group (setsid) are still our
        // children as subreaper or PID 1: they are stopped too.
        self.stop = Some(Stopping {
            active: self.active,
            // Nothing serves after a crash: the crashed one's status.
            active_exit: self.active.is_none().then_some(self.crashed).flatten(),
            clean: true,
            signalled_once: by_signal,
            forced: false,
            signalled: Vec::new(),
            killed: Vec::new(),
            deadline: now + drain,
            orphan_deadline: None,
            waiters: Vec::new(),
        });
        self.sweep();
        self.check_strays(now);
    }

    /// Not stopping: say once about each child of ours that belongs to no
    /// generation — a process that left its worker's group (`setsid`) and
    /// was reparented to us when its parent died. It may be a failed
    /// deploy's, still accepting on the shared sockets: nothing tells whose
    /// it is, so it is not killed now, but the operator hears of it (and
    /// the stop signals it).
    fn report_strays(&mut self) {
        // A group emptied by its SIGKILL needs no more excusing.
        // (EPERM: a member runs a setuid program; still alive.)
        self.killed_groups.retain(|&pg| {
            !matches!(crate::sys::kill(-pg, 0), Err(e) if e.raw_os_error() == Some(libc::ESRCH))
        });
        let strays = reap::orphans(&self.gens, &self.killed_groups);
        for &pid in &strays {
            if self.known_strays.contains(&pid) {
                continue;
            }
            let comm = reap::comm(&pid.to_string()).unwrap_or_default();
            warn!(
                "pid {pid} ({}) left its generation's process group and outlived its parent: \
                 it belongs to no generation and runs until containerflip stops",
                crate::log::printable(&comm)
            );
        }
        self.known_strays = strays;
    }

    /// While stopping: find our children that belong to no generation
    /// (daemons that left their group, reparented to us as subreaper or
    /// PID 1), give new ones the stop signal and the drain deadline, and
    /// note when none is left. Run at the stop, after every reap (a daemon
    /// becomes our child only when its parent dies) and at the deadline,
    /// when each one gets SIGKILL, once.
    pub(super) fn check_strays(&mut self, now: Instant) {
        let sig = self.cfg.stop_signal;
        let Some(stop) = self.stop.as_mut() else {
            return self.report_strays();
        };
        // One deadline for the whole stop: a stray found late (reparented
        // when its parent died at the deadline) gets SIGKILL at once.
        let kill_now = stop.forced || now >= stop.deadline;
        let strays = reap::orphans(&self.gens, &self.killed_groups);
        // A reaped pid may come back as another process: forget it.
        stop.killed.retain(|p| strays.contains(p));
        for &pid in &strays {
            if stop.killed.contains(&pid) || (stop.signalled.contains(&pid) && !kill_now) {
                continue;
            }
            if kill_now {
                warn!("pid {pid} killed at drain deadline (left behind by a worker)");
                let _ = crate::sys::kill(pid, libc::SIGKILL);
                stop.killed.push(pid);
            } else {
                info!(
                    "pid {pid} (left behind by a worker) gets {}",
                    signals::name(sig)
                );
                let _ = crate::sys::kill(pid, sig);
                stop.signalled.push(pid);
            }
        }
        stop.orphan_deadline = (!strays.is_empty() && !kill_now).then_some(stop.deadline);
        self.known_strays = strays;
    }
}
