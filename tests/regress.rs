//! Regression tests for bugs a code review found (fixed in "Review fixes:
//! …"). Each one failed on the code before that commit:
//!
//! 1. SIGCHLD inherited ignored: exits were lost, old generations stayed
//!    draining forever and the loop spun on their pidfds.
//! 2. A ready worker that asked to be replaced (STOPPING=1), whose
//!    replacement failed, and which then exited: nothing was restarted.
//! 3. A daemon (`setsid`) still a worker's child when the stop began was
//!    never signalled once it was reparented to the supervisor.
//! 4. A SIGHUP queued after `deploy -- NEW` erased NEW.
//! 5. A client command writing to a closed stdout panicked (Broken pipe).
//! 6. EMFILE on the control socket made the loop spin.
//! 7. An env file could set `LISTEN_PID` (and the other variables
//!    containerflip sets itself).
//!
//! Same rules as the rest of the suite: own temp dir, own control socket,
//! `127.0.0.1:0`, no sleeps as synchronisation.

use std::fs;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;

use crate::common::*;

// ---------------------------------------------------------------------------
// Helpers.

/// `containerflip VERB --control DIR/control.sock ARGS`, run to the end
/// (with the suite's deadline as a safety net).
fn client(dir: &TempDir, verb: &str, args: &[&str]) -> Output {
    let mut cmd = client_cmd(dir, verb, args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    finish(cmd.spawn().expect("spawn a containerflip client"))
}

/// Waits for a spawned client, killing it if it outlives `DEADLINE`.
fn finish(child: std::process::Child) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for the client"),
        Err(_) => {
            kill(pid as i32, libc::SIGKILL);
            panic!("client pid {pid} did not finish");
        }
    }
}

/// Processes whose argv is exactly `argv`.
fn pids_with_argv(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let field = |n| -> u64 {
        stat_field(pid, n)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("field {n} of /proc/{pid}/stat"))
    };
    field(14) + field(15)
}

/// Kills, when dropped, the processes still running `argv` (a test that
/// fails must not leave its daemon behind).
struct KillLeftovers(Vec<String>);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        let argv: Vec<&str> = self.0.iter().map(String::as_str).collect();
        for pid in pids_with_argv(&argv) {
            kill(pid as i32, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// 1. SIGCHLD ignored by the parent.

/// With SIGCHLD ignored the kernel reaps children itself and waitpid never
/// sees their status: the supervisor must reset the disposition at start.
#[test]
fn sigchld_inherited_ignored_still_sees_exits() {
    let dir = TempDir::new("rg-nochld");
    let mut cmd = Supervisor::run_cmd(&dir, &worker_args(&[]));
    // SAFETY: signal(2) is async-signal-safe; nothing else runs between
    // fork and exec. SIG_IGN survives the exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut sup = Supervisor::spawn(cmd, &dir, &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    sup.signal(libc::SIGHUP);
    sup.wait_ready(2);
    sup.wait_gen(1, "exited with status 0");
    assert_eq!(served_gen(addr), 2);
    sup.signal(libc::SIGTERM);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    sup.wait_gen(2, "exited with status 0");
}

// ---------------------------------------------------------------------------
// 2. STOPPING=1, failed replacement, then the worker exits.

/// Gen 1: READY=1, STOPPING=1 when told, exit 0 when told. Gen 2: exits 1
/// at once. Later generations exec the example worker.
const PY_LEAVER: &str = r#"
import os, socket, sys
d, worker = sys.argv[1], sys.argv[2]
gen = int(os.environ["CONTAINERFLIP_GENERATION"])

def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
    s.close()

def wait(name):
    with open(os.path.join(d, name)) as f:
        f.read()

if gen == 1:
    notify("READY=1")
    wait("stopping")
    notify("STOPPING=1")
    wait("exit")
    sys.exit(0)
if gen == 2:
    sys.exit(1)
os.execv(worker, [worker])
"#;

#[test]
fn leaving_active_whose_replacement_failed_is_restarted_when_it_exits() {
    let dir = TempDir::new("rg-leaver");
    let script = dir.join("leaver.py");
    fs::write(&script, PY_LEAVER).unwrap();
    mkfifo(&dir.join("stopping"));
    mkfifo(&dir.join("exit"));
    let sup = Supervisor::start(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--",
            "python3",
            script.to_str().unwrap(),
            dir.str(),
            worker(),
        ],
        &[],
    );
    let addr = sup.listen_addr();
    let p1 = sup.wait_ready(1);

    // It asks to be replaced; the replacement fails before READY=1.
    release(&dir.join("stopping"));
    sup.wait_gen(2, "deploy failed: exited with status 1 before READY=1");
    // Then it leaves: nothing would serve, so the supervisor restarts.
    release(&dir.join("exit"));
    sup.wait_for("gen 1's exit", |l| {
        l.starts_with(&format!("containerflip: gen 1 pid {p1} "))
            && (l.contains("exited") || l.contains("crashed"))
    });
    sup.wait_ready(3);
    assert_eq!(served_gen(addr), 3);
    let out = client(&dir, "status", &["--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

// ---------------------------------------------------------------------------
// 3. A setsid daemon still under a worker when the stop begins.

/// `run --drain-timeout 2s -- sh -c SCRIPT worker`, where SCRIPT starts
/// `sleep ARG` in a session of its own (setsid) before exec'ing the
/// worker: the supervisor, gen 1's pid and the daemon's pid, once the
/// daemon runs `sleep`.
fn start_with_daemon(
    dir: &TempDir,
    script: &str,
    arg: &str,
    env: &[(&str, &str)],
) -> (Supervisor, u32, u32) {
    let sup = Supervisor::start(
        dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "2s",
            "--",
            "sh",
            "-c",
            script,
            worker(),
        ],
        env,
    );
    let p1 = sup.wait_ready(1);
    let mut daemon = 0;
    wait_until("the setsid daemon", || {
        match pids_with_argv(&["sleep", arg])[..] {
            [pid] if process_group(pid) == Some(pid) => {
                daemon = pid;
                true
            }
            _ => false,
        }
    });
    (sup, p1, daemon)
}

#[test]
fn stop_kills_a_daemon_reparented_after_the_stop_began() {
    let dir = TempDir::new("rg-daemon");
    // Unique per test run, so that only our own daemon is found.
    let arg = format!("7777.{}", std::process::id());
    let _cleanup = KillLeftovers(vec!["sleep".into(), arg.clone()]);
    let script = format!("setsid sleep {arg} & exec \"$0\"");
    let (mut sup, p1, daemon) =
        start_with_daemon(&dir, &script, &arg, &[("WORKER_IGNORE_TERM", "1")]);
    assert_eq!(
        stat_field(daemon, 4),
        Some(p1.to_string()),
        "the daemon is the worker's child when the stop begins"
    );

    sup.signal(libc::SIGTERM);
    sup.wait_gen(1, "killed at drain deadline");
    sup.wait_exit();
    let left = pids_with_argv(&["sleep", &arg]);
    assert!(
        !left.contains(&daemon),
        "daemon pid {daemon} outlived the supervisor (ppid now {:?}); log:\n{}",
        stat_field(daemon, 4),
        sup.lines().join("\n")
    );
}

/// A setsid daemon that ignores the stop signal, left by a worker that
/// obeys it at once: once the worker is gone nothing else is due at the
/// drain deadline, yet the daemon gets SIGKILL then and the stop ends.
#[test]
fn a_daemon_ignoring_the_stop_signal_is_killed_after_its_worker_left() {
    let dir = TempDir::new("rg-stubborn");
    let arg = format!("7778.{}", std::process::id());
    let _cleanup = KillLeftovers(vec!["sleep".into(), arg.clone()]);
    // SIG_IGN survives exec: the daemon (sleep) ignores SIGTERM, the worker
    // (exec'd by the outer shell) does not.
    let script = format!("setsid sh -c 'trap \"\" TERM; exec sleep {arg}' & exec \"$0\"");
    let (mut sup, _, daemon) = start_with_daemon(&dir, &script, &arg, &[]);

    sup.signal(libc::SIGTERM);
    sup.wait_gen(1, "exited with status 0");
    sup.wait_line(&format!("pid {daemon} killed at drain deadline"));
    sup.wait_exit();
    assert!(
        !pids_with_argv(&["sleep", &arg]).contains(&daemon),
        "daemon pid {daemon} outlived the supervisor; log:\n{}",
        sup.lines().join("\n")
    );
}

// ---------------------------------------------------------------------------
// 4. A SIGHUP after a queued `deploy -- NEW` keeps NEW.

/// The generation waits for a line on `$HOLD` (a FIFO) when it is set.

#[test]
fn sighup_behind_a_queued_deploy_keeps_its_new_command() {
    let dir = TempDir::new("rg-queuecmd");
    // -v: a request that joins the queued deploy is logged only with it.
    let (sup, env_file, fifo) = start_held(&dir, &["-v"], &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);

    // Gen 2 (the current command) is held while it starts.
    write_file(&env_file, &format!("HOLD={}\n", fifo.display()));
    sup.signal(libc::SIGHUP);
    sup.wait_gen(2, "spawned");
    write_file(&env_file, "");

    let deploy = Command::new(bin())
        .args(["deploy", "--control"])
        .arg(control(&dir))
        .args(["--", worker(), "--new-version"])
        .env_remove("CONTAINERFLIP_CONTROL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn deploy");
    sup.wait_for_nth("the deploy queued", 1, |l| {
        l.contains("queued behind gen 2")
    });
    sup.signal(libc::SIGHUP);
    sup.wait_for_nth("the SIGHUP queued", 2, |l| {
        l.contains("queued behind gen 2")
    });
    release(&fifo);

    let out = finish(deploy);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    assert!(last.starts_with("deployed gen 3 pid "), "{stdout}");
    let p3 = sup.wait_ready(3);
    let args: Vec<String> = start_record(&sup.records, p3)
        .args()
        .iter()
        .map(|a| text(a))
        .collect();
    assert_eq!(args, [worker(), "--new-version"], "gen 3's argv");
    let out = client(&dir, "status", &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json = text(&out.stdout);
    let want = format!("\"command\":[\"{}\",\"--new-version\"]", worker());
    assert!(json.contains(&want), "want {want} in {json}");
    sup.wait_gen(2, "exited");
    assert_eq!(served_gen(addr), 3);
    assert_eq!(sup.count(" spawned"), 3, "{}", sup.lines().join("\n"));
}

// ---------------------------------------------------------------------------
// 5. A client whose stdout is closed.

#[test]
fn client_with_a_closed_stdout_ends_quietly() {
    let dir = TempDir::new("rg-pipe");
    let ctl = control(&dir);
    let sup = Supervisor::start(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--control",
            ctl.to_str().unwrap(),
            "--",
            worker(),
        ],
        &[],
    );
    sup.wait_ready(1);
    for args in [&["status"][..], &["status", "--json"], &["--help"]] {
        // A pipe whose read end is closed: `… | head -c 0`, decided.
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned here only.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(r);
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("CONTAINERFLIP_CONTROL", &ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped());
        let out = finish(cmd.spawn().expect("spawn the client"));
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?}, stderr {stderr:?}",
            out.status
        );
    }
}

// ---------------------------------------------------------------------------
// 6. Out of descriptors on the control socket.

#[test]
fn control_socket_emfile_does_not_spin() {
    let dir = TempDir::new("rg-emfile");
    let mut cmd = Supervisor::run_cmd(&dir, &worker_args(&[]));
    // SAFETY: setrlimit(2) is async-signal-safe and takes a local struct.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 20,
                rlim_max: 20,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let sup = Supervisor::spawn(cmd, &dir, &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    let out = client(&dir, "status", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // More idle connections than it has descriptors for: the rest stay
    // pending in the backlog, and the socket stays readable.
    let conns: Vec<UnixStream> = (0..30)
        .map(|_| UnixStream::connect(control(&dir)).expect("connect"))
        .collect();
    let before = cpu_ticks(sup.pid);
    // The first one was accepted; it is closed when its request does not
    // come within the 5 s request timeout.
    conns[0].set_read_timeout(Some(DEADLINE)).unwrap();
    // (It may say why first.)
    let mut said = Vec::new();
    match (&conns[0]).read_to_end(&mut said) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the idle connection to be closed: {e}"),
    }
    let after = cpu_ticks(sup.pid);
    assert!(
        after - before < 50,
        "{} clock ticks of CPU while idle connections waited: a busy loop",
        after - before
    );
    sup.wait_line("unable to accept");
    drop(conns);

    let out = client(&dir, "status", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains("active gen 1"), "{out:?}");
    assert_eq!(served_gen(addr), 1);
}

// ---------------------------------------------------------------------------
// 7. The env file cannot set LISTEN_PID.

#[test]
fn env_file_setting_listen_pid_fails_the_spawn_closed() {
    let dir = TempDir::new("rg-envlisten");
    let (sup, env_file) = start_with_env_file(&dir, "", &[], &[]);
    let addr = sup.listen_addr();
    let p1 = sup.wait_ready(1);
    write_file(&env_file, "# set by containerflip\nLISTEN_PID=1\n");
    sup.signal(libc::SIGHUP);
    // Either outcome ends the wait, so the old behaviour fails quickly.
    let line = sup.wait_for("gen 2 failing or ready", |l| {
        l.starts_with("containerflip: gen 2 ")
            && (l.contains("deploy failed") || l.contains(" ready in "))
    });
    assert!(
        line.contains("deploy failed") && line.contains("LISTEN_PID"),
        "{line}"
    );
    assert!(
        line.contains(env_file.to_str().unwrap()),
        "names the file: {line}"
    );
    assert_eq!(served_gen(addr), 1);
    let out = client(&dir, "status", &[]);
    assert!(text(&out.stdout).contains("active gen 1"), "{out:?}");
    assert!(pid_exists(p1));
}

// ---------------------------------------------------------------------------
// 8. The env file is read in the event loop: nothing there may block it.

/// An env file swapped for a FIFO (or a device such as /dev/zero) would
/// block the loop in open(2) or read forever: the spawn fails closed with
/// one line instead, and the supervisor keeps answering.
#[test]
fn an_env_file_that_is_not_a_regular_file_fails_the_spawn_closed() {
    let dir = TempDir::new("rg-envfifo");
    let (sup, env_file) = start_with_env_file(&dir, "", &[], &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    fs::remove_file(&env_file).unwrap();
    mkfifo(&env_file);
    sup.signal(libc::SIGHUP);
    let line = sup.wait_for("gen 2 failing or ready", |l| {
        l.starts_with("containerflip: gen 2 ")
            && (l.contains("deploy failed") || l.contains(" ready in "))
    });
    assert!(
        line.contains(&format!(
            "unable to read env file {}: not a regular file",
            env_file.display()
        )),
        "{line}"
    );
    assert_eq!(served_gen(addr), 1);
    let out = client(&dir, "status", &[]);
    assert!(text(&out.stdout).contains("active gen 1"), "{out:?}");

    // /dev/zero: a device, refused the same way (not read until memory
    // runs out).
    fs::remove_file(&env_file).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &env_file).unwrap();
    sup.signal(libc::SIGHUP);
    sup.wait_for("the second failure", |l| {
        l.contains("deploy failed") && l.contains("not a regular file") && !l.contains("gen 2 ")
    });
    assert_eq!(served_gen(addr), 1);
}
