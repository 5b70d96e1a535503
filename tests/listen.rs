//! `--listen` forms and `--backlog` (SPEC §2 "Binding"): `PORT` and
//! `:PORT` dual-stack, `[::1]:0`, a named `unix:PATH`, `fd:N` inherited by
//! the supervisor, the backlog given to listen(2), and the life cycle of a
//! unix socket file (a stale one replaced, a live one refused, removed at
//! exit). Tests that need something the host may lack (IPv6 loopback, `ss`)
//! say so on stderr (SKIPPED …, visible even under the test harness) and
//! pass.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::common::*;

/// Whether the host has an IPv6 loopback to connect to.
fn have_ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// A port that was free a moment ago on `[::]` (hence on every address).
fn free_port() -> u16 {
    let l = TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .expect("bind a probe socket");
    l.local_addr().unwrap().port()
}

fn served_gen(addr: SocketAddr) -> u64 {
    let r = get(addr, "/").unwrap_or_else(|e| panic!("GET / on {addr}: {e}"));
    assert_eq!(r.status, 200, "{addr}: {r:?}");
    r.generation()
}

/// `run --listen FORM(port) -- worker` on a port picked free; a new port
/// when someone took it in between (the only expected bind failure).
fn start_on_free_port(dir: &TempDir, form: impl Fn(u16) -> String) -> (Supervisor, u16) {
    for _ in 0..10 {
        let port = free_port();
        let arg = form(port);
        let mut sup = Supervisor::start(dir, &["--listen", &arg, "--", worker()], &[]);
        let line = sup.wait_for("a listener or a bind error", |l| {
            l.starts_with("containerflip: listening on ") || l.to_lowercase().contains("in use")
        });
        if line.starts_with("containerflip: listening on ") {
            return (sup, port);
        }
        assert_eq!(sup.wait_exit().code(), Some(1));
    }
    panic!("no free port in ten tries");
}

#[test]
fn port_and_colon_port_listen_dual_stack() {
    if !have_ipv6_loopback() {
        skipped(
            "port_and_colon_port_listen_dual_stack",
            "no IPv6 loopback on this host",
        );
        return;
    }
    for form in ["PORT", ":PORT"] {
        let dir = TempDir::new("dual");
        let (mut sup, port) = start_on_free_port(&dir, |p| form.replace("PORT", &p.to_string()));
        sup.wait_ready(1);
        let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        for _ in 0..3 {
            assert_eq!(served_gen(v4), 1, "--listen {form} over IPv4");
            assert_eq!(served_gen(v6), 1, "--listen {form} over IPv6");
        }
        // Both reached the very socket the worker was given, one socket.
        let rec = start_record(&sup.records, sup.generation_pids()[0]);
        assert_eq!(rec.must("env.LISTEN_FDS"), "1", "--listen {form}");
        sup.signal(libc::SIGTERM);
        assert!(sup.wait_exit().success(), "--listen {form}");
    }
}

#[test]
fn ipv6_loopback_port_zero() {
    if !have_ipv6_loopback() {
        skipped("ipv6_loopback_port_zero", "no IPv6 loopback on this host");
        return;
    }
    let dir = TempDir::new("v6");
    let sup = Supervisor::start(&dir, &["--listen", "[::1]:0", "--", worker()], &[]);
    let addr = sup.listen_addr();
    assert!(
        addr.is_ipv6() && addr.ip().is_loopback(),
        "listening on {addr}"
    );
    assert_ne!(addr.port(), 0, "the kernel-chosen port is shown");
    let pid = sup.wait_ready(1);
    assert_eq!(served_gen(addr), 1);
    assert_eq!(
        start_record(&sup.records, pid).must("listen.3"),
        format!("tcp {addr}")
    );
    // `[::1]` stays IPv6 only: nothing answers on 127.0.0.1 at that port
    // from this listener (it may be refused, or be someone else's).
    if let Ok(r) = get(format!("127.0.0.1:{}", addr.port()).parse().unwrap(), "/") {
        assert_ne!(r.header("x-pid"), Some(pid.to_string().as_str()));
    }
}

#[test]
fn named_unix_listener_serves_http_and_its_file_goes_at_exit() {
    let dir = TempDir::new("unixname");
    let path = dir.join("web.sock");
    let arg = format!("web=unix:{}", path.display());
    let mut sup = Supervisor::start(&dir, &["--listen", &arg, "--", worker()], &[]);
    assert_eq!(
        sup.listen_addr_nth(0),
        format!("unix:{}", path.display()),
        "listening line"
    );
    assert!(sup.wait_line(" as fd 3").ends_with("(web)"));
    let pid = sup.wait_ready(1);
    let rec = start_record(&sup.records, pid);
    assert_eq!(rec.must("env.LISTEN_FDS"), "1");
    assert_eq!(rec.must("env.LISTEN_FDNAMES"), "web");
    assert_eq!(rec.must("listen.3"), format!("unix {}", path.display()));
    for _ in 0..3 {
        let mut s = BufReader::new(UnixStream::connect(&path).expect("connect"));
        let r = request(&mut s, "/", false).unwrap();
        assert_eq!((r.status, r.generation()), (200, 1));
        assert_eq!(r.body_str(), format!("gen 1 pid {pid}\n"));
    }
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success());
    assert!(!path.exists(), "the unix socket file is removed at exit");
}

/// The child of `cmd` gets `raw` as its fd `target`, close-on-exec clear,
/// as from a parent that set a socket up for it.
fn pass_fd(cmd: &mut Command, raw: i32, target: i32) {
    // SAFETY: only dup2(2)/fcntl(2) on integers between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == target {
                libc::fcntl(target, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, target)
            };
            match r {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        });
    }
}

/// The supervisor inherited a listening socket at fd 5 (as from a parent
/// that set it up) and is told `--listen fd:5`: no LISTEN_FDS anywhere.
#[test]
fn inherited_fd_is_adopted_and_served() {
    let dir = TempDir::new("fdn");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let raw = listener.as_raw_fd();
    const TARGET: i32 = 5;
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--listen", "fd:5", "--", worker()])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CONTAINERFLIP_CONTROL", dir.join("control.sock"))
        .env("WORKER_RECORD", dir.path());
    pass_fd(&mut cmd, raw, TARGET);
    let mut sup = Supervisor::spawn(cmd, &dir, &[]);
    let shown = sup.listen_addr_nth(0);
    assert!(shown.contains(&addr.to_string()), "listening on {shown}");
    let pid = sup.wait_ready(1);
    let rec = start_record(&sup.records, pid);
    assert_eq!(rec.must("env.LISTEN_FDS"), "1");
    assert_eq!(rec.must("listen.3"), format!("tcp {addr}"));
    // Parked at 3; fd 5 itself (and whatever else the test harness left
    // open) does not reach the worker.
    assert_eq!(rec.must("fds"), "0,1,2,3", "fds open in the worker");
    for _ in 0..3 {
        assert_eq!(served_gen(addr), 1);
    }
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success());
    drop(listener);
}

/// Socket activation whose LISTEN_FDNAMES holds a name systemd would
/// never give (a newline, a terminal escape): one warning, and the worker
/// and `status` see `unknown` instead of it.
#[test]
fn an_unprintable_inherited_name_becomes_unknown() {
    let dir = TempDir::new("badname");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let raw = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" run -- \"$1\"",
        bin(),
        worker(),
    ])
    .env("LISTEN_FDNAMES", "x\ny\x1b[2J")
    .env("CONTAINERFLIP_CONTROL", dir.join("control.sock"));
    pass_fd(&mut cmd, raw, 3);
    let sup = Supervisor::spawn(cmd, &dir, &[]);
    let pid = sup.wait_ready(1);
    assert_eq!(served_gen(addr), 1);
    assert_eq!(
        start_record(&sup.records, pid).must("env.LISTEN_FDNAMES"),
        "unknown"
    );
    assert_eq!(
        sup.count(
            "LISTEN_FDNAMES: name 1 of fd 3 is not 1 to 255 printable characters; using 'unknown'"
        ),
        1,
        "{:?}",
        sup.lines()
    );
    let out = run_client(client_cmd(&dir, "status", &[]));
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains(" unknown "), "{}", out.stdout);
    assert!(!out.stdout.contains('\x1b'), "{:?}", out.stdout);
    drop(listener);
}

/// A LISTEN_FDS addressed to the supervisor that no process could hold is
/// one clear fatal line (exit 1), not an attempt to walk the fd space.
#[test]
fn an_absurd_listen_fds_is_one_fatal_line() {
    let out = Command::new("sh")
        .args([
            "-c",
            "export LISTEN_PID=$$ LISTEN_FDS=2147483647; exec \"$0\" run -- true",
            bin(),
        ])
        .env_remove("CONTAINERFLIP_CONTROL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "containerflip: fatal: unable to adopt LISTEN_FDS=2147483647: \
         more than the 4096 inherited sockets supported\n"
    );
}

/// A LISTEN_FDS addressed to the supervisor that is not a count is named
/// as such, not taken for "no sockets passed".
#[test]
fn a_malformed_listen_fds_is_named() {
    for (value, code, said) in [
        (
            "abc",
            1,
            "containerflip: fatal: unable to adopt LISTEN_FDS='abc': not a number of descriptors\n",
        ),
        (
            "-1",
            1,
            "containerflip: fatal: unable to adopt LISTEN_FDS='-1': not a number of descriptors\n",
        ),
        (
            "0",
            2,
            "containerflip: run: no --listen given and no sockets passed by socket activation (LISTEN_FDS) (see 'containerflip run --help')\n",
        ),
    ] {
        let out = Command::new("sh")
            .args([
                "-c",
                "export LISTEN_PID=$$ LISTEN_FDS=\"$1\"; exec \"$0\" run -- true",
                bin(),
                value,
            ])
            .env_remove("CONTAINERFLIP_CONTROL")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{value}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), said, "{value}");
    }
}

/// The Send-Q column of `ss -ltnH sport = :PORT`: a listener's backlog.
pub(crate) fn ss_backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn backlog_reaches_listen() {
    if Command::new("ss").arg("-V").output().is_err() {
        skipped(
            "backlog_reaches_listen",
            "no `ss` (iproute2) to read a listener's backlog",
        );
        return;
    }
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    for (args, want) in [
        (vec!["--backlog", "7"], 7),
        (vec!["--backlog=77"], 77.min(somaxconn)),
        (vec![], 4096.min(somaxconn)),
    ] {
        let dir = TempDir::new("backlog");
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(&args);
        all.extend_from_slice(&["--", worker()]);
        let sup = Supervisor::start(&dir, &all, &[]);
        let port = sup.listen_addr().port();
        sup.wait_ready(1);
        assert_eq!(ss_backlog(port), Some(want), "{args:?}");
    }
}

#[test]
fn stale_unix_socket_file_is_replaced() {
    let dir = TempDir::new("stale");
    let path = dir.join("app.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a stale socket file is left behind");
    let arg = format!("unix:{}", path.display());
    let mut sup = Supervisor::start(&dir, &["--listen", &arg, "--", worker()], &[]);
    sup.wait_ready(1);
    let mut s = BufReader::new(UnixStream::connect(&path).expect("connect"));
    assert_eq!(request(&mut s, "/", false).unwrap().generation(), 1);
    sup.signal(libc::SIGTERM);
    assert!(sup.wait_exit().success());
    assert!(!path.exists());
}

/// `run ARGS` exits 1 at start without spawning a worker: its log lines.
fn refused_at_start(dir: &TempDir, args: &[&str]) -> Vec<String> {
    refused(Supervisor::start(dir, args, &[]))
}

/// `sup` exits 1 at start without spawning a worker: its log lines.
fn refused(mut sup: Supervisor) -> Vec<String> {
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(1), "{status}");
    assert_eq!(sup.count(" spawned"), 0, "a worker was started");
    sup.lines()
}

#[test]
fn live_unix_socket_is_refused_naming_the_path() {
    let dir = TempDir::new("live");
    let path = dir.join("app.sock");
    let live = UnixListener::bind(&path).unwrap();
    let arg = format!("unix:{}", path.display());
    let lines = refused_at_start(&dir, &["--listen", &arg, "--", worker()]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(path.to_str().unwrap()) && l.to_lowercase().contains("in use")),
        "no line names {}: {lines:?}",
        path.display()
    );
    // The owner's socket is untouched: its file is there and it accepts.
    assert!(path.exists());
    let _c = UnixStream::connect(&path).expect("the live socket still accepts");
    live.accept().expect("accept on the live socket");
}

/// `fd:N` names a descriptor the supervisor inherited, never one it made:
/// with nothing inherited, `-l 127.0.0.1:0 -l fd:3` is refused rather
/// than handing the worker one socket as fd 3 and fd 4; and with only fd 3
/// inherited, `-l fd:3 -l fd:4` is refused, not given fd 3 twice (the copy
/// of fd 3 must not land on 4). The line names the descriptor, whatever
/// the harness may have left at that number.
#[test]
fn fd_never_names_a_socket_the_supervisor_made() {
    let dir = TempDir::new("fdbound");
    let lines = refused_at_start(&dir, &["-l", "127.0.0.1:0", "-l", "fd:3", "--", worker()]);
    assert!(lines.iter().any(|l| l.contains("adopt fd:3")), "{lines:?}");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "-l", "fd:3", "-l", "fd:4", "--", worker()])
        .env("CONTAINERFLIP_CONTROL", dir.join("control2.sock"))
        .env("WORKER_RECORD", dir.path());
    pass_fd(&mut cmd, listener.as_raw_fd(), 3);
    let lines = refused(Supervisor::spawn(cmd, &dir, &[]));
    assert!(lines.iter().any(|l| l.contains("adopt fd:4")), "{lines:?}");
}

/// connect(2) on a regular file also answers ECONNREFUSED, like a stale
/// socket: the probe alone would take someone's file for a stale socket
/// and delete it. Neither a `unix:` listener nor the control socket may.
#[test]
fn a_regular_file_in_the_way_is_never_removed() {
    let dir = TempDir::new("notsock");
    let victim = dir.join("precious.txt");
    write_file(&victim, "keep me\n");
    let arg = format!("unix:{}", victim.display());
    let mut sup = Supervisor::start(&dir, &["--listen", &arg, "--", worker()], &[]);
    assert_eq!(sup.wait_exit().code(), Some(1));
    sup.wait_for("a line naming the path", |l| {
        l.contains(victim.to_str().unwrap()) && l.contains("not a socket")
    });
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");

    let ctl = control(&dir);
    write_file(&ctl, "keep me too\n");
    let mut sup = Supervisor::start(&dir, &["--listen", "127.0.0.1:0", "--", worker()], &[]);
    assert_eq!(sup.wait_exit().code(), Some(1));
    sup.wait_for("a line naming the control path", |l| {
        l.contains(ctl.to_str().unwrap()) && l.contains("not a socket")
    });
    assert_eq!(sup.count(" spawned"), 0, "a worker was started");
    assert_eq!(std::fs::read_to_string(&ctl).unwrap(), "keep me too\n");
}

/// `--listen fd:N` takes only a listening stream socket the supervisor
/// really inherited: a descriptor that is not open, a regular file, a
/// socket that does not listen and a datagram socket are each a start-up
/// error naming `fd:N` and why, and no worker starts.
#[test]
fn an_inherited_fd_that_is_not_a_listening_stream_socket_is_refused() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let unlistened = std::net::TcpStream::connect(
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(),
    )
    .unwrap();
    let dgram = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let cases: [(Option<i32>, &str); 4] = [
        (None, "no such open file descriptor"),
        (Some(file.as_raw_fd()), "Socket operation on non-socket"),
        (Some(unlistened.as_raw_fd()), "the socket is not listening"),
        (Some(dgram.as_raw_fd()), "not a stream socket"),
    ];
    for (raw, why) in cases {
        let dir = TempDir::new("fdbad");
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--listen", "fd:7", "--", worker()])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CONTAINERFLIP_CONTROL", dir.join("control.sock"))
            .env("WORKER_RECORD", dir.path());
        // None: nothing at fd 7 (the harness opens everything close-on-exec).
        if let Some(raw) = raw {
            pass_fd(&mut cmd, raw, 7);
        }
        let mut sup = Supervisor::spawn(cmd, &dir, &[]);
        let status = sup.wait_exit();
        assert_eq!(status.code(), Some(1), "{why}: {status}; {:?}", sup.lines());
        assert!(
            sup.lines()
                .iter()
                .any(|l| l.contains("fd:7") && l.contains(why)),
            "no line names fd:7 and {why:?}: {:?}",
            sup.lines()
        );
        assert_eq!(sup.count(" spawned"), 0, "a worker was started ({why})");
    }
}
