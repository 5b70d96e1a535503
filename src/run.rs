//! `containerflip run` start-up: everything that may still fail fatally
//! (exit 1 with `fatal: unable to …`) happens here, in order, before the
//! event loop takes over. Past this point nothing is fatal.

use crate::cli::RunConfig;
use crate::control::{self, Control};
use crate::error::Error;
use crate::listen::{self, Inherited};
use crate::rundir::RunDir;
use crate::signals::Signals;
use crate::supervisor::{Parts, Supervisor};
use crate::upstream::Upstream;
use crate::{debug, info, log, sys, warn};

/// Run the supervisor; returns the process exit status.
pub fn run(cfg: RunConfig) -> i32 {
    log::set_level(cfg.verbosity);
    let inherited = Inherited::from_env();
    if cfg.listen.is_empty() && inherited.as_ref().is_ok_and(|i| i.count == 0) {
        // SPEC §2: a usage error, though only the environment tells.
        log::line(format_args!(
            "{}",
            crate::cli::Usage::new(
                "no --listen given and no sockets passed by socket activation (LISTEN_FDS)"
            )
            .of("run")
        ));
        return 2;
    }
    let pidfile = cfg.pidfile.clone();
    match inherited.and_then(|i| start(cfg, i)) {
        Ok(parts) => {
            let code = Supervisor::new(parts).run();
            if let Some(p) = pidfile {
                remove_pidfile(&p);
            }
            code
        }
        Err(e) => {
            warn!("fatal: {e}");
            1
        }
    }
}

fn start(mut cfg: RunConfig, inherited: Inherited) -> Result<Parts, Error> {
    // Descriptors our parent leaked to us must not reach workers.
    sys::cloexec_from(listen::FIRST_FD);
    // pidfd_open arrived in Linux 5.3: say so instead of failing later.
    rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| Error::os("use pidfd_open (containerflip needs Linux 5.3 or later)", e))?;

    let specs = if cfg.listen.is_empty() {
        inherited.specs()
    } else {
        std::mem::take(&mut cfg.listen)
    };
    let listeners = listen::open_all(&specs, cfg.backlog, &inherited)?;
    for (i, l) in listeners.iter().enumerate() {
        info!(
            "listening on {} as fd {} ({})",
            l.display,
            listen::FIRST_FD + i as i32,
            l.name
        );
    }

    // Signals were blocked first thing in main; the signalfd is opened
    // only now because parking the listeners dup3s over fds 3.. and would
    // close one sitting there.
    let signals = Signals::open().map_err(|e| Error::os("open a signalfd", e))?;
    if rustix::process::getpid().is_init() {
        debug!("running as PID 1: reaping every orphan");
    } else if let Err(e) = sys::set_child_subreaper() {
        warn!(
            "unable to become a child subreaper ({}); daemonized grandchildren will escape",
            crate::error::os_message(&e)
        );
    }
    if !crate::reap::proc_is_ours() {
        warn!(
            "/proc is not this PID namespace's (mount one, e.g. unshare --mount-proc): \
             daemonized leftovers are not looked for at stop"
        );
    }
    if rustix::process::getpid().is_init() {
        make_run_dir();
    }
    let rundir = RunDir::create()?;
    let upstream = Upstream::from_env();
    let control_path = cfg.control.clone().unwrap_or_else(control::default_path);
    let control = Control::bind(&control_path)?;
    debug!("control socket {}", control.path().display());
    if let Some(p) = &cfg.pidfile {
        write_pidfile(p)?;
    }
    Ok(Parts {
        cfg,
        listeners,
        signals,
        rundir,
        upstream,
        control: Some(control),
    })
}

/// As PID 1 in an image with nothing but the binary (`FROM scratch`),
/// there is no /run for the runtime directory and the control socket:
/// make it, as an init would. Not being able to is no error here; the
/// paths that need it name themselves when they fail.
fn make_run_dir() {
    use std::os::unix::fs::DirBuilderExt;
    let run = std::path::Path::new("/run");
    if rustix::process::getuid().is_root() && !run.exists() {
        match std::fs::DirBuilder::new().mode(0o755).create(run) {
            Ok(()) => info!("created /run (missing in this image)"),
            Err(e) => debug!("unable to create /run: {}", crate::error::os_message(&e)),
        }
    }
}

/// Write our pid to `path`, unless it names another live containerflip:
/// overwriting it (and removing it at our exit) would leave that one
/// without its pidfile, and `kill -HUP $(cat PIDFILE)` aiming at us.
fn write_pidfile(path: &std::path::Path) -> Result<(), Error> {
    let shown = path.display();
    if let Some(pid) = pid_in(path)
        && pid != std::process::id()
        && is_containerflip(pid)
    {
        return Err(Error::msg(
            format!("write pidfile {shown}"),
            format!("it names pid {pid}, a containerflip still running"),
        ));
    }
    std::fs::write(path, format!("{}\n", std::process::id()))
        .map_err(|e| Error::os(format!("write pidfile {shown}"), e))
}

/// Remove `path` at exit if it still names us.
fn remove_pidfile(path: &std::path::Path) {
    if pid_in(path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

fn pid_in(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive and runs the same program as we do (a pid
/// reused by something else leaves a stale pidfile, to be replaced).
fn is_containerflip(pid: u32) -> bool {
    let comm = crate::reap::comm;
    comm(&pid.to_string()).is_some_and(|c| Some(c) == comm("self"))
}
