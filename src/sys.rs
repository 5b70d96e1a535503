//! The only module with `unsafe`: the raw system calls that rustix leaves
//! out on purpose (fork, execve, `_exit`, signal masks and dispositions,
//! signalfd, kill with an arbitrary signal number) and the code that runs in
//! a child between `fork` and `execve`.
//!
//! Everything in [`exec_child`] runs in the forked child of a process that
//! may hold allocator locks: it uses only async-signal-safe system calls on
//! memory prepared before the fork, never allocates, and ends in `execve`
//! or `_exit`.

use std::ffi::{CStr, CString};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Signals that stay unblocked: the synchronous faults, which the kernel
/// delivers to the faulting thread and which must keep killing us.
const FAULT_SIGNALS: [i32; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// One past the highest signal number (`SIGRTMAX` on Linux is 64).
const NSIG: i32 = 65;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A signal set (`sigset_t`).
#[derive(Clone, Copy)]
pub struct SigSet(libc::sigset_t);

impl SigSet {
    /// Every signal but the synchronous faults.
    pub fn all_but_faults() -> SigSet {
        // SAFETY: sigfillset/sigdelset only write into the set we own.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigfillset(&mut set);
            for sig in FAULT_SIGNALS {
                libc::sigdelset(&mut set, sig);
            }
            SigSet(set)
        }
    }

    pub fn empty() -> SigSet {
        // SAFETY: sigemptyset only writes into the set we own.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            SigSet(set)
        }
    }
}

/// `sigprocmask(SIG_SETMASK)`: install `set`, return the previous mask.
pub fn set_signal_mask(set: &SigSet) -> io::Result<SigSet> {
    // SAFETY: both pointers point at live sigset_t values we own.
    unsafe {
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        cvt(libc::sigprocmask(libc::SIG_SETMASK, &set.0, &mut old))?;
        Ok(SigSet(old))
    }
}

/// `signalfd(2)` for `set`, non-blocking and close-on-exec.
pub fn signalfd(set: &SigSet) -> io::Result<OwnedFd> {
    // SAFETY: set points at a valid sigset_t; a returned fd is ours alone.
    unsafe {
        let fd = cvt(libc::signalfd(
            -1,
            &set.0,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// `kill(2)`: `pid` > 0 is one process, `pid` < 0 the process group `-pid`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// `dup3(2)` with `O_CLOEXEC`: make `target` a close-on-exec duplicate of
/// `fd`, closing what was at `target`. Used to park listening sockets at
/// 3, 4, … so a worker gets them at the numbers `LISTEN_FDS` promises.
///
/// Whatever is at `target` is closed behind any owner's back, so this is
/// for start-up only, before the supervisor opens anything of its own
/// (`listen::park`): what sits at 3… then is inherited and unowned. It
/// stays a safe fn so that `unsafe` stays inside this module.
pub fn dup_to(fd: RawFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup3 takes plain integers; on success `target` is a new fd
    // that nothing else owns (see above: only start-up calls this).
    unsafe {
        cvt(libc::dup3(fd, target, libc::O_CLOEXEC))?;
        Ok(OwnedFd::from_raw_fd(target))
    }
}

/// Whether descriptor number `fd` is open (`fcntl(F_GETFD)` succeeds).
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on an integer only reads the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// `fcntl(F_DUPFD_CLOEXEC)` of a descriptor number we were told we
/// inherited (`--listen fd:N`, `LISTEN_FDS`); EBADF when it is not open.
pub fn dup_inherited(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on an integer fd; on success the new fd is ours alone.
    unsafe {
        let new = cvt(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min))?;
        Ok(OwnedFd::from_raw_fd(new))
    }
}

/// Give `sig` its default disposition. At start-up for SIGCHLD: an
/// inherited SIG_IGN (or SA_NOCLDWAIT) would make the kernel reap our
/// children itself, and no exit status would ever reach us (tini does
/// the same). For client commands, SIGPIPE, so a closed stdout ends them
/// quietly like any Unix tool.
pub fn default_disposition(sig: i32) -> io::Result<()> {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid; sigaction only
    // reads it.
    unsafe {
        let mut dfl = std::mem::zeroed::<libc::sigaction>();
        dfl.sa_sigaction = libc::SIG_DFL;
        cvt(libc::sigaction(sig, &dfl, std::ptr::null_mut())).map(drop)
    }
}

/// `SO_PEERCRED` of a unix socket: (pid, uid). The pid is 0 when the peer
/// lives in a pid namespace we cannot see, which rustix's `UCred` (with
/// a non-zero pid type) cannot represent.
pub fn peer_cred(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(i32, u32)> {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we
    // own and which has exactly that size.
    unsafe {
        let mut cred = std::mem::zeroed::<libc::ucred>();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        cvt(libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        ))?;
        Ok((cred.pid, cred.uid))
    }
}

/// Make sure fds 0, 1 and 2 are open, on /dev/null if not, so that no
/// socket we create later lands on a standard stream.
pub fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on an integer fd has no side effects.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: open with a NUL-terminated literal; the returned fd is
            // the lowest free one, i.e. `fd`, and stays open for our life.
            // Without /dev/null (a bare image), an O_PATH fd of / holds the
            // slot: writes to it fail, but nothing else can land there.
            unsafe {
                if libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) == -1 {
                    libc::open(c"/".as_ptr(), libc::O_PATH);
                }
            };
        }
    }
}

/// Mark every fd from `from` on close-on-exec, so descriptors our parent
/// leaked to us never reach a worker even where `close_range` is missing.
pub fn cloexec_from(from: RawFd) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd >= from {
            // SAFETY: F_GETFD/F_SETFD on an integer fd; a closed fd fails
            // harmlessly, and the directory's own fd (still open while we
            // iterate) is CLOEXEC already.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// `prctl(PR_SET_CHILD_SUBREAPER)`.
pub fn set_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(io::Error::from)
}

/// Everything the child needs, prepared before `fork` so that the child
/// allocates nothing: the argv and envp pointer arrays and the
/// `LISTEN_PID=` slot it fills in with its own pid. The borrowed strings
/// outlive the plan, which makes [`fork_exec`] safe to call.
pub struct ChildPlan<'a> {
    /// Paths handed to `execve`, in order: the command itself when it
    /// has a `/`, else one per PATH directory (relative ones resolve in
    /// the worker's directory, after its chdir). The search runs in the
    /// child, so a hung mount in PATH never blocks the supervisor.
    paths: &'a [CString],
    /// Whether `paths` is a PATH search (else the one path given).
    searched: bool,
    /// NULL-terminated; points into the caller's argv.
    argv: Vec<*const libc::c_char>,
    /// NULL-terminated; points into the caller's env and `listen_pid`.
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` and room for 20 digits and a NUL (heap memory: its
    /// address, stored in `envp`, does not change when the plan moves).
    listen_pid: Box<[u8; LISTEN_PID_LEN]>,
    chdir: Option<&'a CStr>,
    /// Number of listening sockets parked at fd 3, 4, …
    listen_fds: i32,
    /// Parent-death signal.
    death_signal: i32,
    /// The supervisor's pid, to notice it died before PR_SET_PDEATHSIG.
    parent_pid: i32,
    /// Write end of the CLOEXEC pipe that reports a failure before exec.
    error_pipe: BorrowedFd<'a>,
    _strings: PhantomData<&'a CStr>,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const LISTEN_PID_LEN: usize = LISTEN_PID_PREFIX.len() + 21;

impl<'a> ChildPlan<'a> {
    /// A plan to exec the first of `paths` that runs (a PATH search when
    /// `searched`) with `argv` and `env` (each `KEY=VALUE`; `LISTEN_PID`
    /// is added), in `chdir`, with the sockets at 3…3+n.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        paths: &'a [CString],
        searched: bool,
        argv: &'a [CString],
        env: &'a [CString],
        chdir: Option<&'a CStr>,
        listen_fds: usize,
        death_signal: i32,
        error_pipe: BorrowedFd<'a>,
    ) -> ChildPlan<'a> {
        let mut listen_pid = Box::new([0u8; LISTEN_PID_LEN]);
        listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
        let slot: *const libc::c_char = listen_pid.as_mut_ptr().cast_const().cast();
        let argv = argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp = env
            .iter()
            .map(|e| e.as_ptr())
            .chain([slot, std::ptr::null()])
            .collect();
        ChildPlan {
            paths,
            searched,
            argv,
            envp,
            listen_pid,
            chdir,
            listen_fds: listen_fds as i32,
            death_signal,
            // SAFETY: getpid takes nothing and cannot fail.
            parent_pid: unsafe { libc::getpid() },
            error_pipe,
            _strings: PhantomData,
        }
    }
}

/// `fork(2)`. In the child, set the worker up and exec it; never returns
/// there. In the parent, return the child's pid.
pub fn fork_exec(plan: &mut ChildPlan<'_>) -> io::Result<i32> {
    // SAFETY: the child branch only runs `exec_child`, which is
    // async-signal-safe, touches only the plan (valid by construction),
    // and never returns.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        exec_child(plan);
    }
    Ok(pid)
}

/// The child side of [`fork_exec`]. Only async-signal-safe calls, no
/// allocation, no locks; ends in `execve` or `_exit`.
fn exec_child(plan: &mut ChildPlan<'_>) -> ! {
    let error_pipe = plan.error_pipe.as_raw_fd();
    // SAFETY: every call below is an async-signal-safe system call on
    // memory prepared by the parent before fork (which this child owns a
    // private copy of); nothing allocates or takes a lock.
    unsafe {
        // The generation's own process group first, so a drain deadline
        // can SIGKILL everything it forked and no signal sent to the
        // supervisor's group (a terminal's ^C) reaches the worker later.
        if libc::setpgid(0, 0) == -1 {
            fail(error_pipe, Stage::Setpgid, 1);
        }
        // Then default dispositions, while every signal is still blocked:
        // Rust ignores SIGPIPE and an ignored disposition survives exec.
        // Setting SIG_IGN on the way discards whatever became pending
        // between fork and setpgid (signals aimed at the supervisor's
        // group); the supervisor itself sends nothing before exec, as it
        // waits on the error pipe. The raw system call, because glibc's
        // sigaction refuses the signals it reserves (32, 33), which a
        // parent using posix_spawn leaves ignored. The kernel's layout is
        // handler, flags, (restorer,) mask: all-zero but the handler, as
        // 64-bit words on the 64-bit targets checked below.
        #[cfg(not(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        )))]
        compile_error!("struct kernel_sigaction is laid out for 64-bit Linux targets only");
        for handler in [1u64 /* SIG_IGN */, 0 /* SIG_DFL */] {
            let action = [handler, 0, 0, 0];
            for sig in 1..NSIG {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig as libc::c_long,
                        action.as_ptr(),
                        std::ptr::null_mut::<u64>(),
                        8 as libc::c_long,
                    );
                }
            }
        }
        // Die with the supervisor, and close the race where it died before
        // the prctl: then our parent is no longer the supervisor.
        if libc::prctl(libc::PR_SET_PDEATHSIG, plan.death_signal as libc::c_ulong) == -1 {
            fail(error_pipe, Stage::DeathSignal, 1);
        }
        if libc::getppid() != plan.parent_pid {
            libc::_exit(1);
        }
        write_pid(
            plan.listen_pid.as_mut_ptr().add(LISTEN_PID_PREFIX.len()),
            libc::getpid(),
        );
        if let Some(dir) = plan.chdir
            && libc::chdir(dir.as_ptr()) == -1
        {
            fail(error_pipe, Stage::Chdir, 1);
        }
        for fd in 3..3 + plan.listen_fds {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                fail(error_pipe, Stage::ListenFds, 1);
            }
        }
        // Anything beyond the listeners closes at exec, whoever opened it.
        // ENOSYS/EINVAL on kernels before 5.11: the startup sweep in
        // `cloexec_from` already covered inherited fds.
        libc::syscall(
            libc::SYS_close_range,
            (3 + plan.listen_fds) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        let empty = SigSet::empty();
        libc::sigprocmask(libc::SIG_SETMASK, &empty.0, std::ptr::null_mut());
        let errno = libc::__errno_location();
        // As execvp(3): a PATH search passes over a directory where the
        // name is missing or not a runnable file, and when nothing ran,
        // says EACCES if some file of that name was not executable, else
        // ENOENT (never a file of that name from the worker's directory).
        let mut failed = libc::ENOENT;
        let mut denied = false;
        for path in plan.paths {
            libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            let e = *errno;
            if !plan.searched {
                // execve says EACCES for a directory: say what it is.
                failed = if e == libc::EACCES && is_dir(path) {
                    libc::EISDIR
                } else {
                    e
                };
                break;
            }
            match e {
                libc::EACCES => denied |= !is_dir(path),
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => {
                    (failed, denied) = (e, false);
                    break;
                }
            }
        }
        if denied {
            failed = libc::EACCES;
        }
        *errno = failed;
        // The shell's convention (POSIX): 127 not found, 126 found but
        // could not be run.
        let code = if failed == libc::ENOENT { 127 } else { 126 };
        fail(error_pipe, Stage::Exec, code);
    }
}

/// Which step of the child's set-up failed, as reported through the
/// error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Setpgid = 1,
    DeathSignal = 2,
    Chdir = 3,
    ListenFds = 4,
    Exec = 5,
}

impl Stage {
    pub fn from_byte(b: u8) -> Option<Stage> {
        [
            Stage::Setpgid,
            Stage::DeathSignal,
            Stage::Chdir,
            Stage::ListenFds,
            Stage::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }

    /// What the child was doing, for "unable to …".
    pub fn doing(self) -> &'static str {
        match self {
            Stage::Setpgid => "create its process group",
            Stage::DeathSignal => "set its parent-death signal",
            Stage::Chdir => "change directory",
            Stage::ListenFds => "pass the listening sockets",
            Stage::Exec => "execute",
        }
    }
}

/// Report the stage and errno through the error pipe (5 bytes: stage,
/// then errno in native byte order) and `_exit(code)`.
///
/// # Safety
///
/// Only in a child between fork and exec: it ends the process.
unsafe fn fail(pipe: RawFd, stage: Stage, code: i32) -> ! {
    // SAFETY: errno location, write and _exit are async-signal-safe; the
    // buffer lives on this stack frame.
    unsafe {
        let errno = (*libc::__errno_location()).to_ne_bytes();
        let msg = [stage as u8, errno[0], errno[1], errno[2], errno[3]];
        libc::write(pipe, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

/// Whether `path` names a directory (`stat(2)`; child side: no
/// allocation, async-signal-safe).
///
/// # Safety
///
/// Only the child calls it, between fork and exec.
unsafe fn is_dir(path: &CStr) -> bool {
    // SAFETY: stat is async-signal-safe; `st` lives on this stack frame
    // and `path` is NUL-terminated.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::stat(path.as_ptr(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// Write `pid` in decimal followed by NUL at `at`. Child side only: no
/// allocation, no formatting machinery.
///
/// # Safety
///
/// `at` must point to 21 writable bytes (20 digits and the NUL).
unsafe fn write_pid(at: *mut u8, pid: i32) {
    let mut digits = [0u8; 20];
    let mut n = pid as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller guarantees 21 writable bytes at `at`.
        unsafe { *at.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above, `len` <= 20.
    unsafe { *at.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid_slot_digits() {
        let mut slot = *b"LISTEN_PID=xxxxxxxxxxxxxxxxxxxxx";
        // SAFETY: the slot has 21 bytes after the prefix.
        unsafe { super::write_pid(slot.as_mut_ptr().add(11), 40213) };
        assert_eq!(&slot[..17], b"LISTEN_PID=40213\0");
    }
}
