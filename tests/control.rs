//! The control socket and the client commands (SPEC §5, §6): `deploy`
//! progress and failures, argv carried byte-exact, `rollback`, `status` in
//! its three forms, concurrent and abandoned deploys, hostile input on the
//! socket, foreign uids, no supervisor at all, and `stop`.
//!
//! Every supervisor gets its own temp dir and control socket
//! (`--control DIR/control.sock`, given to `run` and to every client
//! command) and listens on `127.0.0.1:0`. Slow deploys are held by a gate:
//! a `sh` that waits for a line on a FIFO the test writes, so nothing here
//! depends on timing.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;

use crate::common::{
    Bg, DEADLINE, HOLD_SCRIPT, NOBODY, Out, Supervisor, TempDir, as_nobody, as_uid, bin,
    client_cmd, client_cmd_at, control, get, is_root, kill, mkfifo, release, run_client, skipped,
    start_record, stat_field, worker, write_file,
};
use crate::common::{fd_count, notify_socket, send_dgram, served_gen, wait_until};

/// Connections the supervisor serves at once (control::MAX_CLIENTS).
const MAX_CLIENTS: usize = 128;

// ---------------------------------------------------------------------------
// Private helpers.

/// `containerflip run --listen 127.0.0.1:0 --control DIR/control.sock
/// EXTRA -- worker`, not waiting for anything.
fn start_with(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> Supervisor {
    let ctl = control(dir);
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--control",
        ctl.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push("--");
    args.push(worker());
    Supervisor::start(dir, &args, env)
}

/// A supervisor whose first generation is ready; returns it, its HTTP
/// address and gen 1's pid.
fn start(dir: &TempDir, extra: &[&str], env: &[(&str, &str)]) -> (Supervisor, SocketAddr, u32) {
    let sup = start_with(dir, extra, env);
    let addr = sup.listen_addr();
    let pid = sup.wait_ready(1);
    (sup, addr, pid)
}

/// `containerflip VERB --control DIR/control.sock ARGS`.
fn cf(dir: &TempDir, verb: &str, args: &[&str]) -> Out {
    run_client(client_cmd(dir, verb, args))
}

/// `containerflip deploy --control … -- ARGV`.
fn deploy_cmd(dir: &TempDir, argv: &[OsString]) -> Command {
    let mut rest: Vec<&OsStr> = Vec::new();
    if !argv.is_empty() {
        rest.push(OsStr::new("--"));
        rest.extend(argv.iter().map(OsString::as_os_str));
    }
    client_cmd_at(&control(dir), "deploy", &rest)
}

/// A command that waits for a line on the FIFO `gate` (created here),
/// then `exec`s `then` (one program, same pid, through the harness's
/// `HOLD_SCRIPT`) or exits with `exit_code` when `then` is empty.
/// `open_gate` lets it go.
fn gated(gate: &Path, then: &[&str], exit_code: i32) -> Vec<OsString> {
    mkfifo(gate);
    let mut argv: Vec<OsString> = Vec::new();
    if let [program] = then {
        let mut hold = OsString::from("HOLD=");
        hold.push(gate);
        argv.extend([
            "env".into(),
            hold,
            "sh".into(),
            "-c".into(),
            HOLD_SCRIPT.into(),
            program.into(),
        ]);
    } else {
        assert!(then.is_empty(), "gated takes one program: {then:?}");
        let script = format!("read line < \"$1\"; exit {exit_code}");
        argv.extend(["sh".into(), "-c".into(), script.into(), "sh".into()]);
        argv.push(gate.into());
    }
    argv
}

fn open_gate(gate: &Path) {
    release(gate);
}

/// Parses `deployed gen N pid P`.
fn deployed(line: &str) -> (u64, u32) {
    let rest = line
        .strip_prefix("deployed gen ")
        .unwrap_or_else(|| panic!("not a 'deployed gen N pid P' line: {line:?}"));
    let (n, pid) = rest
        .split_once(" pid ")
        .expect("'pid' in the deployed line");
    (n.parse().unwrap(), pid.trim().parse().unwrap())
}

/// Parses `spawned gen N pid P`.
fn spawned(line: &str) -> (u64, u32) {
    let rest = line
        .strip_prefix("spawned gen ")
        .unwrap_or_else(|| panic!("not a 'spawned gen N pid P' line: {line:?}"));
    let (n, pid) = rest.split_once(" pid ").expect("'pid' in the spawned line");
    (n.parse().unwrap(), pid.trim().parse().unwrap())
}

/// `GET /` answered 200 by generation `n`.
fn assert_served_by(addr: SocketAddr, n: u64) {
    let r = get(addr, "/").expect("HTTP request");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.generation(), n, "served by the wrong generation: {r:?}");
}

/// After a deploy to generation `n`: once every generation in `old` has
/// exited, `GET /` is answered by `n`. (Until then a draining worker may
/// still take a connection it was woken for before its stop signal
/// arrived, and answer it with `Connection: close`.)
fn assert_switched_to(sup: &Supervisor, addr: SocketAddr, n: u64, old: &[u64]) {
    for &o in old {
        sup.wait_gen(o, "exited");
    }
    assert_served_by(addr, n);
}

/// `status --json` piped through python3's json module; `script` sees the
/// object as `d` and prints what the test wants.
fn status_json(dir: &TempDir, script: &str) -> String {
    let out = cf(dir, "status", &["--json"]);
    assert_eq!(out.code(), 0, "status --json: {out:?}");
    assert_eq!(
        out.stdout.lines().count(),
        1,
        "one JSON object on one line: {out:?}"
    );
    let code = format!("import json,sys\nd=json.load(sys.stdin)\n{script}");
    let mut py = Command::new("python3")
        .args(["-c", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to check status --json");
    py.stdin
        .take()
        .unwrap()
        .write_all(out.stdout.as_bytes())
        .unwrap();
    let res = py.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "python3 rejected status --json: {}\nJSON: {}",
        String::from_utf8_lossy(&res.stderr),
        out.stdout
    );
    String::from_utf8(res.stdout).unwrap()
}

/// One field of the status JSON, as Python's `json.dumps` renders it.
fn json_field(dir: &TempDir, expr: &str) -> String {
    status_json(dir, &format!("print(json.dumps({expr}))"))
        .trim_end()
        .to_string()
}

/// Hex of the UTF-8 of each string in a JSON list (python side).
const HEX_LIST: &str = "print(' '.join(a.encode('utf-8','surrogatepass').hex() or '-' for a in L))";

fn hex_lossy(args: &[Vec<u8>]) -> String {
    args.iter()
        .map(|a| {
            let h: String = String::from_utf8_lossy(a)
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect();
            if h.is_empty() { "-".to_string() } else { h }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the process has exited (a zombie, or already reaped).
fn has_exited(pid: u32) -> bool {
    stat_field(pid, 3).is_none_or(|s| s == "Z")
}

/// Sends raw bytes on a fresh control connection and reads everything the
/// supervisor answers until it closes.
fn raw_exchange(ctl: &Path, request: Vec<u8>) -> String {
    let s = UnixStream::connect(ctl).expect("connect to the control socket");
    exchange_on(s, request)
}

/// Writes `request` (stopping at the first error: the supervisor may close
/// before it has read everything) while reading the answer to the end.
fn exchange_on(s: UnixStream, request: Vec<u8>) -> String {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    let w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let _ = (&w).write_all(&request);
    });
    let mut reply = Vec::new();
    if let Err(e) = (&s).read_to_end(&mut reply) {
        // ECONNRESET after a reply is fine; a timeout is not.
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the supervisor neither answered nor closed: {e}; got {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    writer.join().unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

/// The reply is exactly one `error …` line containing `needle`.
fn assert_error(what: &str, reply: &str, needle: &str) {
    assert!(
        reply.starts_with("error ") && reply.ends_with('\n') && reply.lines().count() == 1,
        "{what}: expected one 'error …' line, got {reply:?}"
    );
    assert!(
        reply.contains(needle),
        "{what}: expected {needle:?} in {reply:?}"
    );
}

/// The supervisor still serves HTTP from `gen` and answers `status`.
fn assert_healthy(dir: &TempDir, addr: SocketAddr, gen_n: u64) {
    assert_served_by(addr, gen_n);
    let out = cf(dir, "status", &[]);
    assert_eq!(out.code(), 0, "status: {out:?}");
    assert!(
        out.stdout.contains(&format!("active gen {gen_n}")),
        "status: {out:?}"
    );
    let out = cf(dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "status --check: {out:?}");
}

// ---------------------------------------------------------------------------
// 1. deploy: progress lines, success, failing closed.

#[test]
fn deploy_prints_progress_then_the_result() {
    let dir = TempDir::new("ctl-progress");
    let (sup, addr, pid1) = start(&dir, &[], &[]);
    assert_served_by(addr, 1);

    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    let lines = out.lines();
    let pid2 = sup.wait_ready(2);
    assert_eq!(
        lines.first().copied(),
        Some(format!("spawned gen 2 pid {pid2}").as_str()),
        "{out:?}"
    );
    let ready = lines
        .iter()
        .position(|l| l.starts_with("gen 2 ready in ") && l.ends_with(" ms"))
        .unwrap_or_else(|| panic!("no 'gen 2 ready in N ms' line: {out:?}"));
    let draining = lines
        .iter()
        .position(|l| *l == "draining gen 1")
        .unwrap_or_else(|| panic!("no 'draining gen 1' line: {out:?}"));
    assert!(0 < ready && ready < draining, "order: {out:?}");
    assert_eq!(draining + 2, lines.len(), "the result comes last: {out:?}");
    assert_eq!(out.last(), format!("deployed gen 2 pid {pid2}"), "{out:?}");

    sup.wait_line(&format!("gen 1 pid {pid1} exited with status 0"));
    assert_served_by(addr, 2);
}

#[test]
fn failed_deploy_reports_the_exit_status_and_the_old_generation_serves() {
    let dir = TempDir::new("ctl-fail");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");

    let mut bg = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[], 3)));
    let (n, _) = spawned(&bg.wait_line("spawned gen "));
    assert_eq!(n, 2);
    // While gen 2 is starting, gen 1 serves and nothing else changed.
    for _ in 0..20 {
        assert_served_by(addr, 1);
    }
    assert_eq!(cf(&dir, "status", &["--check"]).code(), 0);
    assert_eq!(
        status_json(&dir, "print(d['active'], d['deploying'], d['serving'])").trim(),
        "1 2 True"
    );
    assert!(!bg.exited(), "deploy returned before its generation ended");

    open_gate(&gate);
    let out = bg.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains("deploy of gen 2 failed: exited with status 3 before READY=1"),
        "{out:?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(!out.stdout.contains("deployed"), "{out:?}");
    sup.wait_gen(2, "deploy failed: exited with status 3 before READY=1");

    // Failed closed: gen 1 untouched, the command unchanged.
    assert_served_by(addr, 1);
    assert_eq!(sup.count("draining"), 0, "{:?}", sup.lines());
    assert_eq!(
        json_field(&dir, "d['command']"),
        format!("[\"{}\"]", worker())
    );
    assert_eq!(json_field(&dir, "d['previous_command']"), "null");
    assert_eq!(json_field(&dir, "d['counters']['deploys_failed']"), "1");
    assert!(json_field(&dir, "d['last_failure']").contains("exited with status 3 before READY=1"));

    // The next deploy uses the unchanged command and works.
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(deployed(out.last()).0, 3);
    assert_switched_to(&sup, addr, 3, &[1]);
}

/// A failed deploy's worker is gone, but it left a process in its group
/// that ignores the stop signal: SPEC §5.3 gives a failed generation 5 s,
/// not the (here ten-minute) drain timeout, and gen 1 serves throughout.
#[test]
fn a_failed_deploys_leftovers_get_the_five_second_grace() {
    let dir = TempDir::new("ctl-failleft");
    let (sup, addr, _) = start(&dir, &["--drain-timeout", "10m"], &[]);
    let script = format!(
        "WORKER_SPAWN=orphan WORKER_IGNORE_TERM=1 WORKER_EXIT_BEFORE_READY=4 exec {}",
        worker()
    );
    let out = cf(&dir, "deploy", &["--", "sh", "-c", &script]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr.contains("exited with status 4 before READY=1"),
        "{out:?}"
    );
    let (p2, _) = sup.wait_gen(2, "spawned");
    let g2 = crate::common::grandchild(&sup.records, p2);
    sup.wait_gen(2, "left processes in its group: SIGTERM now, SIGKILL in 5s");
    crate::common::wait_event(&sup.records, g2, "signal 15");
    sup.wait_gen(
        2,
        "processes left in its group killed at stop deadline (failed deploy)",
    );
    crate::common::wait_gone(g2);
    assert_served_by(addr, 1);
}

#[test]
fn failed_deploy_from_the_env_file_keeps_serving_throughout() {
    let dir = TempDir::new("ctl-envfail");
    let env = dir.join("env");
    write_file(&env, "");
    let (sup, addr, _) = start(&dir, &["--env-file", env.to_str().unwrap()], &[]);

    // Re-read at the next spawn: the same command now fails before READY=1.
    write_file(
        &env,
        "WORKER_READY_DELAY_MS=1000\nWORKER_EXIT_BEFORE_READY=42\n",
    );
    let mut bg = Bg::spawn(deploy_cmd(&dir, &[]));
    let (_, pid2) = spawned(&bg.wait_line("spawned gen 2 pid "));
    start_record(dir.path(), pid2);
    let mut during = 0;
    while !bg.exited() {
        assert_served_by(addr, 1);
        during += 1;
        assert!(during < 100_000, "the deploy never ended");
    }
    let out = bg.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stderr.contains("exited with status 42 before READY=1"),
        "{out:?}"
    );
    sup.wait_line(&format!(
        "gen 2 pid {pid2} deploy failed: exited with status 42"
    ));
    assert_served_by(addr, 1);

    write_file(&env, "");
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(deployed(out.last()).0, 3, "{out:?}");
    assert_switched_to(&sup, addr, 3, &[1]);
}

// ---------------------------------------------------------------------------
// 2. argv byte-exact; rollback.

fn awkward_args() -> Vec<OsString> {
    vec![
        "two words".into(),
        "it's \"quoted\" \\ back\\slash".into(),
        "line one\nline two\n".into(),
        "".into(),
        OsString::from_vec(b"\xff\xfe raw \x80 bytes".to_vec()),
        "--control".into(),
        "-h".into(),
        "tab\there\r\x01\x7f".into(),
        "$HOME `id` * ; | &".into(),
        "ünïcødé ✓".into(),
        "".into(),
    ]
}

#[test]
fn deploy_argv_arrives_byte_exact_and_rollback_returns_to_the_previous_command() {
    let dir = TempDir::new("ctl-argv");
    let (sup, addr, pid1) = start(&dir, &[], &[]);
    let rec = dir.path().to_path_buf();
    let plain: Vec<Vec<u8>> = vec![worker().as_bytes().to_vec()];
    assert_eq!(start_record(&rec, pid1).args(), plain);

    let mut fancy = vec![OsString::from(worker())];
    fancy.extend(awkward_args());
    let fancy_bytes: Vec<Vec<u8>> = fancy.iter().map(|a| a.as_bytes().to_vec()).collect();

    let out = run_client(deploy_cmd(&dir, &fancy));
    assert_eq!(out.code(), 0, "{out:?}");
    let (n, pid2) = deployed(out.last());
    assert_eq!(n, 2);
    assert_eq!(start_record(&rec, pid2).args(), fancy_bytes);
    assert_switched_to(&sup, addr, 2, &[1]);

    // status --json carries the commands (lossy for non-UTF-8) and parses.
    let hex = status_json(
        &dir,
        &format!("L=d['command']\n{HEX_LIST}\nL=d['previous_command']\n{HEX_LIST}"),
    );
    let mut hex = hex.lines();
    assert_eq!(hex.next().unwrap(), hex_lossy(&fancy_bytes));
    assert_eq!(hex.next().unwrap(), hex_lossy(&plain));

    // rollback: back to the plain command.
    let out = cf(&dir, "rollback", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(
        out.lines().first().copied(),
        Some(format!("rolling back to: {}", worker()).as_str()),
        "{out:?}"
    );
    assert!(out.stdout.contains("spawned gen 3 pid "), "{out:?}");
    assert!(out.stdout.contains("draining gen 2"), "{out:?}");
    let (n, pid3) = deployed(out.last());
    assert_eq!(n, 3);
    assert_eq!(start_record(&rec, pid3).args(), plain);
    assert_switched_to(&sup, addr, 3, &[2]);

    // And rollback again: the awkward command, still byte-exact.
    let out = cf(&dir, "rollback", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (n, pid4) = deployed(out.last());
    assert_eq!(n, 4);
    assert_eq!(start_record(&rec, pid4).args(), fancy_bytes);
    sup.wait_ready(4);
}

/// A rollback asked for while a deploy changes the command goes back from
/// the command that deploy makes current: it is resolved when it runs,
/// not when it is queued (when there was nothing to roll back to yet).
#[test]
fn a_queued_rollback_is_resolved_when_it_runs() {
    let dir = TempDir::new("ctl-qrollback");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let new_cmd = gated(&gate, &[worker()], 0);
    let mut deploy = Bg::spawn(deploy_cmd(&dir, &new_cmd));
    deploy.wait_line("spawned gen 2");
    let mut rollback = Bg::spawn(client_cmd(&dir, "rollback", &[]));
    rollback.wait_line("deploy queued behind the one under way");
    open_gate(&gate);
    assert_eq!(deploy.finish().code(), 0);
    let out = rollback.finish();
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("rolling back to: {}\n", worker())),
        "{out:?}"
    );
    assert_eq!(deployed(out.last()).0, 3);
    assert_switched_to(&sup, addr, 3, &[1, 2]);
    assert_eq!(
        json_field(&dir, "d['command']"),
        format!("[\"{}\"]", worker())
    );
}

/// `STOPPING=1` from the active generation while a deploy is under way:
/// that deploy is its replacement. No second deploy follows it and
/// replaces the brand-new generation.
#[test]
fn stopping_during_a_deploy_is_covered_by_that_deploy() {
    let dir = TempDir::new("ctl-leavedeploy");
    let (sup, addr, p1) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let mut deploy = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[worker()], 0)));
    deploy.wait_line("spawned gen 2");
    send_dgram(&notify_socket(&sup.records, p1), b"STOPPING=1");
    sup.wait_line(&format!(" will replace gen 1 pid {p1}, which is leaving"));
    open_gate(&gate);
    let out = deploy.finish();
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(deployed(out.last()).0, 2);
    assert_switched_to(&sup, addr, 2, &[1]);
    // The next deploy is gen 3: nothing ran in between.
    let out = cf(&dir, "deploy", &["--", worker()]);
    assert_eq!(deployed(out.last()).0, 3, "{out:?}");
    assert_eq!(
        sup.count("starting the queued deploy"),
        0,
        "{:?}",
        sup.lines()
    );
}

/// The same, but the deploy fails: the leaving generation still gets its
/// replacement.
#[test]
fn stopping_during_a_failed_deploy_still_gets_a_replacement() {
    let dir = TempDir::new("ctl-leavefail");
    let (sup, addr, p1) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let mut deploy = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[], 3)));
    deploy.wait_line("spawned gen 2");
    send_dgram(&notify_socket(&sup.records, p1), b"STOPPING=1");
    sup.wait_line(&format!(" will replace gen 1 pid {p1}, which is leaving"));
    open_gate(&gate);
    assert_eq!(deploy.finish().code(), 1);
    sup.wait_ready(3);
    assert_switched_to(&sup, addr, 3, &[1]);
}

/// A starting generation that says `STOPPING=1` is going away: the
/// deploy fails closed at once (not at the ready timeout, an hour here),
/// and a `READY=1` after it must not retire the one that serves.
#[test]
fn stopping_before_ready_fails_the_deploy_closed() {
    let dir = TempDir::new("ctl-stopready");
    let (sup, addr, _) = start(&dir, &["--ready-timeout", "1h"], &[]);
    for (n, then_ready) in [(2, false), (3, true)] {
        let script = format!(
            "import os, signal, socket\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             s.sendto(b'STOPPING=1', os.environ['NOTIFY_SOCKET'])\n\
             if {}: s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
             signal.pause()\n",
            if then_ready { "True" } else { "False" }
        );
        let out = cf(&dir, "deploy", &["--", "python3", "-c", &script]);
        assert_eq!(out.code(), 1, "{out:?}");
        assert!(
            out.stderr.contains(&format!(
                "deploy of gen {n} failed: sent STOPPING=1 before READY=1"
            )),
            "{out:?}"
        );
        sup.wait_gen(n, "exited");
        assert_served_by(addr, 1);
    }
    assert_eq!(sup.count("draining"), 0, "{:?}", sup.lines());
    assert_eq!(cf(&dir, "status", &["--check"]).code(), 0);
}

/// A deploy whose worker, while the supervisor is stopped (SIGSTOP), runs
/// shutdown(SHUT_RDWR) on each of `fds` in turn (repeats allowed) and
/// exits 1; `meanwhile` runs before the supervisor continues, so the
/// supervisor sees everything only once it is all done. Returns when the
/// deploy has failed.
fn deploy_shutting_down(dir: &TempDir, sup: &Supervisor, fds: &[i32], meanwhile: impl FnOnce()) {
    let (gate, done) = (dir.join("gate"), dir.join("done"));
    mkfifo(&gate);
    let script = format!(
        "import socket, sys\n\
         open('{gate}').read()\n\
         socks = {{fd: socket.socket(fileno=fd) for fd in set({fds:?})}}\n\
         for fd in {fds:?}:\n\
         \x20   try: socks[fd].shutdown(socket.SHUT_RDWR)\n\
         \x20   except OSError: pass\n\
         open('{done}', 'w').close()\n\
         sys.exit(1)\n",
        gate = gate.display(),
        done = done.display()
    );
    let argv: Vec<OsString> = ["python3", "-c", &script]
        .iter()
        .map(OsString::from)
        .collect();
    let mut deploy = Bg::spawn(deploy_cmd(dir, &argv));
    deploy.wait_line("spawned gen 2");
    kill(sup.pid as i32, libc::SIGSTOP);
    release(&gate);
    wait_until("the shutdowns done", || done.exists());
    meanwhile();
    kill(sup.pid as i32, libc::SIGCONT);
    assert_eq!(deploy.finish().code(), 1);
}

/// shutdown(2) on a listening socket disconnects it for every process
/// holding it: a failed deploy's worker doing that to its fds would stop
/// the generation that serves. The TCP listener listens again at once
/// (bound again to the port the kernel had chosen); a unix one cannot,
/// and says so, in the log and in `status --check`.
#[test]
fn a_worker_that_shuts_the_listeners_down_does_not_stop_the_service() {
    let dir = TempDir::new("ctl-shutdown");
    let unix = dir.join("web.sock");
    let unix_arg = format!("unix:{}", unix.display());
    let (sup, addr, _) = start(&dir, &["--listen", &unix_arg], &[]);
    // fd 3 twice, as a prefork server's processes might: the second
    // leaves the closed socket marked shut down, and connections accepted
    // after a plain listen(2) would inherit the mark. Both happen while
    // the supervisor is stopped (SIGSTOP), so that its repair comes after
    // them, as it would after any two that come close together.
    deploy_shutting_down(&dir, &sup, &[3, 3, 4], || {});
    sup.wait_line(&format!(
        "listener {addr} (fd 3) was shut down by a worker (shutdown(2) on it); listening again"
    ));
    sup.wait_line(&format!(
        "listener {unix_arg} (fd 4) was shut down by a worker (shutdown(2) on it) and cannot listen again"
    ));
    assert_served_by(addr, 1);
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        out.stdout,
        format!("listener {unix_arg} is not listening\n")
    );
    let table = cf(&dir, "status", &[]).stdout;
    assert!(
        table.contains(&format!(
            "{unix_arg}  NOT LISTENING (shut down by a worker)"
        )),
        "{table}"
    );
    assert!(
        !table.contains(&format!("{addr}  NOT LISTENING")),
        "{table}"
    );
}

/// A TCP listener shut down by a worker whose port another process takes
/// before the supervisor can bind it again: refused meanwhile (and
/// `status --check` says so), listening again once the port is free.
#[test]
fn a_listener_whose_port_was_taken_listens_again_when_it_is_free() {
    let dir = TempDir::new("ctl-squat");
    let (sup, addr, _) = start(&dir, &[], &[]);
    // Someone else binds the port the kernel had chosen for fd 3 while
    // the supervisor is stopped.
    let mut squatter = None;
    deploy_shutting_down(&dir, &sup, &[3], || {
        squatter =
            Some(std::net::TcpListener::bind(addr).expect("the port is free after the shutdown"));
    });
    let line = sup.wait_line(&format!("listener {addr} (fd 3) was shut down by a worker"));
    assert!(
        line.ends_with("; connections to it are refused; trying again every 1s"),
        "{line}"
    );
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(out.stdout, format!("listener {addr} is not listening\n"));
    drop(squatter);
    sup.wait_line(&format!("listener {addr} (fd 3) listens again"));
    assert_served_by(addr, 1);
    assert_eq!(cf(&dir, "status", &["--check"]).code(), 0);
}

/// A failed deploy's worker that leaves a `setsid` child behind: the
/// child is nobody's generation (it could be accepting on the shared
/// socket, serving the rejected version), so the operator is told at once,
/// and the stop ends it.
#[test]
fn a_process_that_escaped_a_failed_generation_is_reported() {
    let dir = TempDir::new("ctl-escapee");
    let (mut sup, addr, _) = start(&dir, &[], &[]);
    // The worker exits once its child has left the group (the FIFO says).
    let fifo = dir.join("up");
    let script = format!(
        "mkfifo {f}; setsid sh -c 'echo up > {f}; exec sleep 1000' & read x < {f}; exit 1",
        f = fifo.display()
    );
    let out = cf(&dir, "deploy", &["--", "sh", "-c", &script]);
    assert_eq!(out.code(), 1, "{out:?}");
    let line = sup.wait_for("the escapee reported", |l| {
        l.contains(") left its generation's process group and outlived its parent")
    });
    let pid = crate::common::pid_of_line(&line) as i32;
    assert_served_by(addr, 1);
    // `status` names it too, until it is gone.
    let table = cf(&dir, "status", &[]).stdout;
    assert!(
        table.contains(&format!(
            "outside every generation (left their group): pid {pid}\n"
        )),
        "{table}"
    );
    assert_eq!(json_field(&dir, "d['strays']"), format!("[{pid}]"));
    assert_eq!(cf(&dir, "stop", &[]).code(), 0);
    sup.wait_exit();
    // Dead: gone, or a zombie left to init (the supervisor does not wait
    // for a stray that is already dying).
    let state = stat_field(pid as u32, 3);
    assert!(
        state.as_deref().is_none_or(|s| s == "Z"),
        "the escapee outlived the supervisor (state {state:?}): {:?}",
        sup.lines()
    );
}

/// The control socket file removed (a worker cleaning a shared runtime
/// directory, say) or renamed away: bound again at once, so clients
/// still find the supervisor; one connected meanwhile is still served.
#[test]
fn a_removed_control_socket_is_bound_again() {
    let dir = TempDir::new("ctl-rebind");
    let (sup, _addr, _) = start(&dir, &[], &[]);
    let ctl = control(&dir);
    let held = UnixStream::connect(&ctl).unwrap();
    for n in [1, 2] {
        match n {
            1 => std::fs::remove_file(&ctl).unwrap(),
            _ => std::fs::rename(&ctl, ctl.with_extension("old")).unwrap(),
        }
        sup.wait_for_nth("the control socket bound again", n, |l| {
            l.ends_with(&format!(
                "control socket {} was removed or replaced (by a worker?); bound it again",
                ctl.display()
            ))
        });
        let out = cf(&dir, "status", &["--check"]);
        assert_eq!(out.code(), 0, "{out:?}");
    }
    assert_eq!(
        exchange_on(held, b"containerflip/1 status check\n\n".to_vec()),
        "ok gen 1 is serving\n"
    );
}

/// Workers run as our user and inherit RUNTIME_DIRECTORY: one that
/// removes the runtime directory, or leaves something at the next notify
/// socket's name, fails its own deploy, not every later one.
#[test]
fn a_worker_that_wrecks_the_runtime_directory_breaks_only_its_deploy() {
    let dir = TempDir::new("ctl-rundir");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let mut serving = 1;
    for (wreck, warning) in [
        (
            r#"rm -rf "${NOTIFY_SOCKET%/*}""#,
            "was removed (by a worker?); created it again",
        ),
        (
            r#"mkdir "${NOTIFY_SOCKET%.*}.$((${NOTIFY_SOCKET##*.} + 1))""#,
            "before binding it: left there by a worker?",
        ),
        // A file (a stale socket, say), not a directory.
        (
            r#": > "${NOTIFY_SOCKET%.*}.$((${NOTIFY_SOCKET##*.} + 1))""#,
            "before binding it: left there by a worker?",
        ),
    ] {
        let before = sup.count(warning);
        let script = format!("{wreck}; exit 1");
        let out = cf(&dir, "deploy", &["--", "sh", "-c", &script]);
        assert_eq!(out.code(), 1, "{out:?}");
        let out = cf(&dir, "deploy", &[]);
        assert_eq!(out.code(), 0, "{out:?}");
        assert_eq!(sup.count(warning), before + 1, "{:?}", sup.lines());
        let (n, pid) = deployed(out.last());
        // Made again as private as at start.
        let notify = start_record(&sup.records, pid)
            .must("env.NOTIFY_SOCKET")
            .to_string();
        let rundir = Path::new(&notify).parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&rundir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "mode of {}", rundir.display());
        assert_switched_to(&sup, addr, n, &[serving]);
        serving = n;
    }
}

#[test]
fn rollback_without_a_previous_command_fails_clearly() {
    let dir = TempDir::new("ctl-norollback");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let out = cf(&dir, "rollback", &[]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("nothing to roll back to"), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    // A deploy of the same command does not make one either.
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let out = cf(&dir, "rollback", &[]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("nothing to roll back to"), "{out:?}");
    assert_eq!(sup.count(" spawned"), 2, "{:?}", sup.lines());
    // The log names each request for what it was (the second line may
    // still be on its way to the test's reader).
    sup.wait_for_nth("the second rollback line", 2, |l| {
        l.contains("rollback requested (control socket)")
    });
    assert_eq!(sup.count("rollback requested (control socket)"), 2);
    assert_eq!(sup.count("deploy requested (control socket)"), 1);
    assert_switched_to(&sup, addr, 2, &[1]);
}

// ---------------------------------------------------------------------------
// 3. status, status --json, status --check.

#[test]
fn status_table_shows_the_active_generation() {
    let dir = TempDir::new("ctl-status");
    let (sup, addr, pid1) = start(&dir, &[], &[]);
    let out = cf(&dir, "status", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stderr, "");
    let s = &out.stdout;
    assert!(s.contains(&format!("supervisor pid {}", sup.pid)), "{s}");
    assert!(s.contains("serving (active gen 1)"), "{s}");
    assert!(s.contains(&addr.to_string()), "{s}");
    let row = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some("1"))
        .unwrap_or_else(|| panic!("no row for gen 1: {s}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], pid1.to_string(), "{row}");
    assert_eq!(cols[2], "active", "{row}");
    assert!(
        s.contains("deploys: 0 ok, 0 failed; crash restarts: 0"),
        "{s}"
    );

    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (_, pid2) = deployed(out.last());
    let out = cf(&dir, "status", &[]);
    let s = &out.stdout;
    assert!(s.contains("(active gen 2)"), "{s}");
    let row = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some("2"))
        .unwrap_or_else(|| panic!("no row for gen 2: {s}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[2]), (pid2.to_string().as_str(), "active"));
    assert!(s.contains("deploys: 1 ok, 0 failed"), "{s}");

    // A STATUS= with terminal controls reaches the table escaped, and a
    // backslash doubled (a real newline and a literal "\n" differ).
    send_dgram(
        &notify_socket(&sup.records, pid2),
        b"STATUS=\x1b[31mred\rgone\x7f C:\\new",
    );
    let mut s = String::new();
    wait_until("the STATUS= in the table", || {
        s = cf(&dir, "status", &[]).stdout;
        s.contains("red")
    });
    assert!(s.contains(r"\u{1b}[31mred\rgone\u{7f} C:\\new"), "{s:?}");
    assert!(!s.contains('\x1b') && !s.contains('\r'), "{s:?}");
}

#[test]
fn status_json_parses_and_has_the_fields() {
    let dir = TempDir::new("ctl-json");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (_, pid2) = deployed(out.last());
    // Gen 1 gone, so the generations list is gen 2 alone.
    sup.wait_gen(1, "exited");
    let script = [
        "print('pid', d['pid'])",
        "print('gens', [g['gen'] for g in d['generations']])",
        "print('state', d['state'], d['serving'], d['active'], d['deploying'])",
        "c = d['counters']",
        "print('counters', c['deploys_ok'], c['deploys_failed'], c['crash_restarts'])",
        "print('failure', d['last_failure'])",
        "print('truncated', d['truncated'])",
        "for l in d['listeners']: print('listener', l['fd'], l['address'])",
        "for g in d['generations']:",
        "    if g['active']:",
        "        print('active', g['gen'], g['pid'], g['state'], g['ready_ms'] is not None, g['status'])",
    ]
    .join("\n");
    let text = status_json(&dir, &script);
    let get_line = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    assert_eq!(get_line("pid"), sup.pid.to_string(), "{text}");
    assert_eq!(get_line("gens"), "[2]", "{text}");
    assert_eq!(get_line("state"), "serving True 2 None", "{text}");
    assert_eq!(get_line("counters"), "1 0 0", "{text}");
    assert_eq!(get_line("failure"), "None", "{text}");
    assert_eq!(get_line("truncated"), "False", "{text}");
    assert_eq!(get_line("listener"), format!("3 {addr}"), "{text}");
    assert_eq!(
        get_line("active"),
        format!("2 {pid2} ready True serving"),
        "{text}"
    );
    assert_eq!(
        json_field(&dir, "d['command']"),
        format!("[\"{}\"]", worker())
    );
}

/// The last STATUS= wins, across messages and within one; `status --json`
/// carries it, control characters and all, through a strict JSON parser.
#[test]
fn the_latest_status_wins_and_json_carries_it_exactly() {
    let dir = TempDir::new("ctl-statuslast");
    let (_sup, _addr, pid1) = start(&dir, &[], &[]);
    let sock = notify_socket(&_sup.records, pid1);
    send_dgram(&sock, b"STATUS=one");
    send_dgram(&sock, b"STATUS=two\nSTATUS=three \x1b\x01\x7f\"q\"\\");
    let script = "print(ascii([g['status'] for g in d['generations']]))";
    let want = r#"['three \x1b\x01\x7f"q"\\']"#;
    let mut got = String::new();
    wait_until("the last STATUS= in status --json", || {
        got = status_json(&dir, script);
        got.trim_end() == want
    });
    let table = cf(&dir, "status", &[]).stdout;
    assert!(table.contains("three "), "{table}");
    assert!(!table.contains("two") && !table.contains("one"), "{table}");
}

#[test]
fn status_check_is_1_while_the_only_generation_is_starting() {
    let dir = TempDir::new("ctl-check-start");
    let mut sup = start_with(
        &dir,
        &["--ready-timeout", "10m"],
        &[("WORKER_NO_READY", "1")],
    );
    let (pid1, _) = sup.wait_gen(1, "spawned");
    crate::common::wait_event(dir.path(), pid1, "serving");
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        status_json(
            &dir,
            "print(d['state'], d['serving'], d['active'], d['deploying'])"
        )
        .trim(),
        "starting False None 1"
    );
    // --json --check: the object alone on stdout, the verdict in the code.
    let out = cf(&dir, "status", &["--json", "--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_json_object(&out.stdout, "\"state\":\"starting\"");
    let out = cf(&dir, "status", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("starting"), "{out:?}");

    let out = cf(&dir, "stop", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    sup.wait_exit();
}

#[test]
fn status_check_follows_crash_and_backoff() {
    let dir = TempDir::new("ctl-check-crash");
    let env = dir.join("env");
    write_file(&env, "");
    let (sup, addr, pid1) = start(&dir, &["--env-file", env.to_str().unwrap()], &[]);
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("gen 1 is serving"), "{out:?}");

    // From now on every restart fails before READY=1: the supervisor keeps
    // backing off and nothing is ready, whenever we look.
    write_file(&env, "WORKER_EXIT_BEFORE_READY=5\n");
    kill(pid1 as i32, libc::SIGKILL);
    sup.wait_line(&format!("gen 1 pid {pid1} crashed"));
    sup.wait_for("a crash restart failing", |l| {
        l.contains("deploy failed: exited with status 5 before READY=1")
    });
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains("no ready generation"), "{out:?}");
    assert_eq!(
        status_json(
            &dir,
            "print(d['serving'], d['active'], d['counters']['crash_restarts'], d['last_failure'] is not None)"
        )
        .trim(),
        "False None 1 True"
    );

    // A deploy while nothing is ready starts at once and brings it back.
    write_file(&env, "");
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (n, _) = deployed(out.last());
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_served_by(addr, n);
    let out = cf(&dir, "status", &["--json", "--check"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_json_object(&out.stdout, &format!("\"serving\":true,\"active\":{n},"));
}

/// Crash restarts are not deploys (only the ones asked for are counted),
/// whether they come up or fail; a failed one is still the last failure.
#[test]
fn crash_restarts_are_not_counted_as_deploys() {
    let dir = TempDir::new("ctl-count-crash");
    let env = dir.join("env");
    write_file(&env, "");
    let (sup, _addr, pid1) = start(&dir, &["--env-file", env.to_str().unwrap()], &[]);
    let counters = "c = d['counters']\nprint(c['deploys_ok'], c['deploys_failed'], c['crash_restarts'], d['last_failure'] is not None)";
    kill(pid1 as i32, libc::SIGKILL);
    let pid2 = sup.wait_ready(2);
    assert_eq!(status_json(&dir, counters).trim(), "0 0 1 False");

    write_file(&env, "WORKER_EXIT_BEFORE_READY=5\n");
    kill(pid2 as i32, libc::SIGKILL);
    sup.wait_for("a crash restart failing", |l| {
        l.contains("deploy failed: exited with status 5 before READY=1")
    });
    assert_eq!(status_json(&dir, counters).trim(), "0 0 2 True");
}

/// `status --json --check` output: one JSON object line, nothing else.
fn assert_json_object(stdout: &str, needle: &str) {
    assert!(
        stdout.starts_with("{\"pid\":") && stdout.ends_with("}\n") && stdout.lines().count() == 1,
        "one JSON object: {stdout:?}"
    );
    assert!(stdout.contains(needle), "{needle} in {stdout}");
}

// ---------------------------------------------------------------------------
// 4. Concurrent deploys; a deploy client killed mid-deploy.

#[test]
fn concurrent_deploys_queue_into_one_and_all_report_it() {
    let dir = TempDir::new("ctl-concurrent");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let rec = dir.path().to_path_buf();

    let mut slow = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[worker()], 0)));
    assert_eq!(spawned(&slow.wait_line("spawned gen ")).0, 2);

    // Three more while gen 2 is starting, each with its own command: they
    // collapse into one deploy with the newest command (SPEC §5.4).
    let mut waiting = Vec::new();
    for tag in ["b", "c", "d"] {
        let argv = vec![OsString::from(worker()), OsString::from(tag)];
        let mut bg = Bg::spawn(deploy_cmd(&dir, &argv));
        bg.wait_line("queued");
        waiting.push(bg);
    }
    assert_served_by(addr, 1);
    open_gate(&gate);

    let out = slow.finish();
    assert_eq!(out.code(), 0, "{out:?}");
    let (n, _) = deployed(out.last());
    assert_eq!(n, 2);

    let results: Vec<Out> = waiting.into_iter().map(Bg::finish).collect();
    for out in &results {
        assert_eq!(out.code(), 0, "{out:?}");
        assert!(out.last().starts_with("deployed gen "), "{out:?}");
        assert_eq!(
            out.last(),
            results[0].last(),
            "same result for all: {results:?}"
        );
    }
    let (n, pid3) = deployed(results[0].last());
    assert_eq!(n, 3, "{results:?}");
    let args = start_record(&rec, pid3).args();
    assert_eq!(args, vec![worker().as_bytes().to_vec(), b"d".to_vec()]);
    assert_switched_to(&sup, addr, 3, &[1, 2]);
    assert_eq!(
        sup.count(" spawned"),
        3,
        "one deploy for the three: {:?}",
        sup.lines()
    );
    assert_eq!(json_field(&dir, "d['counters']['deploys_ok']"), "2");
}

#[test]
fn a_killed_deploy_client_does_not_cancel_the_deploy() {
    let dir = TempDir::new("ctl-killclient");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");

    let mut bg = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[worker()], 0)));
    let (n, pid2) = spawned(&bg.wait_line("spawned gen "));
    assert_eq!(n, 2);
    bg.child.kill().expect("SIGKILL the deploy client");
    let out = bg.finish();
    assert_eq!(out.status.code(), None, "killed by a signal: {out:?}");

    assert_served_by(addr, 1);
    open_gate(&gate);
    assert_eq!(sup.wait_ready(2), pid2);
    sup.wait_gen(1, "draining");
    assert_switched_to(&sup, addr, 2, &[1]);
    assert_eq!(
        status_json(&dir, "print(d['active'], d['counters']['deploys_ok'])").trim(),
        "2 1"
    );
}

// ---------------------------------------------------------------------------
// 5. Hostile input on the control socket.

#[test]
fn bad_requests_get_an_error_line_and_change_nothing() {
    let dir = TempDir::new("ctl-bad");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let ctl = control(&dir);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "wrong protocol version",
            b"containerflip/2 status\n\n".to_vec(),
            "unsupported protocol 'containerflip/2'",
        ),
        (
            "version 0",
            b"containerflip/0 deploy\n\n".to_vec(),
            "unsupported protocol",
        ),
        (
            "unknown verb",
            b"containerflip/1 frobnicate\n\n".to_vec(),
            "unknown request 'frobnicate'",
        ),
        (
            "garbage bytes",
            b"\x00\x01\xff\xfe\x80 garbage\x1b[0m\n\n".to_vec(),
            "not UTF-8",
        ),
        ("words", b"hello world\n\n".to_vec(), "unsupported protocol"),
        ("an empty line", b"\n".to_vec(), "unsupported protocol"),
        (
            "a bad status format",
            b"containerflip/1 status xml\n\n".to_vec(),
            "does not take",
        ),
        // Terminal controls in the echoed word arrive (and are logged)
        // escaped.
        (
            "an unknown verb with an escape",
            b"containerflip/1 \x1b[2Jboom\n\n".to_vec(),
            r"unknown request '\u{1b}[2Jboom'",
        ),
        (
            "a status format with an escape",
            b"containerflip/1 status \x1b]0;x\x07\n\n".to_vec(),
            r"does not take '\u{1b}]0;x\u{7}'",
        ),
        (
            "too many words",
            b"containerflip/1 status json please\n\n".to_vec(),
            "too many words",
        ),
        (
            "bad hex",
            b"containerflip/1 deploy\narg zz\n\n".to_vec(),
            "not valid hex",
        ),
        (
            "odd hex",
            b"containerflip/1 deploy\narg 616\n\n".to_vec(),
            "not valid hex",
        ),
        (
            "a NUL byte in a word",
            b"containerflip/1 deploy\narg 74727565\narg 610062\n\n".to_vec(),
            "argument 2 contains a NUL byte",
        ),
        (
            "hex with a sign",
            b"containerflip/1 deploy\narg +1+1\n\n".to_vec(),
            "not valid hex",
        ),
        (
            "CRLF line ends",
            b"containerflip/1 status\r\n\r\n".to_vec(),
            "lines end in LF, not CRLF",
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "unsupported protocol 'GET'",
        ),
        (
            "a stray line",
            b"containerflip/1 deploy\nexec /bin/sh\n\n".to_vec(),
            "arg HEX",
        ),
        (
            "an empty command",
            b"containerflip/1 deploy\narg \n\n".to_vec(),
            "empty",
        ),
        (
            "stop with arguments",
            b"containerflip/1 stop\narg 61\n\n".to_vec(),
            "takes no arguments",
        ),
        (
            "rollback with arguments",
            b"containerflip/1 rollback\narg 61\n\n".to_vec(),
            "takes no arguments",
        ),
    ];
    for (what, req, needle) in cases {
        let reply = raw_exchange(&ctl, req);
        assert_error(what, &reply, needle);
    }

    // A request line, then the sending side shut (`echo … | nc -N`)
    // without the empty line: told what is missing, not closed on.
    let s = UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    (&s).write_all(b"containerflip/1 status\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    (&s).read_to_string(&mut reply).unwrap();
    assert_eq!(
        reply,
        "error incomplete request (end it with an empty line)\n"
    );

    // Over the argument count bound.
    let mut many = b"containerflip/1 deploy\n".to_vec();
    for _ in 0..5000 {
        many.extend_from_slice(b"arg 61\n");
    }
    many.push(b'\n');
    assert_error(
        "5000 arguments",
        &raw_exchange(&ctl, many),
        "more than 4096 arguments",
    );

    // Over the size bound: one endless line, and valid-looking arg lines.
    let mut big = b"containerflip/1 deploy\narg ".to_vec();
    big.extend(std::iter::repeat_n(b'6', 300 * 1024));
    assert_error(
        "300 KiB line",
        &raw_exchange(&ctl, big),
        "request larger than 262144 bytes",
    );
    let mut big = b"containerflip/1 deploy\narg 2f62696e2f7368\n".to_vec();
    let word = format!("arg {}\n", "61".repeat(1000));
    while big.len() < 300 * 1024 {
        big.extend_from_slice(word.as_bytes());
    }
    big.push(b'\n');
    assert_error(
        "300 KiB of args",
        &raw_exchange(&ctl, big),
        "request larger than 262144 bytes",
    );

    // The bound is exact, the empty line included: 256 KiB is read and
    // parsed (and refused for its arguments), one byte more is not.
    let at_bound = |size: usize| {
        let head = b"containerflip/1 status text\narg ";
        let mut req = head.to_vec();
        req.extend(std::iter::repeat_n(b'6', size - head.len() - 2));
        req.extend_from_slice(b"\n\n");
        assert_eq!(req.len(), size);
        raw_exchange(&ctl, req)
    };
    assert_error(
        "a request of 256 KiB",
        &at_bound(256 * 1024),
        "'status' takes no arguments",
    );
    assert_error(
        "a request of 256 KiB + 1",
        &at_bound(256 * 1024 + 1),
        "request larger than 262144 bytes",
    );

    // Random bytes: an error line, or closed, never a result.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .chain(*b"\n\n")
        .collect();
    let reply = raw_exchange(&ctl, noise);
    assert!(
        reply.is_empty() || (reply.starts_with("error ") && reply.lines().count() == 1),
        "noise: {reply:?}"
    );

    // None of it deployed, stopped or rolled back anything.
    assert_healthy(&dir, addr, 1);
    assert_eq!(sup.count(" spawned"), 1, "{:?}", sup.lines());
    assert_eq!(
        status_json(
            &dir,
            "print(d['counters']['deploys_ok'], d['counters']['deploys_failed'])"
        )
        .trim(),
        "0 0"
    );
}

/// A client that shuts down its sending side after the request (as
/// `nc -N` and socat do) still gets every line up to the result. (One
/// that closes completely is dropped and the deploy goes on: see
/// `a_killed_deploy_client_does_not_cancel_the_deploy`.)
#[test]
fn a_half_closed_client_still_gets_its_result() {
    let dir = TempDir::new("ctl-halfclose");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let mut req = b"containerflip/1 deploy\n".to_vec();
    for a in gated(&gate, &[worker()], 0) {
        req.extend_from_slice(b"arg ");
        for b in a.as_bytes() {
            req.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        req.push(b'\n');
    }
    req.push(b'\n');
    let s = UnixStream::connect(control(&dir)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    (&s).write_all(&req).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // It is waiting: gen 2 is held at the gate. Let it go.
    sup.wait_gen(2, "spawned");
    open_gate(&gate);
    let mut reply = String::new();
    (&s).read_to_string(&mut reply)
        .expect("read the answer to the end");
    assert!(reply.starts_with("progress spawned gen 2 "), "{reply:?}");
    assert!(reply.ends_with('\n'), "{reply:?}");
    let last = reply.lines().last().unwrap();
    assert!(last.starts_with("ok deployed gen 2 pid "), "{reply:?}");
    assert_switched_to(&sup, addr, 2, &[1]);
}

#[test]
fn a_half_written_request_is_closed_and_blocks_nobody() {
    let dir = TempDir::new("ctl-half");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let s = UnixStream::connect(control(&dir)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    (&s).write_all(b"containerflip/1 sta").unwrap();

    // Meanwhile the supervisor answers everybody else.
    assert_healthy(&dir, addr, 1);
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_switched_to(&sup, addr, 2, &[1]);

    let mut reply = String::new();
    (&s).read_to_string(&mut reply)
        .expect("the supervisor closes a silent client (no timeout here)");
    assert_error("half a request", &reply, "no complete request in time");
}

#[test]
fn two_hundred_clients_at_once_are_all_answered() {
    let dir = TempDir::new("ctl-200");
    let (sup, addr, pid1) = start(&dir, &[], &[]);
    let ctl = control(&dir);
    let barrier = Arc::new(Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let (ctl, barrier) = (ctl.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let param = ["text", "json", "check"][i % 3];
                raw_exchange(
                    &ctl,
                    format!("containerflip/1 status {param}\n\n").into_bytes(),
                )
            })
        })
        .collect();
    for t in threads {
        let reply = t.join().unwrap();
        let last = reply.lines().last().unwrap_or("");
        assert!(last.starts_with("ok"), "a status reply: {reply:?}");
        assert!(
            reply.contains(&pid1.to_string()) || reply.contains("gen 1 is serving"),
            "{reply:?}"
        );
    }
    assert_healthy(&dir, addr, 1);
    assert_eq!(sup.count(" spawned"), 1);
}

#[test]
fn two_hundred_silent_clients_do_not_lock_out_status() {
    let dir = TempDir::new("ctl-200idle");
    let (_sup, addr, _) = start(&dir, &[], &[]);
    let ctl = control(&dir);
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&ctl).expect("connect an idle client"))
        .collect();
    // HTTP does not go through the control socket at all.
    assert_served_by(addr, 1);
    // At 128 connections, a new one closes the oldest one silent for a
    // second, so status need not wait for the silent ones' 5 s timeout.
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let (mut evicted, mut timed_out) = (0, 0);
    for s in &idle {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut reply = String::new();
        (&*s).read_to_string(&mut reply).expect("closed in time");
        if reply.contains("too many connections") {
            assert_error(
                "an evicted client",
                &reply,
                "too many connections (128); closed the oldest one without a request",
            );
            evicted += 1;
        } else {
            assert_error("an idle client", &reply, "no complete request in time");
            timed_out += 1;
        }
    }
    // 200 silent ones and status: at least 73 over the limit. (Fewer only
    // if some timed out first on a very slow machine; none is lost.)
    assert!(evicted >= 1, "no silent client was closed to make room");
    assert_eq!(evicted + timed_out, 200);
    assert_healthy(&dir, addr, 1);
}

/// Deploys a current command whose `status --json` is ~360 KB, more than
/// a socket buffer takes: each byte 0xff of its unused argument is three
/// bytes of JSON (U+FFFD), cheap to render 128 times on a busy machine.
/// Returns once gen 1 is gone and swept (a status round trip is a later
/// turn of the loop), with the supervisor's fd count then.
fn deploy_a_long_status(dir: &TempDir, sup: &Supervisor) -> usize {
    let argv: Vec<OsString> = ["sh", "-c", "exec \"$0\"", worker()]
        .into_iter()
        .map(OsString::from)
        .chain([OsString::from_vec(vec![0xff; 120_000])])
        .collect();
    let out = run_client(deploy_cmd(dir, &argv));
    assert_eq!(out.code(), 0, "{out:?}");
    sup.wait_gen(1, "exited");
    assert_eq!(cf(dir, "status", &["--check"]).code(), 0);
    fd_count(sup.pid)
}

/// Clients that ask for a reply larger than the socket buffer and never
/// read it: at 128 of them `status` still gets in (the oldest one is
/// closed to make room), and 30 s after their last line was queued the
/// supervisor lets go of the rest and of their queued replies.
#[test]
fn clients_that_never_read_their_reply_do_not_lock_out_status() {
    let dir = TempDir::new("ctl-unread");
    // -v: each request read is logged, so the test knows when all are in.
    let (sup, addr, _) = start(&dir, &["-v"], &[]);
    let baseline = deploy_a_long_status(&dir, &sup);
    let ctl = control(&dir);
    let unread: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| {
            let s = UnixStream::connect(&ctl).expect("connect");
            (&s).write_all(b"containerflip/1 status json\n\n").unwrap();
            s
        })
        .collect();
    sup.wait_for_nth("every unread client's request", MAX_CLIENTS, |l| {
        l.ends_with("control request: containerflip/1 status json")
    });
    // (One fd of slack: the count taken as the baseline may have held one
    // that has gone since.)
    let held = || fd_count(sup.pid) + 1 >= baseline + MAX_CLIENTS;
    assert!(held(), "the unread replies were not all held");
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "{out:?}");
    // One was closed to let status in; the rest are still held (for the
    // 30 s of REPLY_TIMEOUT), so status did not just wait them all out.
    assert!(
        fd_count(sup.pid) + 2 >= baseline + MAX_CLIENTS,
        "status got in only when every unread reply was let go"
    );
    wait_until("the unread replies let go", || {
        fd_count(sup.pid) <= baseline
    });
    // Each got the start of its reply, not the end of it.
    for s in &unread {
        let mut reply = Vec::new();
        (&*s).read_to_end(&mut reply).unwrap();
        assert!(reply.starts_with(b"data {\"pid\":"), "{:?}", &reply[..20]);
        assert!(
            !reply.ends_with(b"ok \n"),
            "a whole reply of {} bytes",
            reply.len()
        );
    }
    assert_healthy(&dir, addr, 2);
}

// ---------------------------------------------------------------------------
// 6. Another uid.

/// `raw_exchange` from a thread running as uid/gid 65534 (`as_nobody`).
/// `Err` when connect itself fails.
fn raw_exchange_as_nobody(ctl: &Path, request: &[u8]) -> std::io::Result<String> {
    as_nobody(|| {
        let s = UnixStream::connect(ctl)?;
        Ok(exchange_on(s, request.to_vec()))
    })
}

/// `containerflip VERB --control CTL` run as uid/gid 65534 (setpriv).
fn client_as_nobody(ctl: &Path, verb: &str) -> Out {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        bin(),
        verb,
    ])
    .arg("--control")
    .arg(ctl)
    .env_remove("CONTAINERFLIP_CONTROL");
    run_client(cmd)
}

/// Whether uid 65534 can run the binary at all (the checkout may sit in a
/// directory only root can enter); `Err` says why not.
fn nobody_can_run_bin() -> Result<(), String> {
    let probe = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "--version",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!(
            "setpriv cannot run {} as uid 65534: {probe:?}",
            bin()
        )),
    }
}

/// A temp dir others may traverse, with a supervisor in it.
fn start_for_other_uids(name: &str) -> (TempDir, Supervisor, SocketAddr) {
    let dir = TempDir::new(name);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sup, addr, _) = start(&dir, &[], &[]);
    let mode = std::fs::metadata(control(&dir))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    (dir, sup, addr)
}

#[test]
fn a_connection_from_another_uid_is_refused_by_peer_credentials() {
    if !is_root() {
        skipped(
            "a_connection_from_another_uid_is_refused_by_peer_credentials",
            "needs root to connect as another uid",
        );
        return;
    }
    let (dir, sup, addr) = start_for_other_uids("ctl-peercred");
    let ctl = control(&dir);

    // Mode 0600: the kernel already says no.
    let err = raw_exchange_as_nobody(&ctl, b"containerflip/1 status\n\n")
        .expect_err("uid 65534 connected to a 0600 socket");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

    // Opened up, the connection gets through and SO_PEERCRED refuses it.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    for req in [
        &b"containerflip/1 status json\n\n"[..],
        b"containerflip/1 deploy\narg 2f62696e2f66616c7365\n\n",
        b"containerflip/1 rollback\n\n",
        b"containerflip/1 stop\n\n",
    ] {
        let reply = raw_exchange_as_nobody(&ctl, req).expect("connect with mode 0666");
        assert_eq!(
            reply,
            "error permission denied: uid 65534 may not control this supervisor\n",
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    sup.wait_for("a refusal warning", |l| {
        l.contains("refused") && l.contains("uid 65534")
    });
    assert_healthy(&dir, addr, 1);
    assert_eq!(sup.count(" spawned"), 1, "{:?}", sup.lines());
}

#[test]
fn a_client_command_as_another_uid_is_refused() {
    if !is_root() {
        skipped(
            "a_client_command_as_another_uid_is_refused",
            "needs root to run a client as another uid",
        );
        return;
    }
    if let Err(why) = nobody_can_run_bin() {
        skipped("a_client_command_as_another_uid_is_refused", &why);
        return;
    }
    let (dir, sup, addr) = start_for_other_uids("ctl-uid");
    let ctl = control(&dir);
    let as_nobody = |verb: &str| client_as_nobody(&ctl, verb);

    // Mode 0600: connect fails; the client names the path.
    let out = as_nobody("status");
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(out.stderr.contains(ctl.to_str().unwrap()), "{out:?}");

    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    for verb in ["status", "deploy", "rollback", "stop"] {
        let out = as_nobody(verb);
        assert_eq!(out.code(), 1, "{verb}: {out:?}");
        assert!(out.stderr.contains("permission denied"), "{verb}: {out:?}");
        assert_eq!(out.stdout, "", "{verb}: {out:?}");
    }
    sup.wait_for("a refusal warning", |l| {
        l.contains("refused") && l.contains("uid 65534")
    });
    assert_healthy(&dir, addr, 1);
    assert_eq!(sup.count(" spawned"), 1, "{:?}", sup.lines());
}

/// The other direction: a client refuses a "supervisor" run by another
/// user (someone squatting the /tmp fallback path), before sending it
/// anything and without believing its answer. The impostor listens as uid
/// 1000; the client runs as 65534 (setpriv).
#[test]
fn a_client_refuses_a_control_socket_owned_by_another_uid() {
    if !is_root() {
        skipped(
            "a_client_refuses_a_control_socket_owned_by_another_uid",
            "needs root to act as two other uids",
        );
        return;
    }
    const IMPOSTOR: u32 = 1000;
    let dir = TempDir::new("ctl-impostor");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ctl = dir.join("impostor.sock");
    let listener = as_uid(IMPOSTOR, || {
        let l = std::os::unix::net::UnixListener::bind(&ctl).expect("bind as uid 1000");
        std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o777)).unwrap();
        l
    });
    let impostor = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let _ = conn.write_all(b"ok all is well\n");
        let mut heard = Vec::new();
        let _ = conn.read_to_end(&mut heard);
        heard
    });
    let out = client_as_nobody(&ctl, "deploy");
    assert_eq!(out.code(), 3, "{out:?}");
    assert_eq!(out.stdout, "", "the impostor's answer is not believed");
    assert_eq!(
        out.stderr,
        format!(
            "containerflip: refusing to talk to {}: what listens there runs as uid {IMPOSTOR}, \
             neither root nor uid 65534\n",
            ctl.display()
        )
    );
    assert_eq!(
        impostor.join().unwrap(),
        b"",
        "the request was not sent to the impostor"
    );
}

/// SPEC §6 bound: deploy/rollback callers waiting at once.
const MAX_WAITING: usize = 64;

/// Connect MAX_WAITING deploy callers (each has its first progress line,
/// so it is waiting), then check that one more is turned away.
fn fill_waiting(ctl: &Path, waiting: &mut Vec<std::io::BufReader<UnixStream>>) {
    use std::io::BufRead;
    let req = b"containerflip/1 deploy\n\n";
    for _ in 0..MAX_WAITING {
        let s = UnixStream::connect(ctl).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        (&s).write_all(req).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("progress "), "{line:?}");
        waiting.push(r);
    }
    assert_eq!(
        raw_exchange(ctl, req.to_vec()),
        format!("error too many clients waiting ({MAX_WAITING}); try again later\n")
    );
}

/// Clients waiting on deploys cannot take every control slot: past 64
/// waiting, a deploy request gets one error line, `status` still
/// answers, and the 64 that wait all get their result.
#[test]
fn waiting_clients_are_capped_and_status_still_answers() {
    use std::io::BufRead;
    let dir = TempDir::new("ctl-waitcap");
    let (mut sup, env_file, fifo) = crate::common::start_held(&dir, &[], &[]);
    sup.wait_ready(1);
    write_file(&env_file, &format!("HOLD={}\n", fifo.display()));
    let ctl = control(&dir);
    let mut waiting = Vec::new();
    fill_waiting(&ctl, &mut waiting);
    assert_eq!(
        run_client(client_cmd(&dir, "status", &["--check"])).code(),
        0
    );
    write_file(&env_file, "");
    release(&fifo);
    for mut r in waiting.drain(..) {
        let last = loop {
            let mut line = String::new();
            assert_ne!(
                r.read_line(&mut line).unwrap(),
                0,
                "closed without a result"
            );
            if !line.starts_with("progress ") {
                break line;
            }
        };
        assert!(last.starts_with("ok "), "{last:?}");
    }
    sup.wait_ready(3);
    // Full again, on a held deploy: `stop` is never turned away, and ends
    // what they wait for.
    write_file(&env_file, &format!("HOLD={}\n", fifo.display()));
    fill_waiting(&ctl, &mut waiting);
    let out = cf(&dir, "stop", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    // The held generation dies of the stop signal: that is the status.
    let code = sup.wait_exit().code().expect("an exit code");
    assert_eq!(
        out.stdout,
        format!("supervisor exited with status {code}\n"),
        "{:?}",
        sup.lines()
    );
    for mut r in waiting {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(r.get_mut(), &mut rest);
        let rest = format!("{}{rest}", String::from_utf8_lossy(r.buffer()));
        assert!(
            rest.contains("error "),
            "a waiting deploy heard nothing: {rest:?}"
        );
    }
    assert_eq!(sup.count(" spawned"), 4, "{:?}", sup.lines());
}

/// A socket whose listener never accepts and whose backlog is full (a
/// stuck supervisor): `run` refuses the path at once and `deploy
/// --timeout` gives up, instead of either hanging in connect(2).
#[test]
fn a_stuck_listener_with_a_full_backlog_hangs_neither_run_nor_deploy() {
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("ctl-stuck");
    let ctl = control(&dir);
    let stuck = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
    // SAFETY: listen(2) on a socket we own; a second listen only
    // changes the backlog.
    assert_eq!(unsafe { libc::listen(stuck.as_raw_fd(), 0) }, 0);
    let mut pending = Vec::new();
    while let Some(fd) = crate::common::connect_nonblocking(ctl.to_str().unwrap()) {
        pending.push(fd);
        assert!(pending.len() < 100, "the backlog never filled");
    }

    let mut sup = Supervisor::start(&dir, &["--listen", "127.0.0.1:0", "--", worker()], &[]);
    assert_eq!(sup.wait_exit().code(), Some(1));
    assert!(
        sup.lines().iter().any(|l| l.contains(&format!(
            "fatal: unable to bind control socket {}: another supervisor answers there",
            ctl.display()
        ))),
        "{:?}",
        sup.lines()
    );

    let out = run_client(client_cmd(&dir, "deploy", &["--timeout", "1s"]));
    assert_eq!(out.code(), 3, "{out:?}");
    assert!(
        out.stderr.starts_with(&format!(
            "containerflip: no supervisor answers at {}",
            ctl.display()
        )),
        "{out:?}"
    );
    drop(stuck);
}

/// Something at the control path that answers with an endless line: the
/// client stops at the longest line a supervisor could send (1 MiB)
/// instead of growing without end.
#[test]
fn an_endless_reply_line_is_bounded() {
    let dir = TempDir::new("ctl-endless");
    let ctl = control(&dir);
    let l = UnixListener::bind(&ctl).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        // 4 MiB, or until the client hangs up.
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = cf(&dir, "status", &[]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "containerflip: the supervisor at {} sent a reply line longer than 1024 KiB\n",
            ctl.display()
        )
    );
    server.join().unwrap();
}

/// Two deploys of a command as long as a request may carry, in control
/// bytes (six bytes each in JSON): the whole status would pass the 1 MiB
/// reply bound. Every format still answers, shortened and saying so.
#[test]
fn a_status_too_big_for_a_reply_is_shortened_and_still_answers() {
    let dir = TempDir::new("ctl-huge");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let long = |last: &str| -> Vec<OsString> {
        let mut argv = vec![OsString::from(worker())];
        argv.extend((0..4000).map(|_| OsString::from("\x01".repeat(29))));
        argv.push(last.into());
        argv
    };
    for (n, last) in [(2, "a"), (3, "b")] {
        let out = run_client(deploy_cmd(&dir, &long(last)));
        assert_eq!(out.code(), 0, "{out:?}");
        assert_eq!(deployed(out.last()).0, n, "{out:?}");
    }
    sup.wait_gen(2, "exited");

    let text = status_json(
        &dir,
        "print(d['truncated'], d['active'], len(d['command']), d['command'][0], d['previous_command'][1] == '\\x01' * 29)",
    );
    // The program, then the 30-byte words (29 and a separator) that fit
    // in the 16 KiB a shortened command keeps.
    let words = 1 + (16 * 1024 - (worker().len() + 1)) / 30;
    assert_eq!(
        text.trim_end(),
        format!("True 3 {words} {} True", worker()),
        "the command is its leading words"
    );

    // The verdict is in the code, the (shortened) object on stdout.
    let out = cf(&dir, "status", &["--check", "--json"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_json_object(&out.stdout, "\"truncated\":true");

    let out = cf(&dir, "status", &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let tail = |s: &str| s.lines().rev().take(3).collect::<Vec<_>>().join("\n");
    assert!(out.stdout.len() < 512 * 1024, "{} bytes", out.stdout.len());
    assert!(
        out.stdout
            .contains("(shortened to fit the reply bound of the control protocol)"),
        "{}",
        tail(&out.stdout)
    );
    for key in ["command: ", "previous command: "] {
        let line = out.stdout.lines().find(|l| l.starts_with(key));
        assert!(
            line.is_some_and(|l| l.ends_with('…')),
            "{key}line with its tail elided: {:?}",
            line.map(|l| l.len())
        );
    }
    assert_eq!(served_gen(addr), 3);
}

/// `status --json --check` against a supervisor that answers with an
/// error instead of the object (one too old for json-check): the error
/// is shown, not swallowed into a bare exit 1.
#[test]
fn status_json_check_shows_an_error_reply() {
    let dir = TempDir::new("ctl-jcerr");
    let ctl = control(&dir);
    let l = UnixListener::bind(&ctl).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"error 'status' does not take 'json-check'\n")
            .unwrap();
    });
    let out = cf(&dir, "status", &["--json", "--check"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "containerflip: 'status' does not take 'json-check'\n"
    );
    server.join().unwrap();
}

// ---------------------------------------------------------------------------
// 7. No supervisor.

#[test]
fn every_client_command_without_a_supervisor_exits_3_naming_the_path() {
    let dir = TempDir::new("ctl-none");
    let missing = dir.join("nobody-here.sock");
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap()); // the file stays, nobody listens
    let plain_file = dir.join("plain-file");
    std::fs::write(&plain_file, "").unwrap();
    let no_dir = dir.join("no-such-dir/control.sock");

    let commands: [&[&str]; 7] = [
        &["deploy"],
        &["deploy", "--", "true"],
        &["rollback"],
        &["status"],
        &["status", "--json"],
        &["status", "--check"],
        &["stop"],
    ];
    for path in [&missing, &stale, &plain_file, &no_dir] {
        for argv in commands {
            let (verb, rest) = argv.split_first().unwrap();
            let rest: Vec<&OsStr> = rest.iter().map(OsStr::new).collect();
            let out = run_client(client_cmd_at(path, verb, &rest));
            assert_eq!(out.code(), 3, "{argv:?} at {}: {out:?}", path.display());
            assert_eq!(out.stdout, "", "{argv:?}: {out:?}");
            assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
            assert!(
                out.stderr.contains(path.to_str().unwrap()),
                "{argv:?}: names the path: {out:?}"
            );
        }
    }

    // The default path comes from $CONTAINERFLIP_CONTROL.
    for verb in ["deploy", "rollback", "status", "stop"] {
        let out = run_client({
            let mut cmd = Command::new(bin());
            cmd.arg(verb).env("CONTAINERFLIP_CONTROL", &missing);
            cmd
        });
        assert_eq!(out.code(), 3, "{verb}: {out:?}");
        assert!(out.stderr.contains(missing.to_str().unwrap()), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "one line: {out:?}");
    }
}

/// SPEC §6: without --control, `run` and the clients take the first of
/// $CONTAINERFLIP_CONTROL, $RUNTIME_DIRECTORY/containerflip.sock,
/// $XDG_RUNTIME_DIR/containerflip.sock, /run/containerflip.sock (root),
/// /tmp/containerflip-$UID.sock; an empty variable counts as unset.
#[test]
fn the_default_control_path_follows_the_documented_order() {
    let dir = TempDir::new("ctl-order");
    let explicit = dir.join("explicit.sock");
    let (rt, xdg) = (dir.join("rt"), dir.join("xdg"));
    std::fs::create_dir(&rt).unwrap();
    std::fs::create_dir(&xdg).unwrap();
    let (rt_sock, xdg_sock) = (
        rt.join("containerflip.sock"),
        xdg.join("containerflip.sock"),
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    // The path the exit-3 line of `status` names, with exactly `env`.
    let tried = |env: &[(&str, &Path)], nobody: bool| -> String {
        let mut cmd = if nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()]);
            c
        } else {
            Command::new(bin())
        };
        cmd.arg("status").env_clear().env("PATH", &path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_client(cmd);
        assert_eq!(out.code(), 3, "{env:?}: {out:?}");
        out.stderr
            .trim_end()
            .strip_prefix("containerflip: no supervisor answers at ")
            .and_then(|rest| rest.split(": ").next())
            .unwrap_or_else(|| panic!("{env:?}: {out:?}"))
            .to_string()
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let all: [(&str, &Path); 3] = [
        ("CONTAINERFLIP_CONTROL", &explicit),
        ("RUNTIME_DIRECTORY", &rt),
        ("XDG_RUNTIME_DIR", &xdg),
    ];
    assert_eq!(tried(&all, false), s(&explicit));
    assert_eq!(tried(&all[1..], false), s(&rt_sock));
    assert_eq!(tried(&all[2..], false), s(&xdg_sock));
    let empty = Path::new("");
    assert_eq!(
        tried(
            &[
                ("CONTAINERFLIP_CONTROL", empty),
                ("RUNTIME_DIRECTORY", empty),
                ("XDG_RUNTIME_DIR", &xdg)
            ],
            false
        ),
        s(&xdg_sock),
        "empty variables are skipped"
    );
    assert_eq!(
        tried(
            &[
                ("RUNTIME_DIRECTORY", Path::new("relative/dir")),
                ("XDG_RUNTIME_DIR", &xdg)
            ],
            false
        ),
        s(&xdg_sock),
        "relative directories are skipped"
    );
    // A directory that does not exist (yet) still names the path: `run`
    // fails there loudly rather than choosing another one than clients.
    let missing = dir.join("missing");
    assert_eq!(
        tried(&[("XDG_RUNTIME_DIR", &missing)], false),
        s(&missing.join("containerflip.sock"))
    );
    if is_root() && Path::new("/run/containerflip.sock").exists() {
        // A supervisor started by hand with the defaults answers there.
        skipped(
            "the_default_control_path_follows_the_documented_order (no-variable part)",
            "/run/containerflip.sock exists on this machine",
        );
    } else if is_root() {
        assert_eq!(tried(&[], false), "/run/containerflip.sock");
        match nobody_can_run_bin() {
            Ok(()) => assert_eq!(tried(&[], true), "/tmp/containerflip-65534.sock"),
            Err(why) => skipped(
                "the_default_control_path_follows_the_documented_order (uid 65534 part)",
                &why,
            ),
        }
    } else {
        let uid = rustix::process::getuid().as_raw();
        assert_eq!(tried(&[], false), format!("/tmp/containerflip-{uid}.sock"));
    }

    // `run` resolves the same way: with only $RUNTIME_DIRECTORY (as under
    // systemd's RuntimeDirectory=) its socket is where `status` looks.
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--", worker()])
        .env_clear()
        .env("PATH", &path)
        .env("RUNTIME_DIRECTORY", &rt)
        .env("WORKER_RECORD", dir.path());
    let sup = Supervisor::spawn(cmd, &dir, &[]);
    sup.wait_ready(1);
    assert!(
        rt_sock.exists(),
        "run made no socket at {}",
        rt_sock.display()
    );
    let mut status = Command::new(bin());
    status
        .args(["status", "--check"])
        .env_clear()
        .env("PATH", &path)
        .env("RUNTIME_DIRECTORY", &rt);
    let out = run_client(status);
    assert_eq!(out.code(), 0, "{out:?}");
}

// ---------------------------------------------------------------------------
// stop.

#[test]
fn stop_prints_the_supervisor_exit_status() {
    let dir = TempDir::new("ctl-stop");
    let (mut sup, _addr, pid1) = start(&dir, &[], &[]);
    let out = cf(&dir, "stop", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stdout, "supervisor exited with status 0\n", "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    assert_eq!(sup.wait_exit().code(), Some(0));
    assert!(has_exited(pid1));
    assert!(!control(&dir).exists(), "the control socket is removed");
    assert_eq!(cf(&dir, "status", &[]).code(), 3);
}

/// Several `stop` calls at once: the first one stops the supervisor; the
/// others are answered however late they connect while it exits (or, reset
/// from its backlog, see it gone) and exit 0, or, connecting after it is
/// gone, exit 3 like any client without a supervisor. Never 1 ("connection
/// lost"): nothing failed.
#[test]
fn concurrent_stops_all_succeed() {
    let dir = TempDir::new("ctl-stops");
    let (mut sup, _addr, _) = start(&dir, &[], &[]);
    let stops: Vec<_> = (0..6)
        .map(|_| {
            client_cmd(&dir, "stop", &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn stop")
        })
        .collect();
    let mut stopped = 0;
    for child in stops {
        let out = child.wait_with_output().expect("stop");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        match out.status.code() {
            Some(0) => {
                assert!(stdout.starts_with("supervisor exited"), "{out:?}");
                stopped += 1;
            }
            Some(3) => assert!(stderr.contains("no supervisor answers at"), "{out:?}"),
            _ => panic!("{out:?}"),
        }
    }
    assert!(stopped >= 1);
    assert_eq!(sup.wait_exit().code(), Some(0));
}

#[test]
fn stop_returns_only_after_the_supervisor_exited() {
    let dir = TempDir::new("ctl-stopgone");
    let (mut sup, _addr, _) = start(&dir, &[], &[]);
    let out = cf(&dir, "stop", &[]);
    let gone = has_exited(sup.pid);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(gone, "the supervisor was still running when stop returned");
    assert_eq!(sup.wait_exit().code(), Some(0));
}

/// `stop`, then one SIGTERM (as `docker stop` sends) while the worker is
/// still draining: that is the *first* stop signal, so the drain goes on
/// and ends cleanly. Only a second TERM/INT kills.
#[test]
fn one_sigterm_after_stop_keeps_draining() {
    let dir = TempDir::new("ctl-stopterm");
    let (mut sup, addr, pid1) = start(&dir, &["--drain-timeout", "10m"], &[]);
    // An idle keep-alive connection holds the worker in its drain.
    let mut client = crate::common::KeepAlive::new(addr);
    assert_eq!(client.get("/").unwrap().generation(), 1);
    let stop = Bg::spawn(client_cmd(&dir, "stop", &[]));
    sup.wait_line("stopping (stop requested");
    crate::common::wait_event(&sup.records, pid1, "signal 15");
    sup.signal(libc::SIGTERM);
    sup.wait_line("SIGTERM while stopping: still draining");
    // status says so, and the health check fails: nothing new is served.
    assert_eq!(json_field(&dir, "d['state']"), "\"stopping\"");
    let text = cf(&dir, "status", &[]);
    assert!(
        text.stdout.contains(", stopping (active gen 1)"),
        "{text:?}"
    );
    // Its generation row says draining, not active.
    let row = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("1 "));
    assert!(row.is_some_and(|r| r.contains("draining")), "{text:?}");
    assert_eq!(cf(&dir, "status", &["--check"]).code(), 1);
    // The drain is intact: the held connection is answered and closed.
    let last = client.get("/").unwrap();
    assert_eq!(last.generation(), 1);
    assert!(last.closes(), "{last:?}");
    assert_eq!(sup.wait_exit().code(), Some(0));
    let out = stop.finish();
    assert_eq!(out.last(), "supervisor exited with status 0", "{out:?}");
    assert_eq!(sup.count("killing everything"), 0, "{:?}", sup.lines());
}

#[test]
fn stop_reports_a_nonzero_exit_status() {
    let dir = TempDir::new("ctl-stop137");
    // The worker ignores SIGTERM, so the drain deadline kills it: the
    // supervisor exits 128 + SIGKILL.
    let (mut sup, _addr, pid1) = start(
        &dir,
        &["--drain-timeout", "1s"],
        &[("WORKER_IGNORE_TERM", "1")],
    );
    let out = cf(&dir, "stop", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.last(), "supervisor exited with status 137", "{out:?}");
    assert_eq!(sup.wait_exit().code(), Some(137));
    assert!(has_exited(pid1));
}

#[test]
fn stop_during_a_deploy_tells_the_deploy_client() {
    let dir = TempDir::new("ctl-stopdeploy");
    let (mut sup, _addr, _) = start(&dir, &[], &[]);
    let gate = dir.join("gate");
    let mut bg = Bg::spawn(deploy_cmd(&dir, &gated(&gate, &[worker()], 0)));
    bg.wait_line("spawned gen 2");
    let stop = cf(&dir, "stop", &[]);
    assert_eq!(stop.code(), 0, "{stop:?}");
    let out = bg.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("the supervisor is stopping"), "{out:?}");
    sup.wait_exit();
}

/// A TCP listener that a worker shut down listens again with the
/// configured `--backlog`, not some other one.
#[test]
fn a_listener_listening_again_keeps_its_backlog() {
    if Command::new("ss").arg("-V").output().is_err() {
        crate::common::skipped(
            "a_listener_listening_again_keeps_its_backlog",
            "no `ss` (iproute2) to read a listener's backlog",
        );
        return;
    }
    let dir = TempDir::new("ctl-relisten-backlog");
    let (sup, addr, _) = start(&dir, &["--backlog", "7"], &[]);
    assert_eq!(crate::listen::ss_backlog(addr.port()), Some(7));
    deploy_shutting_down(&dir, &sup, &[3], || {});
    sup.wait_line(&format!(
        "listener {addr} (fd 3) was shut down by a worker (shutdown(2) on it); listening again"
    ));
    assert_served_by(addr, 1);
    assert_eq!(crate::listen::ss_backlog(addr.port()), Some(7));
}

/// A root client talks to a supervisor run by another user (an operator's
/// `sudo containerflip status` on a service that runs as its own user):
/// the "root or our own uid" rule of the client binds only non-root
/// clients. The supervisor runs as uid 65534 (setpriv); the client as root.
#[test]
fn a_root_client_talks_to_a_supervisor_of_another_uid() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        skipped(
            "a_root_client_talks_to_a_supervisor_of_another_uid",
            "needs root to run a supervisor as another uid",
        );
        return;
    }
    if let Err(why) = nobody_can_run_bin() {
        skipped("a_root_client_talks_to_a_supervisor_of_another_uid", &why);
        return;
    }
    let dir = TempDir::new("ctl-rootcli");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let ctl = control(&dir);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .args(["run", "--listen", "127.0.0.1:0", "--control"])
        .arg(&ctl)
        .args(["--", worker()])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    let sup = Supervisor::spawn(cmd, &dir, &[]);
    let addr = sup.listen_addr();
    sup.wait_ready(1);
    assert_eq!(std::fs::metadata(&ctl).unwrap().uid(), NOBODY);

    assert_healthy(&dir, addr, 1);
    let out = cf(&dir, "deploy", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(deployed(out.last()).0, 2, "{out:?}");
    assert_switched_to(&sup, addr, 2, &[1]);
}

/// The control path taken over by another live socket (a second
/// supervisor given the same path, say): the supervisor cannot bind it
/// again, says so and carries on (SIGHUP still deploys), and at exit
/// removes only the socket file it bound, never the one that replaced it.
#[test]
fn a_control_path_taken_by_another_socket_is_left_alone_at_exit() {
    let dir = TempDir::new("ctl-taken");
    let (mut sup, addr, _) = start(&dir, &[], &[]);
    let ctl = control(&dir);
    let other = dir.join("other.sock");
    let _listener = UnixListener::bind(&other).unwrap();
    std::fs::rename(&other, &ctl).unwrap();
    sup.wait_line(&format!(
        "control socket {} was removed or replaced and cannot be bound again",
        ctl.display()
    ));
    sup.signal(libc::SIGHUP);
    sup.wait_ready(2);
    assert_switched_to(&sup, addr, 2, &[1]);
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit().code(), Some(0));
    assert!(
        std::fs::symlink_metadata(&ctl).is_ok(),
        "the supervisor removed a control socket file that was not its own"
    );
    UnixStream::connect(&ctl).expect("the other socket still answers");
}

/// The table shows the command a rollback would return to and why the
/// last deploy failed (SPEC §6: "the last failure's reason"), neither
/// before there is one.
#[test]
fn status_table_shows_the_previous_command_and_the_last_failure() {
    let dir = TempDir::new("ctl-table2");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let s = cf(&dir, "status", &[]).stdout;
    assert!(!s.contains("previous command:"), "{s}");
    assert!(!s.contains("last failure:"), "{s}");

    let out = cf(&dir, "deploy", &["--", "sh", "-c", "exit 7"]);
    assert_eq!(out.code(), 1, "{out:?}");
    let out = cf(&dir, "deploy", &["--", "sh", "-c", "exec \"$0\"", worker()]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_switched_to(&sup, addr, 3, &[1]);

    let out = cf(&dir, "status", &[]);
    assert_eq!(out.code(), 0, "{out:?}");
    let s = &out.stdout;
    assert!(
        s.lines()
            .any(|l| l == format!("previous command: {}", worker())),
        "{s}"
    );
    let failure = s
        .lines()
        .find_map(|l| l.strip_prefix("last failure: "))
        .unwrap_or_else(|| panic!("no last failure line: {s}"));
    assert!(
        failure.contains("exited with status 7 before READY=1"),
        "{failure:?}"
    );
}

/// Making room, a client that has sent nothing is closed before one
/// whose request was served and that is reading its large reply slowly
/// (it is owed that answer): the silent one hears why, the reader still
/// gets its whole reply.
#[test]
fn room_is_made_by_closing_a_silent_client_before_a_slow_reader() {
    let dir = TempDir::new("ctl-evictorder");
    let (sup, addr, _) = start(&dir, &[], &[]);
    let baseline = deploy_a_long_status(&dir, &sup);
    let ctl = control(&dir);
    // The reader first (so it is the oldest), then silent ones up to the limit.
    let reader = UnixStream::connect(&ctl).unwrap();
    (&reader)
        .write_all(b"containerflip/1 status json\n\n")
        .unwrap();
    let silent: Vec<UnixStream> = (1..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&ctl).expect("connect a silent client"))
        .collect();
    wait_until("every client accepted", || {
        fd_count(sup.pid) >= baseline + MAX_CLIENTS
    });
    let out = cf(&dir, "status", &["--check"]);
    assert_eq!(out.code(), 0, "{out:?}");

    reader.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reply = Vec::new();
    (&reader).read_to_end(&mut reply).unwrap();
    assert!(reply.starts_with(b"data {\"pid\":"), "{:?}", &reply[..20]);
    assert!(
        reply.ends_with(b"}\nok \n"),
        "the reader was closed to make room: {} bytes, ending {:?}",
        reply.len(),
        String::from_utf8_lossy(&reply[reply.len().saturating_sub(20)..])
    );
    let mut evicted = 0;
    for s in &silent {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut reply = String::new();
        (&*s).read_to_string(&mut reply).expect("closed in time");
        if reply.contains("too many connections") {
            evicted += 1;
        } else {
            assert_error("a silent client", &reply, "no complete request in time");
        }
    }
    if evicted == 0 {
        // status came after every silent client's 5 s request timeout (a
        // very slow machine): no room had to be made, nothing to judge.
        crate::common::notice(
            "room_is_made_by_closing_a_silent_client_before_a_slow_reader: \
             inconclusive, the silent clients timed out before status arrived",
        );
    }
    assert_healthy(&dir, addr, 2);
}
