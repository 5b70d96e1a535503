//! Starting a worker: build argv and envp before `fork` (with a
//! fixed-width `LISTEN_PID=` slot the child fills in), fork, let
//! `sys::exec_child` set the child up, open a pidfd, and hand back the
//! read end of a close-on-exec pipe that says whether `execve` worked (as
//! Rust's std does, but without blocking: the event loop watches it, so a
//! child stuck before exec, in a `chdir` to a hung mount say, holds up
//! nothing but its own generation).
//!
//! `std::process::Command` is not used: it builds the environment in a
//! way that cannot carry the child's own pid, and it hides the
//! process-group, death-signal and fd set-up we need.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::pipe::{PipeFlags, pipe_with};
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::error::os_text;
use crate::log::shell_words;
use crate::sys;

/// Environment keys addressed to the supervisor that a worker must not
/// see as its own (a worker gets fresh `LISTEN_*` and `NOTIFY_SOCKET`).
const NOT_INHERITED: [&str; 7] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "CONTAINERFLIP_GENERATION",
];

/// The supervisor's environment as workers inherit it.
pub fn base_environment() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !NOT_INHERITED.iter().any(|n| OsStr::new(n) == k))
        .collect()
}

/// What one spawn needs.
pub struct Request<'a> {
    pub command: &'a [OsString],
    pub base_env: &'a [(OsString, OsString)],
    pub env_file: Option<&'a Path>,
    pub chdir: Option<&'a Path>,
    pub listen_fds: usize,
    pub fd_names: &'a str,
    pub notify_path: &'a Path,
    pub generation: u64,
    /// `DRAIN_GRACE_MS`, unless the supervisor's own environment sets it.
    pub drain_grace_ms: Option<u64>,
    pub death_signal: i32,
}

pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// Non-blocking; see [`read_exec_report`].
    pub exec_report: OwnedFd,
}

/// What the exec-report pipe says so far.
pub enum ExecReport {
    /// Nothing yet: the child is still setting up.
    Pending,
    /// End of file: the child exec'd (or died without a word).
    Done,
    /// The child's set-up or `execve` failed (it then exits 1, 126 or
    /// 127): what it was doing and the OS error.
    Failed(sys::Stage, std::io::Error),
}

/// Read the child's report: 5 bytes (stage, errno) or end of file. The
/// child writes them in one `write` of less than `PIPE_BUF`, so they
/// arrive whole.
pub fn read_exec_report(pipe: &OwnedFd) -> ExecReport {
    let mut msg = [0u8; 5];
    loop {
        return match rustix::io::read(pipe, &mut msg) {
            Ok(5) => match sys::Stage::from_byte(msg[0]) {
                Some(stage) => {
                    let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
                    ExecReport::Failed(stage, std::io::Error::from_raw_os_error(errno))
                }
                None => ExecReport::Done,
            },
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => ExecReport::Pending,
            _ => ExecReport::Done,
        };
    }
}

/// Start a worker. An `Err` is a spawn that never produced a process
/// (bad env file, fork failure), worded for "deploy failed: …".
pub fn spawn(req: &Request<'_>) -> Result<Child, String> {
    let mut env = Env::new(req.base_env);
    if let Some(path) = req.env_file {
        for (k, v) in read_env_file(path)? {
            env.set(k, v);
        }
    }
    env.set("LISTEN_FDS".into(), req.listen_fds.to_string().into());
    env.set("LISTEN_FDNAMES".into(), req.fd_names.into());
    env.set("NOTIFY_SOCKET".into(), req.notify_path.as_os_str().into());
    env.set(
        "CONTAINERFLIP_GENERATION".into(),
        req.generation.to_string().into(),
    );
    if let Some(ms) = req.drain_grace_ms {
        env.set("DRAIN_GRACE_MS".into(), ms.to_string().into());
    }
    let env = env.vars;

    // Never empty: `run` and the control protocol both refuse an empty
    // command; still, an error here rather than a panic.
    let program = req.command.first().ok_or("the command is empty")?;
    let (paths, searched) = exec_paths(program, &env);
    let paths: Vec<CString> = paths
        .into_iter()
        .map(|p| cstring(p.into_os_string().into_vec()))
        .collect::<Result<_, _>>()?;
    let argv: Vec<CString> = req
        .command
        .iter()
        .map(|a| cstring(a.as_bytes().to_vec()))
        .collect::<Result<_, _>>()?;
    let envs: Vec<CString> = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstring(kv)
        })
        .collect::<Result<_, _>>()?;
    let chdir = req
        .chdir
        .map(|d| cstring(d.as_os_str().as_bytes().to_vec()))
        .transpose()?;

    let (err_read, err_write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
        .map_err(|e| format!("unable to create a pipe: {}", os_text(e)))?;
    // LISTEN_PID=<digits> is added by the plan: the child writes its own
    // pid into it.
    let mut plan = sys::ChildPlan::new(
        &paths,
        searched,
        &argv,
        &envs,
        chdir.as_deref(),
        req.listen_fds,
        req.death_signal,
        err_write.as_fd(),
    );
    let pid = sys::fork_exec(&mut plan).map_err(|e| format!("unable to fork: {}", os_text(e)))?;
    drop(plan);
    drop(err_write);
    // Open the pidfd before anything can reap the child: only our own
    // waitpid loop reaps, and it has not run since the fork.
    let pidfd = match pidfd_open(
        Pid::from_raw(pid).expect("fork returned a positive pid"),
        PidfdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            return Err(format!(
                "unable to open a pidfd for pid {pid}: {}",
                os_text(e)
            ));
        }
    };
    Ok(Child {
        pid,
        pidfd,
        exec_report: err_read,
    })
}

fn cstring(bytes: Vec<u8>) -> Result<CString, String> {
    CString::new(bytes)
        .map_err(|_| "an argument or environment entry contains a NUL byte".to_string())
}

/// A worker's environment in the order it is built: the supervisor's
/// own, then each new key as it is set; a key set again keeps its place
/// and takes the new value. Indexed by key, so an env file of 100,000
/// keys costs n log n, not n² (a stall of the loop: 30 s at 128,000).
struct Env {
    vars: Vec<(OsString, OsString)>,
    at: BTreeMap<OsString, usize>,
}

impl Env {
    fn new(base: &[(OsString, OsString)]) -> Env {
        let mut env = Env {
            vars: Vec::with_capacity(base.len()),
            at: BTreeMap::new(),
        };
        for (k, v) in base {
            // A key twice in our own environ: getenv(3) sees the first.
            if !env.at.contains_key(k) {
                env.set(k.clone(), v.clone());
            }
        }
        env
    }

    fn set(&mut self, key: OsString, value: OsString) {
        match self.at.get(&key) {
            Some(&i) => self.vars[i].1 = value,
            None => {
                self.at.insert(key.clone(), self.vars.len());
                self.vars.push((key, value));
            }
        }
    }
}

/// Where `execve` looks for `program`: itself when it has a `/`
/// (relative to the worker's directory), else each `PATH` directory in
/// order, tried by the child (execvp is not async-signal-safe, and
/// looking here would block the loop on a hung mount). True when it is
/// a PATH search.
fn exec_paths(program: &OsStr, env: &[(OsString, OsString)]) -> (Vec<PathBuf>, bool) {
    if program.as_bytes().contains(&b'/') {
        return (vec![PathBuf::from(program)], false);
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let dirs = std::env::split_paths(&path).map(|dir| dir.join(program));
    (dirs.collect(), true)
}

/// "unable to execute /srv/app: No such file or directory": what a child
/// that reported `Failed(stage, e)` was doing, on what, and why.
pub fn failure_reason(
    stage: sys::Stage,
    e: &std::io::Error,
    command: &[OsString],
    chdir: Option<&Path>,
) -> String {
    let what = match stage {
        sys::Stage::Exec => command
            .first()
            .map(|p| shell_words(std::slice::from_ref(p))),
        sys::Stage::Chdir => chdir.map(|d| shell_words(&[d.into()])),
        _ => None,
    };
    let what = what.map_or_else(String::new, |w| format!(" {w}"));
    // The child turns execve's EACCES for a directory into EISDIR.
    let error = match e.raw_os_error() {
        Some(libc::EISDIR) => "is a directory".to_string(),
        _ => crate::error::os_message(e),
    };
    format!("unable to {}{what}: {error}", stage.doing())
}

/// An env file larger than this is refused.
const MAX_ENV_FILE: u64 = 1 << 20;

/// The whole of a regular file of at most `max` bytes. It is read from the
/// event loop at every spawn, so nothing may make that read block or grow
/// without end: O_NONBLOCK keeps a FIFO from blocking the open, and
/// anything but a regular file (a FIFO, /dev/zero) is refused.
fn read_small_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = Vec::new();
    file.take(max + 1).read_to_end(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB",
            max / 1024
        )));
    }
    Ok(text)
}

/// `KEY=VALUE` lines; blank lines and `#` comments skipped; a value in
/// matching single or double quotes loses them.
pub fn read_env_file(path: &Path) -> Result<Vec<(OsString, OsString)>, String> {
    let shown = path.display();
    let text = read_small_file(path, MAX_ENV_FILE).map_err(|e| {
        format!(
            "unable to read env file {shown}: {}",
            crate::error::os_message(&e)
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let bad = |why: &str| format!("env file {shown} line {}: {why}", i + 1);
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return Err(bad("expected KEY=VALUE"));
        };
        let (key, value) = (line[..eq].trim_ascii(), line[eq + 1..].trim_ascii());
        let key_ok = !key.is_empty()
            && !key[0].is_ascii_digit()
            && key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            return Err(bad("the key must be letters, digits and '_'"));
        }
        // DRAIN_GRACE_MS too: containerflip computes it, or passes on its
        // own environment's value.
        if NOT_INHERITED
            .iter()
            .chain(&["DRAIN_GRACE_MS"])
            .any(|n| n.as_bytes() == key)
        {
            return Err(bad(&format!(
                "{} is set by containerflip itself",
                String::from_utf8_lossy(key)
            )));
        }
        if value.contains(&0) {
            return Err(bad("NUL byte in the value"));
        }
        let value = match value {
            [q, inner @ .., r] if q == r && (*q == b'"' || *q == b'\'') => inner,
            v => v,
        };
        out.push((
            OsString::from_vec(key.to_vec()),
            OsString::from_vec(value.to_vec()),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_keeps_order_and_a_key_set_again_keeps_its_place() {
        let kv = |k: &str, v: &str| (k.into(), v.into());
        let mut env = super::Env::new(&[kv("A", "1"), kv("B", "2"), kv("A", "3")]);
        env.set("C".into(), "4".into());
        env.set("B".into(), "5".into());
        assert_eq!(env.vars, [kv("A", "1"), kv("B", "5"), kv("C", "4")]);
    }

    #[test]
    fn env_file() {
        let dir = std::env::temp_dir().join(format!("cf-envfile-{}", std::process::id()));
        std::fs::write(&dir, "# comment\n\nA=1\nB = \"two words\" \nC=x=y\n").unwrap();
        let v = super::read_env_file(&dir).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].1, "two words");
        assert_eq!(v[2].1, "x=y");
        std::fs::write(&dir, "A=1\nnot a pair\n").unwrap();
        let e = super::read_env_file(&dir).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(&dir, "A=1\n\nLISTEN_FDS=9\n").unwrap();
        let e = super::read_env_file(&dir).unwrap_err();
        assert!(
            e.ends_with(" line 3: LISTEN_FDS is set by containerflip itself"),
            "{e}"
        );
        std::fs::remove_file(&dir).unwrap();
    }
}
