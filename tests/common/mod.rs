//! The test harness: run the real `containerflip` binary against the real
//! example worker (`examples/worker.rs`), read what it logs and what the
//! worker records, talk HTTP to what it serves, run its client commands
//! (`deploy`, `status`, … against a test's own control socket), in the
//! foreground or in the background (`Bg`), and speak sd_notify to it.
//!
//! Nothing here sleeps to synchronise. Every wait is for an event (a log
//! line, a file, a process exit) with a generous deadline that only exists
//! so a broken build fails instead of hanging; no test asserts on timing.

#![allow(dead_code)] // each test module uses a different part of this

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long any single wait may take before the test is declared hung.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test: cargo's build, or `$CONTAINERFLIP_BIN` (the
/// Makefile runs the whole suite again against the static release build).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var("CONTAINERFLIP_BIN") {
        Ok(b) if !b.is_empty() => b,
        _ => env!("CARGO_BIN_EXE_containerflip").to_string(),
    })
}

/// The example worker, built once per test run: integration tests do not
/// build examples by themselves.
pub fn worker() -> &'static str {
    static BUILD: Once = Once::new();
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILD.call_once(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_containerflip"));
        let profile_dir = bin.parent().expect("binary has a directory");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--example", "worker"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build --example worker");
        assert!(status.success(), "cargo build --example worker: {status}");
        let worker = profile_dir.join("examples/worker");
        assert!(
            worker.exists(),
            "{} missing after the build",
            worker.display()
        );
        PATH.set(worker.to_str().expect("UTF-8 target path").to_string())
            .unwrap();
    });
    PATH.get().expect("worker built")
}

/// How many fds process `pid` has open (0 once it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A notice the test harness does not capture, so a skipped test is
/// visible in the output of `cargo test`.
pub fn notice(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "containerflip tests: {msg}");
}

/// Polls `cond` until it holds, panicking with `what` after `DEADLINE`.
/// For conditions no event announces (a file appearing, a pid vanishing).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Temporary directories.

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Short: unix socket paths are limited to 107 bytes.
        let path = std::env::temp_dir().join(format!("cf-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The path as a `&str` (for environment values and arguments).
    pub fn str(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp dir")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `path` atomically (a reader sees the old or the new contents).
pub fn write_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, contents).expect("write file");
    fs::rename(&tmp, path).expect("rename file");
}

// ---------------------------------------------------------------------------
// The supervisor.

/// stderr lines of a supervisor, shared with the thread that reads them.
#[derive(Default)]
struct Log {
    lines: Mutex<(Vec<String>, bool)>, // lines, EOF seen
    changed: Condvar,
}

impl Log {
    /// The lines, even after a panicking test poisoned the lock (Drop
    /// still has to clean up then).
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<String>, bool)> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Supervisor {
    pub pid: u32,
    log: Arc<Log>,
    exit: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    /// Where the worker records go (`WORKER_RECORD`).
    pub records: PathBuf,
}

impl Supervisor {
    /// `containerflip run ARGS` with a cleared environment (PATH kept), its
    /// control socket in `dir`, `WORKER_RECORD=dir`, and `env` on top.
    pub fn start(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Supervisor {
        Supervisor::spawn(Supervisor::run_cmd(dir, args), dir, env)
    }

    /// The command `start` runs, unstarted (for a test that changes how it
    /// starts, then gives it to `spawn`).
    pub fn run_cmd(dir: &TempDir, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CONTAINERFLIP_CONTROL", control(dir))
            .env("WORKER_RECORD", dir.path());
        cmd
    }

    /// Like `start`, with the whole command line given (`run` not added).
    pub fn spawn(mut cmd: Command, dir: &TempDir, env: &[(&str, &str)]) -> Supervisor {
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Drop recognises its processes by this variable (pids are reused:
        // a pid alone does not say a process is still ours).
        if !cmd.get_envs().any(|(k, _)| k == "WORKER_RECORD") {
            cmd.env("WORKER_RECORD", dir.path());
        }
        // A test binary killed half-way (SIGKILL, a panic in another thread
        // aborting it) must leave no supervisor behind: SIGTERM, a graceful
        // stop, when the thread that started it dies.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl(2), getppid(2) and raise(3) are async-signal-safe
        // and take no pointers; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died before the prctl: no signal will come.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
        // Its own process group, so Drop can kill it and anything still in
        // its group without touching the test runner.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn containerflip");
        let pid = child.id();
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).unwrap_or(0);
                let mut guard = l.lock();
                if n == 0 {
                    guard.1 = true;
                    l.changed.notify_all();
                    return;
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches('\n')
                    .to_string();
                // Captured by the test harness, shown when a test fails.
                eprintln!("[{pid}] {line}");
                guard.0.push(line);
                l.changed.notify_all();
            }
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(status);
            }
        });
        Supervisor {
            pid,
            log,
            exit: rx,
            status: None,
            records: dir.path().to_path_buf(),
        }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().0.clone()
    }

    /// Waits for the first line (from the start) that matches, returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth(what, 1, pred)
    }

    /// Waits for the `n`-th line that matches.
    pub fn wait_for_nth(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut guard = self.log.lock();
        loop {
            if let Some(line) = guard.0.iter().filter(|l| pred(l)).nth(n - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if guard.1 || now >= deadline {
                let why = if guard.1 {
                    "stderr closed"
                } else {
                    "timed out"
                };
                let log = guard.0.join("\n");
                drop(guard); // not poisoned: Drop reads it again
                panic!("{why} waiting for {what}; log:\n{log}");
            }
            guard = self
                .log
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Like `wait_for`, with its own deadline and without panicking
    /// (true if the line came, or is already there).
    fn try_wait_for(&self, within: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let guard = self.log.lock();
        let (guard, _) = self
            .log
            .changed
            .wait_timeout_while(guard, within, |g| !g.1 && !g.0.iter().any(|l| pred(l)))
            .unwrap_or_else(|e| e.into_inner());
        guard.0.iter().any(|l| pred(l))
    }

    /// Waits for a line containing `needle`.
    pub fn wait_line(&self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?}"), |l| l.contains(needle))
    }

    /// Lines containing `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a `gen N pid P <event>` line; returns P and the line.
    pub fn wait_gen(&self, n: u64, event: &str) -> (u32, String) {
        let prefix = format!("containerflip: gen {n} pid ");
        let line = self.wait_for(&format!("gen {n} {event}"), |l| {
            l.strip_prefix(&prefix)
                .and_then(|rest| rest.split_once(' '))
                .is_some_and(|(_, tail)| tail.starts_with(event))
        });
        (gen_pid(&line, &prefix), line)
    }

    /// Waits for generation `n` to be ready; returns its pid.
    pub fn wait_ready(&self, n: u64) -> u32 {
        self.wait_gen(n, "ready in ").0
    }

    /// The address of the `i`-th `listening on ADDR as fd N` line.
    pub fn listen_addr_nth(&self, i: usize) -> String {
        let line = self.wait_for_nth("listening on", i + 1, |l| {
            l.starts_with("containerflip: listening on ")
        });
        line["containerflip: listening on ".len()..]
            .split(" as fd ")
            .next()
            .unwrap()
            .to_string()
    }

    /// The first listener's TCP address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr_nth(0)
            .parse()
            .expect("a TCP listen address")
    }

    pub fn signal(&self, sig: i32) {
        kill(self.pid as i32, sig);
    }

    /// Waits for the supervisor to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        match self.exit.recv_timeout(DEADLINE) {
            Ok(s) => {
                self.status = Some(s);
                // Everything it wrote is read once stderr reaches EOF
                // (unless a leftover process holds it; then don't wait).
                let guard = self.log.lock();
                let _ = self
                    .log
                    .changed
                    .wait_timeout_while(guard, Duration::from_secs(5), |g| !g.1);
                s
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "containerflip did not exit; log:\n{}",
                    self.lines().join("\n")
                )
            }
            Err(RecvTimeoutError::Disconnected) => panic!("lost the containerflip child"),
        }
    }

    /// The pids of every generation it logged.
    pub fn generation_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .lines()
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("containerflip: gen ")?;
                let (_, rest) = rest.split_once(" pid ")?;
                rest.split(' ').next()?.parse().ok()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Supervisor {
    /// Whether `pid` is a process of this supervisor's (itself, a worker,
    /// anything they started): its environment carries our records
    /// directory. A pid read from a log may have been reused since.
    fn owns(&self, pid: u32) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let mut marker = b"WORKER_RECORD=".to_vec();
        marker.extend_from_slice(self.records.as_os_str().as_bytes());
        marker.push(0);
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split_inclusive(|&b| b == 0).any(|v| v == marker))
    }

    /// SIGKILL to process group `pgid` if it is still ours: its leader is
    /// alive and ours (then the group id cannot be reused), else each
    /// member that is ours.
    fn kill_group(&self, pgid: u32) {
        if process_group(pgid) == Some(pgid) && self.owns(pgid) {
            kill(-(pgid as i32), libc::SIGKILL);
            return;
        }
        for pid in all_pids() {
            if process_group(pid) == Some(pgid) && self.owns(pid) {
                kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.status.is_none()
            && let Ok(s) = self.exit.try_recv()
        {
            self.status = Some(s);
        }
        if self.status.is_none() {
            // A stop, then the second signal that kills everything at once,
            // so the supervisor still removes its runtime directory. SIGKILL
            // if it does not answer (a test that failed half-way).
            self.signal(libc::SIGTERM);
            let stopping = self.try_wait_for(Duration::from_secs(5), |l| {
                l.starts_with("containerflip: stopping")
            });
            let mut status = None;
            if stopping {
                self.signal(libc::SIGTERM);
                status = self.exit.recv_timeout(Duration::from_secs(10)).ok();
            }
            if status.is_none() {
                // Not reaped yet (the thread that waits for it has not
                // sent its status): the pid, and so its group, is ours.
                match self.exit.try_recv() {
                    Err(mpsc::TryRecvError::Empty) => {
                        kill(-(self.pid as i32), libc::SIGKILL);
                        let _ = self.exit.recv_timeout(DEADLINE);
                    }
                    _ => self.kill_group(self.pid),
                }
            }
        } else {
            // It exited; whatever is left of its group (a test that failed
            // half-way) is killed, if ours.
            self.kill_group(self.pid);
        }
        // Workers live in their own process groups; a leftover one (a test
        // that failed half-way) is killed with its group, only if the
        // processes are still ours.
        for pid in self.generation_pids() {
            self.kill_group(pid);
        }
        // Grandchildren that left the group (WORKER_SPAWN=daemon).
        if let Ok(dir) = fs::read_dir(&self.records) {
            for entry in dir.flatten() {
                let is_grandchild = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(".grandchild"));
                if !is_grandchild {
                    continue;
                }
                if let Some(pid) = read_pid(&entry.path())
                    && is_worker_process(pid)
                    && self.owns(pid)
                {
                    kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes no pointers; a stale pid only fails with ESRCH.
    unsafe { libc::kill(pid, sig) };
}

/// Field 5 of /proc/PID/stat: the process group, if the process exists.
pub fn process_group(pid: u32) -> Option<u32> {
    stat_field(pid, 5)?.parse().ok()
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat.
pub fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n - 3).map(str::to_string)
}

/// P in a log line `PREFIX P …` (`prefix` ends with `pid `).
pub fn gen_pid(line: &str, prefix: &str) -> u32 {
    line[prefix.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether a process with this pid exists, zombies included.
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn is_worker_process(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(6).any(|w| w == b"worker"))
}

pub fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

// ---------------------------------------------------------------------------
// What the worker records (see examples/worker.rs).

pub struct StartRecord {
    pub lines: Vec<(String, String)>,
}

impl StartRecord {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A key that must be there.
    pub fn must(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("no {key} in the start record: {:?}", self.lines))
    }

    pub fn args(&self) -> Vec<Vec<u8>> {
        self.lines
            .iter()
            .filter(|(k, _)| k == "arg")
            .map(|(_, v)| {
                (0..v.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&v[i..i + 2], 16).unwrap())
                    .collect()
            })
            .collect()
    }
}

/// Waits for `DIR/PID.start` (written atomically) and parses it.
pub fn start_record(dir: &Path, pid: u32) -> StartRecord {
    let path = dir.join(format!("{pid}.start"));
    wait_until(&format!("{}", path.display()), || path.exists());
    let text = fs::read_to_string(&path).unwrap();
    StartRecord {
        lines: text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The lines of `DIR/PID.events` so far.
pub fn events(dir: &Path, pid: u32) -> Vec<String> {
    fs::read_to_string(dir.join(format!("{pid}.events")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits for the event line `event` from worker `pid`.
pub fn wait_event(dir: &Path, pid: u32, event: &str) {
    wait_until(&format!("event {event:?} from pid {pid}"), || {
        events(dir, pid).iter().any(|e| e == event)
    });
}

/// Waits for `DIR/PID.grandchild`; returns the grandchild's pid.
pub fn grandchild(dir: &Path, worker: u32) -> u32 {
    let path = dir.join(format!("{worker}.grandchild"));
    wait_until(&format!("{}", path.display()), || read_pid(&path).is_some());
    read_pid(&path).unwrap()
}

// ---------------------------------------------------------------------------
// HTTP.

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `X-Generation` as a number (0 when missing or not a number, which
    /// `summarize` counts as a failure: every worker answer carries it).
    pub fn generation(&self) -> u64 {
        self.header("x-generation")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0)
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Sends one GET on `stream` and reads the answer.
pub fn request<S: Read + Write>(
    stream: &mut BufReader<S>,
    path: &str,
    keep_alive: bool,
) -> io::Result<Response> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n");
    stream.get_mut().write_all(req.as_bytes())?;
    read_response(stream)
}

pub fn read_response<R: Read>(stream: &mut BufReader<R>) -> io::Result<Response> {
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the head",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header {l:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = resp
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    resp.body.resize(len, 0);
    stream.read_exact(&mut resp.body)?;
    Ok(resp)
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.set_write_timeout(Some(DEADLINE))?;
    Ok(s)
}

/// One request on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    request(&mut BufReader::new(connect(addr)?), path, false)
}

/// A client that keeps one connection and opens a new one only after the
/// server said `Connection: close` (or after an error). It never retries a
/// request: a request that fails is reported.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    pub connections: usize,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            addr,
            conn: None,
            connections: 0,
        }
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(connect(self.addr)?));
            self.connections += 1;
        }
        let result = request(self.conn.as_mut().unwrap(), path, true);
        if result.as_ref().map_or(true, Response::closes) {
            self.conn = None;
        }
        result
    }
}

// ---------------------------------------------------------------------------
// Load.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    NewConnection,
    KeepAlive,
}

/// The result of one request made under load.
#[derive(Debug)]
pub struct Outcome {
    /// The value of `Load::phase` when the request started.
    pub phase: u32,
    pub result: Result<Response, String>,
}

/// Client threads sending requests until stopped, or until a count or time
/// bound (so a broken supervisor cannot make a test run away).
pub struct Load {
    stop: Arc<AtomicBool>,
    pub phase: Arc<AtomicU32>,
    done: Arc<AtomicUsize>,
    /// TCP connections opened (all threads, counted when they stop).
    connections: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    pub const MAX_PER_THREAD: usize = 200_000;
    pub const MAX_TIME: Duration = Duration::from_secs(120);

    pub fn start(addr: SocketAddr, threads: usize, mode: Mode) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU32::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, phase, done) = (stop.clone(), phase.clone(), done.clone());
                let connections = connections.clone();
                thread::spawn(move || {
                    let until = Instant::now() + Load::MAX_TIME;
                    let mut client = KeepAlive::new(addr);
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst)
                        && out.len() < Load::MAX_PER_THREAD
                        && Instant::now() < until
                    {
                        let p = phase.load(Ordering::SeqCst);
                        let result = match mode {
                            Mode::NewConnection => get(addr, "/"),
                            Mode::KeepAlive => client.get("/"),
                        };
                        out.push(Outcome {
                            phase: p,
                            result: result.map_err(|e| e.to_string()),
                        });
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    let opened = match mode {
                        Mode::NewConnection => out.len(),
                        Mode::KeepAlive => client.connections,
                    };
                    connections.fetch_add(opened, Ordering::SeqCst);
                    out
                })
            })
            .collect();
        Load {
            stop,
            phase,
            done,
            connections,
            threads,
        }
    }

    /// Requests completed so far (all threads).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until at least `more` requests complete after this call.
    pub fn wait_more(&self, more: usize) {
        let target = self.done() + more;
        wait_until(&format!("{more} more requests"), || self.done() >= target);
    }

    pub fn stop(self) -> Vec<Outcome> {
        self.stop_counting().0
    }

    /// Stops the load; returns the outcomes and the connections opened.
    pub fn stop_counting(self) -> (Vec<Outcome>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let outcomes = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        (outcomes, self.connections.load(Ordering::SeqCst))
    }
}

/// Summary of a load run: failures (as text) and the generations seen.
pub fn summarize(outcomes: &[Outcome]) -> (Vec<String>, HashSet<u64>) {
    let mut failures = Vec::new();
    let mut gens = HashSet::new();
    for o in outcomes {
        match &o.result {
            Ok(r) if r.status / 100 == 2 && r.generation() > 0 => {
                gens.insert(r.generation());
            }
            Ok(r) if r.status / 100 == 2 => failures.push(format!(
                "status {} without a valid X-Generation: {:?}",
                r.status,
                r.header("x-generation")
            )),
            Ok(r) => failures.push(format!("status {}", r.status)),
            Err(e) => failures.push(e.clone()),
        }
    }
    (failures, gens)
}

/// Says a test was skipped (a tool or a privilege it needs is missing)
/// where `cargo test` shows it: straight to stderr, which the test
/// harness does not capture (it captures `print!`/`eprint!` only).
pub fn skipped(test: &str, why: &str) {
    let _ = writeln!(io::stderr(), "SKIPPED {test}: {why}");
}

/// `sh -c` that, when `$HOLD` names a FIFO, waits for a line on it before
/// exec'ing the worker (same pid, so LISTEN_PID stays right): the test
/// decides when a generation may come up.
pub const HOLD_SCRIPT: &str = "if [ -n \"$HOLD\" ]; then read line < \"$HOLD\"; fi; exec \"$0\"";

pub fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Writes a line into `fifo` once someone has it open for reading (a
/// non-blocking open fails with ENXIO until then), then closes it.
pub fn release(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = None;
    wait_until(&format!("a reader on {}", fifo.display()), || {
        f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .ok();
        f.is_some()
    });
    f.unwrap().write_all(b"go\n").expect("write the FIFO");
}

// ---------------------------------------------------------------------------
// Command lines, client commands and their output.

/// The control socket every test puts in its temp dir.
pub fn control(dir: &TempDir) -> PathBuf {
    dir.join("control.sock")
}

/// `--listen 127.0.0.1:0 EXTRA -- worker`.
pub fn worker_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", worker()]);
    args
}

/// P in a `containerflip: pid P …` log line (a process of no generation).
pub fn pid_of_line(line: &str) -> u32 {
    line.split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// A supervisor running the example worker whose workers read `DIR/env`
/// (written with `contents` now) at each spawn: `run --listen
/// 127.0.0.1:0 --env-file DIR/env EXTRA -- worker`, with `env`. Returns
/// it and the env file, to change what the next generation gets.
pub fn start_with_env_file(
    dir: &TempDir,
    contents: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Supervisor, PathBuf) {
    let env_file = dir.join("env");
    write_file(&env_file, contents);
    let mut args = vec!["--env-file", env_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let sup = Supervisor::start(dir, &worker_args(&args), env);
    (sup, env_file)
}

/// A supervisor whose command is `/bin/sh -c HOLD_SCRIPT worker` and whose
/// `--env-file` (created empty) can set `HOLD`: `run --listen 127.0.0.1:0
/// --env-file DIR/env EXTRA -- …`, not waiting for anything. Returns it,
/// the env file and the FIFO `DIR/hold` (created) to name in `HOLD=`.
pub fn start_held(
    dir: &TempDir,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Supervisor, PathBuf, PathBuf) {
    let env_file = dir.join("env");
    let fifo = dir.join("hold");
    mkfifo(&fifo);
    write_file(&env_file, "");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--env-file",
        env_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "/bin/sh", "-c", HOLD_SCRIPT, worker()]);
    let sup = Supervisor::start(dir, &args, env);
    (sup, env_file, fifo)
}

/// A client command line, unstarted: `containerflip VERB --control CTL
/// REST`, stdin from /dev/null, `$CONTAINERFLIP_CONTROL` removed.
pub fn client_cmd_at<S: AsRef<OsStr>>(ctl: &Path, verb: &str, rest: &[S]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg(verb)
        .arg("--control")
        .arg(ctl)
        .args(rest)
        .env_remove("CONTAINERFLIP_CONTROL")
        .stdin(Stdio::null());
    cmd
}

/// `containerflip VERB --control DIR/control.sock ARGS`, unstarted.
pub fn client_cmd(dir: &TempDir, verb: &str, args: &[&str]) -> Command {
    client_cmd_at(&control(dir), verb, args)
}

/// `client_cmd` run to completion.
pub fn client(dir: &TempDir, verb: &str, args: &[&str]) -> Output {
    client_cmd(dir, verb, args)
        .output()
        .expect("run a containerflip client")
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a finished client command did.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn last(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }
}

/// Runs a client command to completion.
pub fn run_client(mut cmd: Command) -> Out {
    let out = cmd.output().expect("run a containerflip client");
    Out {
        status: out.status,
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// A client command running in the background whose stdout lines are
/// read as they come. Dropping it kills the client (if still running).
pub struct Bg {
    pub child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// Taken by `finish` (Drop still needs `child`).
    stderr: Option<JoinHandle<String>>,
}

impl Bg {
    pub fn spawn(mut cmd: Command) -> Bg {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn a containerflip client");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Bg {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "timed out waiting for {needle:?}; client said {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("client exited before {needle:?}; it said {:?}", self.seen)
                }
            }
        }
    }

    /// Waits for the client to exit (its stdout closes first).
    pub fn finish(mut self) -> Out {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("client did not finish; it said {:?}", self.seen);
                }
            }
        }
        let status = self.child.wait().expect("wait for the client");
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Out {
            status,
            stdout,
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    pub fn running(&mut self) -> bool {
        !self.exited()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /` answered 200; the generation that answered.
pub fn served_gen(addr: SocketAddr) -> u64 {
    let r = get(addr, "/").expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    r.generation()
}

// ---------------------------------------------------------------------------
// sd_notify, uids, processes.

/// The notify socket of worker `pid` (from its start record).
pub fn notify_socket(dir: &Path, pid: u32) -> String {
    start_record(dir, pid).must("env.NOTIFY_SOCKET").to_string()
}

/// One datagram to the notify socket `path`.
pub fn try_send_dgram(path: &str, msg: &[u8]) -> io::Result<usize> {
    UnixDatagram::unbound()?.send_to(msg, path)
}

/// `try_send_dgram` that must succeed.
pub fn send_dgram(path: &str, msg: &[u8]) {
    UnixDatagram::unbound()
        .unwrap()
        .send_to(msg, path)
        .unwrap_or_else(|e| panic!("send {:?} to {path}: {e}", text(msg)));
}

/// The uid (and gid) tests switch to when root.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a thread of its own switched to uid/gid `NOBODY` (no
/// supplementary groups) and returns what it returns. The raw
/// setresuid(2)/setresgid(2) system calls (unlike the libc wrappers)
/// change the calling thread's credentials only, and the thread ends
/// with `f`, so the rest of the test binary stays root.
pub fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    as_uid(NOBODY, f)
}

/// `as_nobody` with another uid (and the same gid).
pub fn as_uid<T: Send>(uid: u32, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: raw system calls with integer arguments; they
                // change this thread's credentials only, and it ends here.
                unsafe {
                    assert_eq!(
                        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                        0
                    );
                    assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
                }
                f()
            })
            .join()
            .unwrap()
    })
}

/// Waits until `pid` no longer exists at all: killed *and* reaped.
pub fn wait_gone(pid: u32) {
    wait_until(&format!("pid {pid} to be gone (killed and reaped)"), || {
        !pid_exists(pid)
    });
}

/// Opens a non-blocking unix stream connection (a blocking connect would
/// wait while the listen backlog is full).
pub fn connect_nonblocking(path: &str) -> Option<OwnedFd> {
    // SAFETY: plain socket calls on a fresh fd; `addr` is a zeroed
    // sockaddr_un with the path copied in (bounds checked).
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        assert!(path.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(path.bytes()) {
            *d = s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let r = libc::connect(fd, (&raw const addr).cast(), len);
        (r == 0).then_some(owned)
    }
}
