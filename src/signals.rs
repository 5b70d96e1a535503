//! Signals reach the supervisor through a `signalfd`: every signal but the
//! synchronous faults is blocked before anything else happens (see
//! `main`), so none is lost before the event loop runs and none interrupts
//! a system call. Reading drains the fd until EAGAIN; the kernel coalesces
//! repeats of a standard signal, which is what collapses a burst of SIGHUPs.

use std::io;
use std::os::fd::OwnedFd;

use crate::sys;

/// Signal names we print and accept, by number.
const NAMES: [(i32, &str); 31] = [
    (libc::SIGHUP, "HUP"),
    (libc::SIGINT, "INT"),
    (libc::SIGQUIT, "QUIT"),
    (libc::SIGILL, "ILL"),
    (libc::SIGTRAP, "TRAP"),
    (libc::SIGABRT, "ABRT"),
    (libc::SIGBUS, "BUS"),
    (libc::SIGFPE, "FPE"),
    (libc::SIGKILL, "KILL"),
    (libc::SIGUSR1, "USR1"),
    (libc::SIGSEGV, "SEGV"),
    (libc::SIGUSR2, "USR2"),
    (libc::SIGPIPE, "PIPE"),
    (libc::SIGALRM, "ALRM"),
    (libc::SIGTERM, "TERM"),
    (libc::SIGSTKFLT, "STKFLT"),
    (libc::SIGCHLD, "CHLD"),
    (libc::SIGCONT, "CONT"),
    (libc::SIGSTOP, "STOP"),
    (libc::SIGTSTP, "TSTP"),
    (libc::SIGTTIN, "TTIN"),
    (libc::SIGTTOU, "TTOU"),
    (libc::SIGURG, "URG"),
    (libc::SIGXCPU, "XCPU"),
    (libc::SIGXFSZ, "XFSZ"),
    (libc::SIGVTALRM, "VTALRM"),
    (libc::SIGPROF, "PROF"),
    (libc::SIGWINCH, "WINCH"),
    (libc::SIGIO, "IO"),
    (libc::SIGPWR, "PWR"),
    (libc::SIGSYS, "SYS"),
];

/// `SIGTERM` for 15, `SIGRTMIN+1` for 35, `SIG32` for a number without a
/// name.
pub fn name(sig: i32) -> String {
    match NAMES.iter().find(|(n, _)| *n == sig) {
        Some((_, s)) => format!("SIG{s}"),
        None if sig == libc::SIGRTMIN() => "SIGRTMIN".into(),
        None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) => {
            format!("SIGRTMIN+{}", sig - libc::SIGRTMIN())
        }
        None => format!("SIG{sig}"),
    }
}

/// Whether a process that does not handle `sig` is ended by it. The
/// others are ignored (CHLD, CONT, URG, WINCH) or stop the process (STOP,
/// TSTP, TTIN, TTOU) by default, so they cannot be a stop signal.
pub fn ends_by_default(sig: i32) -> bool {
    ![
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGURG,
        libc::SIGWINCH,
    ]
    .contains(&sig)
}

/// Parse `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(n) = NAMES.iter().find(|(_, s)| *s == bare).map(|(n, _)| *n) {
        return Some(n);
    }
    // RTMIN, RTMIN+N, RTMAX, RTMAX-N, as kill(1) writes them (glibc's
    // SIGRTMIN is 34: it keeps 32 and 33 for itself).
    let (base, rest) = if let Some(r) = bare.strip_prefix("RTMIN") {
        (libc::SIGRTMIN(), r)
    } else if let Some(r) = bare.strip_prefix("RTMAX") {
        (libc::SIGRTMAX(), r)
    } else {
        return None;
    };
    let offset = |r: &str, sign: char| {
        let digits = r.strip_prefix(sign)?;
        // parse() alone would take a second sign ("RTMIN++1").
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse::<i32>().ok())?
    };
    let n = match rest {
        "" => base,
        r if base == libc::SIGRTMIN() => base.checked_add(offset(r, '+')?)?,
        r => base.checked_sub(offset(r, '-')?)?,
    };
    (libc::SIGRTMIN()..=libc::SIGRTMAX())
        .contains(&n)
        .then_some(n)
}

/// The signalfd that reads the signals `main` blocked.
pub struct Signals {
    pub fd: OwnedFd,
}

impl Signals {
    /// Open the signalfd for every blocked signal.
    pub fn open() -> io::Result<Signals> {
        Ok(Signals {
            fd: sys::signalfd(&sys::SigSet::all_but_faults())?,
        })
    }

    /// Every pending signal, in arrival order, until EAGAIN.
    pub fn read(&self) -> Vec<i32> {
        // struct signalfd_siginfo is 128 bytes; ssi_signo is its first u32.
        const SIZE: usize = 128;
        let mut out = Vec::new();
        let mut buf = [0u8; SIZE * 16];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) if n >= SIZE => {
                    for info in buf[..n].chunks_exact(SIZE) {
                        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                        out.push(signo as i32);
                    }
                }
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break, // EAGAIN: drained
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_round_trip() {
        assert_eq!(super::parse("TERM"), Some(15));
        assert_eq!(super::parse("sigquit"), Some(3));
        assert_eq!(super::parse("9"), Some(9));
        assert_eq!(super::parse("0"), None);
        // Numbers cover the real-time signals too, up to 64.
        assert_eq!(super::parse("34"), Some(34));
        assert_eq!(super::parse("64"), Some(64));
        assert_eq!(super::parse("65"), None);
        assert_eq!(super::parse("-15"), None);
        assert_eq!(super::parse("BOGUS"), None);
        assert_eq!(super::name(15), "SIGTERM");
        assert_eq!(super::name(32), "SIG32");
        assert_eq!(super::name(libc::SIGRTMIN() + 1), "SIGRTMIN+1");
        let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
        assert_eq!(super::parse("SIGRTMIN"), Some(min));
        assert_eq!(super::parse("rtmin+1"), Some(min + 1));
        assert_eq!(super::parse("RTMAX-2"), Some(max - 2));
        assert_eq!(super::parse("RTMAX"), Some(max));
        assert_eq!(super::parse("RTMIN+99"), None);
        assert_eq!(super::parse("RTMIN+2147483647"), None);
        assert_eq!(super::parse("RTMAX-2147483647"), None);
        assert_eq!(super::parse("RTMIN-1"), None);
        assert_eq!(super::parse("RTMAX+1"), None);
        assert_eq!(super::parse("RTMIN++1"), None);
        assert_eq!(super::parse("RTMAX-+1"), None);
    }
}
