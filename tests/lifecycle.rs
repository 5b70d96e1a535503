//! Life-cycle features no other module proves: `--on-crash exit`,
//! `STOPPING=1` asking for a replacement, `EXTEND_TIMEOUT_USEC`, `ERRNO=`,
//! forwarded signals, the crash-restart backoff and a deploy that cuts it
//! short, `deploy --timeout`, an idle supervisor that makes no system calls,
//! and the notify socket's credential check.
//!
//! As everywhere in the suite: each supervisor has its own temp dir,
//! control socket and `127.0.0.1:0` listener; waits are for events, never
//! for time. Where a deadline has to have passed, another supervisor with
//! the same deadline, started later, is the clock: its failure proves it.

use std::fs;
use std::os::unix::net::UnixDatagram;

use crate::common::*;

// ---------------------------------------------------------------------------
// Private helpers.

/// The JSON object of `status --json`, as text.
fn status_json(dir: &TempDir) -> String {
    let out = client(dir, "status", &["--json"]);
    assert_eq!(out.status.code(), Some(0), "status --json: {out:?}");
    text(&out.stdout)
}

/// The generation object for `pid` in the status JSON (text between its
/// braces), so a test can check its state without a JSON parser.
fn gen_json(json: &str, pid: u32) -> String {
    let key = format!("\"pid\":{pid},");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no generation with pid {pid} in {json}"));
    let start = json[..at].rfind('{').unwrap();
    let end = at + json[at..].find('}').unwrap();
    json[start..=end].to_string()
}

// ---------------------------------------------------------------------------
// --on-crash exit.

#[test]
fn on_crash_exit_stops_with_the_crashed_workers_status() {
    let dir = TempDir::new("oncrash");
    let mut sup = Supervisor::start(&dir, &worker_args(&["--on-crash", "exit"]), &[]);
    let addr = sup.listen_addr();
    let pid = sup.wait_ready(1);
    assert_eq!(served_gen(addr), 1);
    kill(pid as i32, libc::SIGKILL);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(137), "128 + SIGKILL: {status}");
    let why = sup.wait_line("crashed");
    assert!(
        why.starts_with(&format!("containerflip: gen 1 pid {pid} crashed"))
            && why.contains("SIGKILL")
            && why.contains("--on-crash exit"),
        "{why}"
    );
    assert_eq!(sup.count("containerflip: gen 2 "), 0, "nothing restarted");
    assert_eq!(sup.count("restarting in"), 0);
}

/// DESIGN.md: a worker that exits 0 on its own (nobody asked it to stop)
/// still crashed, and `--on-crash exit` must not report success: exit 1.
#[test]
fn on_crash_exit_after_a_worker_exits_0_on_its_own_exits_1() {
    let dir = TempDir::new("oncrash0");
    let mut sup = Supervisor::start(&dir, &worker_args(&["--on-crash", "exit"]), &[]);
    let pid = sup.wait_ready(1);
    // The worker drains and exits 0 on a SIGTERM the supervisor never sent.
    kill(pid as i32, libc::SIGTERM);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(1), "a crash is no success: {status}");
    let why = sup.wait_line("crashed");
    assert!(
        why.starts_with(&format!("containerflip: gen 1 pid {pid} crashed"))
            && why.contains("--on-crash exit"),
        "{why}"
    );
    assert_eq!(
        events(&sup.records, pid).last().map(String::as_str),
        Some("exit 0")
    );
}

// ---------------------------------------------------------------------------
// Notify keys.

#[test]
fn stopping_from_the_active_generation_starts_its_replacement() {
    let dir = TempDir::new("stopping");
    let sup = Supervisor::start(&dir, &worker_args(&[]), &[]);
    let addr = sup.listen_addr();
    let p1 = sup.wait_ready(1);
    let sock = notify_socket(&sup.records, p1);
    assert_eq!(served_gen(addr), 1);

    send_dgram(&sock, b"STOPPING=1");
    sup.wait_line(&format!("gen 1 pid {p1} is leaving on its own"));
    let p2 = sup.wait_ready(2);
    assert_ne!(p1, p2);
    sup.wait_gen(1, "draining");
    wait_event(&sup.records, p1, "signal 15");
    sup.wait_gen(1, "exited with status 0");
    for _ in 0..5 {
        assert_eq!(served_gen(addr), 2);
    }
    assert_eq!(sup.count("crashed"), 0, "{:?}", sup.lines());
    assert_eq!(sup.count("containerflip: gen 3 "), 0, "one replacement");
    let json = status_json(&dir);
    assert!(
        gen_json(&json, p2).contains("\"state\":\"ready\""),
        "{json}"
    );
}

/// A worker that asks to be replaced as soon as it is ready, every time,
/// is replaced with the crash backoff (100 ms, 200 ms, 400 ms, …) rather
/// than in a tight spawn loop.
#[test]
fn stopping_right_after_ready_is_replaced_with_backoff() {
    let dir = TempDir::new("stoploop");
    let script = dir.join("leaver.py");
    fs::write(
        &script,
        "import os, signal, socket, sys\n\
         signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         s.sendto(b'READY=1\\nSTOPPING=1', os.environ['NOTIFY_SOCKET'])\n\
         while True:\n    signal.pause()\n",
    )
    .unwrap();
    let mut sup = Supervisor::start(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--",
            "python3",
            script.to_str().unwrap(),
        ],
        &[],
    );
    sup.wait_ready(5);
    let delays: Vec<String> = (1..=4)
        .map(|n| {
            let replacing = sup.wait_for(&format!("gen {n}'s replacement delay"), |l| {
                l.starts_with(&format!("containerflip: gen {n} pid "))
                    && l.contains("replacing it in")
            });
            replacing.rsplit(' ').next().unwrap().to_string()
        })
        .collect();
    assert_eq!(delays, ["100ms", "200ms", "400ms", "800ms"]);
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success());
}

/// EXTEND_TIMEOUT_USEC moves a starting generation's ready deadline. The
/// clock is a second supervisor with the same `--ready-timeout`, started
/// after the first one's generation was spawned: once it has given up, the
/// first one's original deadline has passed.
#[test]
fn extend_timeout_moves_the_ready_deadline() {
    // 10 s: the window in which EXTEND must arrive, generous on a busy
    // machine (it is a safety margin, not something the test measures).
    let args = worker_args(&["--ready-timeout", "10s"]);
    let env = [("WORKER_NO_READY", "1")];
    let dir_a = TempDir::new("extend-a");
    let a = Supervisor::start(&dir_a, &args, &env);
    let addr = a.listen_addr();
    let (pa, _) = a.wait_gen(1, "spawned");
    let sock = notify_socket(&a.records, pa);
    send_dgram(&sock, b"EXTEND_TIMEOUT_USEC=60000000");
    a.wait_line(&format!("gen 1 pid {pa} extended its starting deadline"));

    let dir_b = TempDir::new("extend-b");
    let mut clock = Supervisor::start(&dir_b, &args, &env);
    clock.wait_line("no READY=1 within 10s");
    assert_eq!(clock.wait_exit().code(), Some(1));

    assert_eq!(a.count("no READY=1 within"), 0, "{:?}", a.lines());
    assert_eq!(a.count("deploy failed"), 0, "{:?}", a.lines());
    assert!(pid_exists(pa));
    let json = status_json(&dir_a);
    assert!(
        gen_json(&json, pa).contains("\"state\":\"starting\""),
        "{json}"
    );

    send_dgram(&sock, b"READY=1");
    assert_eq!(a.wait_ready(1), pa);
    assert_eq!(served_gen(addr), 1);
}

/// A generation that misses a deadline EXTEND_TIMEOUT_USEC moved is not
/// reported as missing the configured --ready-timeout: the reason gives the
/// time it had and why.
#[test]
fn a_missed_extended_deadline_says_so() {
    let dir = TempDir::new("extend-miss");
    let mut sup = Supervisor::start(
        &dir,
        &worker_args(&["--ready-timeout", "10m"]),
        &[("WORKER_NO_READY", "1")],
    );
    let (p1, _) = sup.wait_gen(1, "spawned");
    send_dgram(&notify_socket(&sup.records, p1), b"EXTEND_TIMEOUT_USEC=1");
    let line = sup.wait_line(&format!("gen 1 pid {p1} deploy failed: no READY=1 within "));
    assert!(line.ends_with(" (EXTEND_TIMEOUT_USEC)"), "{line}");
    assert_eq!(sup.wait_exit().code(), Some(1));
}

/// A stop waits up to --drain-timeout, whatever EXTEND_TIMEOUT_USEC a
/// draining worker sent: before the stop (gen 1, retired by a deploy) or
/// during it (gen 2). Both ignore SIGTERM and are SIGKILLed at the stop's
/// deadline rather than a century later.
#[test]
fn extend_timeout_cannot_outlast_a_stop() {
    const FOREVER: &[u8] = b"EXTEND_TIMEOUT_USEC=18446744073709551615";
    let dir = TempDir::new("extend-stop");
    let mut sup = Supervisor::start(
        &dir,
        &worker_args(&["--drain-timeout", "2s"]),
        &[("WORKER_IGNORE_TERM", "1")],
    );
    let p1 = sup.wait_ready(1);
    sup.signal(libc::SIGHUP);
    let p2 = sup.wait_ready(2);
    sup.wait_line(&format!("gen 1 pid {p1} draining"));
    send_dgram(&notify_socket(&sup.records, p1), FOREVER);
    sup.wait_line(&format!("gen 1 pid {p1} extended its draining deadline"));

    sup.signal(libc::SIGTERM);
    sup.wait_line(&format!("gen 2 pid {p2} draining"));
    send_dgram(&notify_socket(&sup.records, p2), FOREVER);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(137), "{:?}", sup.lines());
    for (n, pid) in [(1, p1), (2, p2)] {
        assert_eq!(
            sup.count(&format!("gen {n} pid {pid} killed at drain deadline")),
            1,
            "{:?}",
            sup.lines()
        );
    }
}

/// Text a worker chose reaches the log with its control characters
/// escaped: a CR or an escape sequence cannot forge a line or clear the
/// operator's screen.
#[test]
fn worker_text_in_log_lines_is_escaped() {
    let dir = TempDir::new("logescape");
    let sup = Supervisor::start(&dir, &worker_args(&["-v"]), &[]);
    let p1 = sup.wait_ready(1);
    let sock = notify_socket(&sup.records, p1);
    send_dgram(&sock, b"STATUS=a\rcontainerflip: gen 9 pid 1 ready in 1ms");
    send_dgram(&sock, b"bad\x1b[2Jline");
    let status = sup.wait_line(&format!("gen 1 pid {p1} STATUS=a"));
    assert!(
        status.ends_with(r"STATUS=a\rcontainerflip: gen 9 pid 1 ready in 1ms"),
        "{status:?}"
    );
    let bad = sup.wait_line(&format!("gen 1 pid {p1} bad notify message dropped"));
    assert!(bad.contains(r"bad\u{1b}[2Jline"), "{bad:?}");
    let lines = sup.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("containerflip: gen 9 ")),
        "a forged line: {lines:?}"
    );
}

#[test]
fn errno_is_logged() {
    let dir = TempDir::new("errno");
    let sup = Supervisor::start(&dir, &worker_args(&[]), &[]);
    let addr = sup.listen_addr();
    let p1 = sup.wait_ready(1);
    send_dgram(&notify_socket(&sup.records, p1), b"ERRNO=5");
    let line = sup.wait_line(&format!("gen 1 pid {p1} reported ERRNO=5"));
    assert!(line.contains("Input/output error"), "{line}");
    assert_eq!(served_gen(addr), 1, "nothing else changes");
    assert_eq!(sup.count("containerflip: gen 2 "), 0);
}

/// READY=1 from uid 65534 on a starting generation's notify socket is
/// refused; the generation stays starting until its own uid says READY=1.
#[test]
fn ready_from_another_uid_is_refused() {
    if !is_root() {
        skipped(
            "ready_from_another_uid_is_refused",
            "needs root to send as another uid",
        );
        return;
    }
    let dir = TempDir::new("notify-uid");
    let sup = Supervisor::start(&dir, &worker_args(&["-v"]), &[("WORKER_NO_READY", "1")]);
    let addr = sup.listen_addr();
    let (p1, _) = sup.wait_gen(1, "spawned");
    let sock = notify_socket(&sup.records, p1);
    // Connected as root (the runtime directory is 0700); the message is
    // sent by a thread that then runs as nobody, and the credentials the
    // kernel attaches are the sender's at send time.
    let s = UnixDatagram::unbound().unwrap();
    s.connect(&sock).expect("connect to the notify socket");
    as_nobody(|| {
        s.send(b"READY=1").expect("send as nobody");
    });
    let line = sup.wait_line("refused");
    assert!(
        line.starts_with(&format!("containerflip: gen 1 pid {p1} ")) && line.contains("65534"),
        "{line}"
    );
    // Everything sent before this marker has been read.
    send_dgram(&sock, b"STATUS=after-nobody");
    sup.wait_line(&format!("gen 1 pid {p1} STATUS=after-nobody"));
    assert_eq!(sup.count(" ready in "), 0, "{:?}", sup.lines());
    // The refusal, logged once, does not silence the worker's own bad
    // messages, which are logged once too.
    send_dgram(&sock, b"no equals sign");
    let line = sup.wait_line("bad notify message dropped");
    assert!(line.contains(&format!("gen 1 pid {p1} ")), "{line}");
    let json = status_json(&dir);
    assert!(
        gen_json(&json, p1).contains("\"state\":\"starting\""),
        "{json}"
    );
    // The same message from our own uid is heard.
    send_dgram(&sock, b"READY=1");
    assert_eq!(sup.wait_ready(1), p1);
    assert_eq!(served_gen(addr), 1);
}

// ---------------------------------------------------------------------------
// Forwarded signals.

/// A worker that records every signal it gets (`signal N` lines in
/// argv[1]), sends READY=1 itself and exits 0 on SIGTERM.
const PY_SIGNALS: &str = r#"
import os, signal, socket, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def on(sig, frame):
    os.write(fd, b"signal %d\n" % sig)
    if sig == signal.SIGTERM:
        sys.exit(0)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
          signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
    signal.signal(s, on)
path = os.environ["NOTIFY_SOCKET"]
if path.startswith("@"):
    path = "\0" + path[1:]
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.sendto(b"READY=1", path)
n.close()
while True:
    signal.pause()
"#;

#[test]
fn quit_winch_ttin_ttou_usr1_usr2_reach_the_active_worker() {
    let dir = TempDir::new("fwd");
    let script = dir.join("signals.py");
    fs::write(&script, PY_SIGNALS).unwrap();
    let record = dir.join("signals");
    let mut sup = Supervisor::start(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--",
            "python3",
            script.to_str().unwrap(),
            record.to_str().unwrap(),
        ],
        &[],
    );
    sup.wait_ready(1);
    let got = || -> Vec<String> {
        fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let mut want = Vec::new();
    for sig in [
        libc::SIGQUIT,
        libc::SIGWINCH,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        sup.signal(sig);
        want.push(format!("signal {sig}"));
        wait_until(&format!("the worker to record signal {sig}"), || {
            got().len() >= want.len()
        });
        assert_eq!(got(), want, "each signal once, in order");
    }
    // None of them stopped, deployed or killed anything.
    assert!(pid_exists(sup.pid));
    assert_eq!(sup.count("containerflip: gen 2 "), 0, "{:?}", sup.lines());
    assert_eq!(sup.count("stopping"), 0);
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success());
    want.push(format!("signal {}", libc::SIGTERM));
    assert_eq!(got(), want);
}

// ---------------------------------------------------------------------------
// Crash restarts.

/// The backoff resets after 10 s of service without a gap, however many
/// deploys that service spanned: a generation deployed a moment before it
/// crashes restarts after 100 ms again, not after the doubled delay.
#[test]
fn backoff_resets_after_ten_seconds_of_service_across_deploys() {
    let dir = TempDir::new("backoff-reset");
    let sup = Supervisor::start(&dir, &worker_args(&[]), &[]);
    let addr = sup.listen_addr();
    // Two crashes in quick succession: 100 ms, then 200 ms.
    kill(sup.wait_ready(1) as i32, libc::SIGKILL);
    kill(sup.wait_ready(2) as i32, libc::SIGKILL);
    sup.wait_ready(3);
    // 10 s of service.
    ten_seconds_pass();
    // A deploy is no gap in the service; its generation then crashes.
    let out = client(&dir, "deploy", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    kill(sup.wait_ready(4) as i32, libc::SIGKILL);
    sup.wait_ready(5);
    assert_eq!(
        restart_delays(&sup),
        ["100ms", "200ms", "100ms"],
        "{:?}",
        sup.lines()
    );
    assert_eq!(served_gen(addr), 5);
}

/// The delays of the `restarting in …` lines so far, in order.
fn restart_delays(sup: &Supervisor) -> Vec<String> {
    sup.lines()
        .iter()
        .filter_map(|l| l.split_once("restarting in ").map(|(_, d)| d.to_string()))
        .collect()
}

/// Returns once 10 s have passed (the backoff's reset time), measured by
/// the supervisor's own clock: one started now whose 10-second ready
/// timeout has to expire.
fn ten_seconds_pass() {
    let dir = TempDir::new("ten-seconds");
    let mut clock = Supervisor::start(
        &dir,
        &worker_args(&["--ready-timeout", "10s"]),
        &[("WORKER_NO_READY", "1")],
    );
    clock.wait_line("no READY=1 within 10s");
    assert_eq!(clock.wait_exit().code(), Some(1));
}

/// A supervisor whose first generation served and was then SIGKILLed,
/// and whose every later worker exits before READY=1 (its env file says
/// so): a crash loop, restarting with the backoff.
fn crash_loop(dir: &TempDir) -> Supervisor {
    let (sup, env_file) = start_with_env_file(dir, "", &[], &[]);
    let p1 = sup.wait_ready(1);
    write_file(&env_file, "WORKER_EXIT_BEFORE_READY=1\n");
    kill(p1 as i32, libc::SIGKILL);
    sup
}

/// Every restart fails (the env file makes new workers exit 1 before
/// READY=1): the backoff doubles from 100 ms. A deploy during the backoff
/// starts at once: its result comes before any further restart.
#[test]
fn crash_restart_backoff_doubles_and_a_deploy_cuts_it_short() {
    let dir = TempDir::new("backoff");
    let sup = crash_loop(&dir);
    let addr = sup.listen_addr();

    // Up to 6.4 s, so the deploy below has a generous window to arrive
    // while the supervisor waits out the backoff.
    let want = [
        "100ms", "200ms", "400ms", "800ms", "1600ms", "3200ms", "6400ms",
    ];
    let last_delay = sup.wait_for_nth("the seventh restart delay", want.len(), |l| {
        l.contains("restarting in ")
    });
    // `gen K pid P: nothing is serving; restarting in …`: K is the newest.
    let newest: u64 = last_delay
        .strip_prefix("containerflip: gen ")
        .and_then(|r| r.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {last_delay:?}"));
    assert_eq!(
        restart_delays(&sup)[..want.len()],
        want,
        "{:?}",
        sup.lines()
    );
    // Each restart in between failed.
    assert!(sup.count("deploy failed: exited with status 1 before READY=1") >= want.len() - 1);

    // A deploy of a command that comes up despite the env file.
    let out = client(
        &dir,
        "deploy",
        &["--", "env", "-u", "WORKER_EXIT_BEFORE_READY", worker()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let result = text(&out.stdout);
    let last = result.lines().last().unwrap_or("").to_string();
    let n: u64 = last
        .strip_prefix("deployed gen ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a deployed line: {result:?}"));
    assert_eq!(
        n,
        newest + 1,
        "a backoff restart ran before the deploy: {:?}",
        sup.lines()
    );
    sup.wait_ready(n);
    let lines = sup.lines();
    let ready_at = lines
        .iter()
        .position(|l| {
            l.starts_with(&format!("containerflip: gen {n} pid ")) && l.contains(" ready in ")
        })
        .unwrap();
    let restarts_before: Vec<&String> = lines[..ready_at]
        .iter()
        .filter(|l| l.contains("restarting in "))
        .collect();
    assert_eq!(
        restarts_before.len(),
        want.len(),
        "the deploy waited out the backoff: {lines:?}"
    );
    assert_eq!(served_gen(addr), n);
    // And the pending restart was dropped: nothing else starts.
    assert_eq!(
        sup.count(&format!("containerflip: gen {} ", n + 1)),
        0,
        "{lines:?}"
    );
}

// ---------------------------------------------------------------------------
// deploy --timeout.

/// `deploy --timeout 0` waits for a held generation; a `deploy --timeout
/// 1s` started after it gives up (exit 1) while the first still waits;
/// the supervisor carries on and both deploys complete.
#[test]
fn deploy_timeout_gives_up_and_zero_waits() {
    let dir = TempDir::new("dtimeout");
    let (sup, env_file, fifo) = start_held(&dir, &[], &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    write_file(&env_file, &format!("HOLD={}\n", fifo.display()));

    let mut waiting = Bg::spawn(client_cmd(&dir, "deploy", &["--timeout", "0"]));
    waiting.wait_line("spawned gen 2");

    let out = client(&dir, "deploy", &["--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(said.contains("gave up waiting"), "{said}");
    assert!(waiting.running(), "deploy --timeout 0 gave up");
    assert!(pid_exists(sup.pid));
    assert_eq!(sup.count(" ready in "), 1, "gen 2 is still held");

    write_file(&env_file, "");
    release(&fifo);
    let out = waiting.finish();
    let (code, lines, stderr) = (out.status.code(), out.lines(), &out.stderr);
    assert_eq!(code, Some(0), "{lines:?} {stderr}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("deployed gen 2 ")),
        "{lines:?}"
    );
    // The deploy whose client gave up still runs (queued behind gen 2).
    sup.wait_ready(3);
    sup.wait_gen(2, "exited");
    assert_eq!(served_gen(addr), 3);
}

// ---------------------------------------------------------------------------
// Idle.

/// (voluntary, nonvoluntary) context switches of `pid`.
fn ctxt_switches(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// Traffic to the worker does not involve the supervisor, and an idle
/// supervisor has no timer to wake it: it stays asleep in poll(2) (its
/// voluntary context switches do not change). Reading /proc does not wake
/// it. One slow request makes the window longer than a second, so a
/// periodic tick would show. Up to three tries, in case the supervisor had
/// not quite gone back to sleep after the first generation came up.
#[test]
fn an_idle_supervisor_makes_no_system_calls() {
    let dir = TempDir::new("idle");
    let sup = Supervisor::start(&dir, &worker_args(&[]), &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    let mut seen = Vec::new();
    for _ in 0..3 {
        wait_until("the supervisor to sleep", || {
            stat_field(sup.pid, 3).as_deref() == Some("S")
        });
        let before = ctxt_switches(sup.pid);
        for _ in 0..50 {
            assert_eq!(served_gen(addr), 1);
        }
        let r = get(addr, "/slow?ms=1100").expect("GET /slow");
        assert_eq!(r.status, 200);
        let after = ctxt_switches(sup.pid);
        if before.0 == after.0 {
            return;
        }
        seen.push((before, after));
    }
    panic!("the supervisor woke up while idle (voluntary, nonvoluntary): {seen:?}");
}

// ---------------------------------------------------------------------------
// A child stuck before exec.

/// `strace -f` running `containerflip run` with the first `SYSCALL` of
/// every process held for an hour (strace's delay injection): a child
/// stuck in that system call between fork and exec. `None` (and a
/// visible skip) without strace.
fn run_under_strace(dir: &TempDir, test: &str, syscall: &str, args: &[&str]) -> Option<Supervisor> {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        skipped(test, "no strace (the CI script installs it)");
        return None;
    }
    let ctl = control(dir);
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        &format!("trace={syscall}"),
    ])
    .args([
        "-e",
        &format!("inject={syscall}:delay_enter=3600s"),
        bin(),
        "run",
    ])
    .args([
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
    ])
    .args(args)
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    Some(Supervisor::spawn(cmd, dir, &[]))
}

/// A child stuck between fork and exec (here held inside chdir(2) by
/// strace's syscall-delay injection, as a hung network mount would hold
/// it) holds up nothing but its own generation: the supervisor goes on
/// answering the control socket, with the generation shown as starting.
/// Once the child is let go it execs and serves as usual.
#[test]
fn a_child_stuck_before_exec_does_not_block_the_supervisor() {
    let test = "a_child_stuck_before_exec_does_not_block_the_supervisor";
    let dir = TempDir::new("stuckexec");
    let args = ["--chdir", dir.str(), "--", worker()];
    let Some(sup) = run_under_strace(&dir, test, "chdir", &args) else {
        return;
    };
    let (p1, _) = sup.wait_gen(1, "spawned");
    // sup.pid is strace; the supervisor is the stuck child's parent.
    let real: u32 = stat_field(p1, 4).and_then(|p| p.parse().ok()).unwrap();

    let out = client(&dir, "status", &["--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json = status_json(&dir);
    assert!(
        gen_json(&json, p1).contains("\"state\":\"starting\""),
        "{json}"
    );
    assert_eq!(sup.count("ready in"), 0, "{:?}", sup.lines());

    // strace gone, the chdir completes: gen 1 execs and becomes ready.
    kill(sup.pid as i32, libc::SIGKILL);
    assert_eq!(sup.wait_ready(1), p1);
    assert_eq!(served_gen(sup.listen_addr()), 1);
    kill(real as i32, libc::SIGTERM);
    sup.wait_line("exiting with status 0");
    wait_gone(real);
}

/// A stop signal that comes while the child has not even made its process
/// group yet (held inside setpgid(2)) reaches the worker once it has
/// exec'd: the child discards signals pending before its setpgid, so the
/// supervisor holds the signal back until the exec is reported, rather
/// than losing it and waiting out the (here ten-minute) drain deadline.
#[test]
fn a_stop_signal_before_the_exec_reaches_the_worker_after_it() {
    let test = "a_stop_signal_before_the_exec_reaches_the_worker_after_it";
    let dir = TempDir::new("stopb4exec");
    let args = ["--drain-timeout", "10m", "--", worker()];
    let Some(sup) = run_under_strace(&dir, test, "setpgid", &args) else {
        return;
    };
    let (p1, _) = sup.wait_gen(1, "spawned");
    let real: u32 = stat_field(p1, 4).and_then(|p| p.parse().ok()).unwrap();
    kill(real as i32, libc::SIGTERM);
    sup.wait_gen(1, "draining");
    // strace gone, the child makes its group, execs, and gets the signal.
    kill(sup.pid as i32, libc::SIGKILL);
    let (_, exit) = sup.wait_gen(1, "exited with");
    assert!(
        exit.ends_with("exited with status 0") || exit.ends_with("exited with signal SIGTERM"),
        "{exit}"
    );
    sup.wait_line("exiting with status");
    assert_eq!(sup.count("killed at"), 0, "{:?}", sup.lines());
    wait_gone(real);
}

/// SPEC §5.7: the backoff doubles *up to 10 s* and stays there. Each
/// restart fails (the env file makes the worker exit before READY=1), and a
/// `deploy` after each `restarting in` line cuts the wait short (it starts
/// at once while nothing is ready) and fails the same way, so the next
/// restart delay is logged without waiting the current one out.
#[test]
fn crash_restart_backoff_stops_growing_at_ten_seconds() {
    let dir = TempDir::new("backoff-cap");
    let sup = crash_loop(&dir);

    let want = [
        "100ms", "200ms", "400ms", "800ms", "1600ms", "3200ms", "6400ms", "10s", "10s",
    ];
    for k in 1..=want.len() {
        sup.wait_for_nth(&format!("restart delay {k}"), k, |l| {
            l.contains("restarting in ")
        });
        if k < want.len() {
            // Fails like the restarts (queued behind one, if the timer beat
            // it): each failure while nothing serves takes the next delay.
            let out = client(&dir, "deploy", &[]);
            assert_eq!(out.status.code(), Some(1), "{out:?}");
        }
    }
    assert_eq!(
        restart_delays(&sup)[..want.len()],
        want,
        "{:?}",
        sup.lines()
    );
}

/// SPEC §7: USR1, USR2, QUIT, WINCH, TTIN and TTOU go to the active
/// generation's *worker*, not to its whole process group: a prefork
/// server's own workers (gunicorn's, a node cluster's) must not get the
/// TTIN/TTOU meant for their primary, whose default action stops them.
#[test]
fn forwarded_signals_reach_the_worker_not_the_rest_of_its_group() {
    let dir = TempDir::new("fwd-group");
    let mut sup = Supervisor::start(
        &dir,
        &worker_args(&["--drain-timeout", "10m"]),
        &[("WORKER_SPAWN", "sleeper"), ("WORKER_IGNORE_TERM", "1")],
    );
    let pid = sup.wait_ready(1);
    // The sleeper writes its pid once its signal handlers are installed.
    let child = grandchild(&sup.records, pid);
    assert_eq!(process_group(child), Some(pid), "the child is in the group");

    sup.signal(libc::SIGUSR1);
    wait_event(&sup.records, pid, &format!("signal {}", libc::SIGUSR1));
    // The stop signal goes to the whole group: once the child has it,
    // anything sent to the group before it has been recorded too.
    sup.signal(libc::SIGTERM);
    wait_event(&sup.records, child, &format!("signal {}", libc::SIGTERM));
    assert_eq!(
        events(&sup.records, child),
        [format!("signal {}", libc::SIGTERM)],
        "the worker's child got the forwarded SIGUSR1 too"
    );
    // Both ignore the stop signal (and the drain deadline is far off, so
    // a slow machine cannot kill the child before it records it): a
    // second TERM ends them.
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit().code(), Some(137));
}

/// `STOPPING=1` from an active generation that has served for 10 s or
/// more starts its replacement at once (no backoff: it is not a loop).
#[test]
fn stopping_after_ten_seconds_of_service_is_replaced_at_once() {
    let dir = TempDir::new("stopping-old");
    let sup = Supervisor::start(&dir, &worker_args(&[]), &[]);
    let addr = sup.listen_addr();
    let p1 = sup.wait_ready(1);
    let sock = notify_socket(&sup.records, p1);
    // 10 s of service.
    ten_seconds_pass();

    send_dgram(&sock, b"STOPPING=1");
    sup.wait_line(&format!("gen 1 pid {p1} is leaving on its own"));
    sup.wait_line("deploy requested (STOPPING=1 from the active generation)");
    sup.wait_ready(2);
    // Gone, not just told to drain: until it handles SIGTERM it may still
    // accept a connection.
    sup.wait_line(&format!("gen 1 pid {p1} exited with status 0"));
    assert_eq!(served_gen(addr), 2);
    assert_eq!(sup.count("replacing it in"), 0, "{:?}", sup.lines());
}

/// `-q` keeps warnings and errors only: a whole start, serve and stop
/// logs no lifecycle line, while a warning still shows.
#[test]
fn quiet_logs_warnings_and_nothing_else() {
    let dir = TempDir::new("quiet");
    let mut sup = Supervisor::start(&dir, &worker_args(&["-q"]), &[]);
    wait_until("gen 1 serving (status --check)", || {
        client(&dir, "status", &["--check"]).status.code() == Some(0)
    });
    // A warning: the control socket removed (and bound again).
    fs::remove_file(control(&dir)).unwrap();
    sup.wait_line("was removed or replaced (by a worker?); bound it again");
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit().code(), Some(0));
    let lines = sup.lines();
    for event in [
        "listening on ",
        " spawned",
        " ready in ",
        "stopping (",
        " draining ",
        " exited with status ",
    ] {
        assert!(
            !lines.iter().any(|l| l.contains(event)),
            "{event:?} logged with -q: {lines:?}"
        );
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
}
