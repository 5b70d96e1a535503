//! The one reaper (STYLE 3): `waitpid(-1, WNOHANG)` until nothing is left,
//! collecting our workers and every orphan we inherit as PID 1 or child
//! subreaper, so no zombie stays and no exit status is taken twice. Also
//! what only the reaper's view can answer: whether a worker's status was
//! lost to someone else, and, while stopping, which children belong to no
//! generation. What an exit means is the supervisor's business.

use rustix::io::Errno;
use rustix::process::{Pid, WaitId, WaitIdOptions, WaitOptions, wait, waitid};

use crate::generation::{Exit, Generation};
use crate::warn;

/// Every child that has exited, with how; empty when none has.
pub fn collect() -> Vec<(i32, Exit)> {
    let mut out = Vec::new();
    loop {
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                out.push((pid.as_raw_nonzero().get(), Exit::from_wait(status)));
            }
            Ok(None) | Err(Errno::CHILD) => return out,
            Err(Errno::INTR) => continue,
            Err(e) => {
                warn!("waitpid failed: {}", crate::error::os_text(e));
                return out;
            }
        }
    }
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable),
/// waiting up to `within` (`None`: until it has).
pub fn pidfd_exited(pidfd: &std::os::fd::OwnedFd, within: Option<std::time::Duration>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let within = within.map(|d| Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    });
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    loop {
        match poll(&mut fds, within.as_ref()) {
            Err(Errno::INTR) => continue,
            Ok(n) => return n > 0,
            Err(_) => return false,
        }
    }
}

/// Whether child `pid` is gone without our having reaped it (the kernel
/// auto-reaped it: SIGCHLD ignored). WNOWAIT: a zombie stays for
/// [`collect`], whose status it is.
pub fn lost(pid: i32) -> bool {
    let Some(pid) = Pid::from_raw(pid) else {
        return false;
    };
    matches!(
        waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT
        ),
        Err(Errno::CHILD)
    )
}

/// Our children that are not generation workers nor in a tracked
/// generation's process group (that group already got the stop signal and
/// has its own deadline) nor in a group that got SIGKILL (dying): daemons
/// that left their group and were reparented to us as PID 1 or child
/// subreaper. Read from /proc after a reap (see `report_strays`) and
/// while stopping.
pub fn orphans(gens: &[Generation], killed_groups: &[i32]) -> Vec<i32> {
    let me = std::process::id() as i32;
    // A /proc of another PID namespace lists other processes under our
    // numbers: never signal those (`run` warned at start).
    if !proc_is_ours() {
        return Vec::new();
    }
    // Our children are listed in /proc/self/task/PID/children (we have
    // one thread), which costs what we have, not what the host runs;
    // without CONFIG_PROC_CHILDREN, every process is looked at.
    let pids: Vec<i32> = match std::fs::read_to_string(format!("/proc/self/task/{me}/children")) {
        Ok(list) => list
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => match std::fs::read_dir("/proc") {
            Ok(dir) => dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .collect(),
            Err(_) => return Vec::new(),
        },
    };
    pids.into_iter()
        .filter(|pid| !gens.iter().any(|g| g.pid == *pid))
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) S ppid …": comm may hold spaces and parentheses.
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
            let pgrp = fields.next().and_then(|p| p.parse::<i32>().ok());
            // A worker leads its generation's group: pgid == worker pid.
            let in_a_group = pgrp
                .is_some_and(|pg| gens.iter().any(|g| g.pid == pg) || killed_groups.contains(&pg));
            ppid == Some(me) && state != Some("Z") && !in_a_group
        })
        .collect()
}

/// Whether /proc shows our own PID namespace (`/proc/self` is our pid), as
/// it does unless a new PID namespace was made without mounting a new
/// /proc (`unshare --pid --fork` without `--mount-proc`).
pub fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self")
        .is_ok_and(|p| p.to_str() == Some(std::process::id().to_string().as_str()))
}

/// The command name of process `pid` ("self" for us) from
/// `/proc/PID/comm`, without its newline; None once it is gone.
pub fn comm(pid: &str) -> Option<String> {
    let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(c.trim_end_matches('\n').to_string())
}
