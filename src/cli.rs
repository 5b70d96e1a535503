//! Command-line parsing: one lexopt `match` loop per command into a plain
//! config struct, the `--help` texts, and usage errors (exit 2). Nothing
//! here touches the system beyond reading arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

use crate::listen;
use crate::protocol;
use crate::signals;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub const HELP: &str = "\
containerflip - zero-downtime deploys of a server on one host

Usage:
  containerflip run [OPTIONS] -- COMMAND [ARG...]
  containerflip deploy [--control PATH] [--timeout DUR] [-- COMMAND [ARG...]]
  containerflip rollback [--control PATH]
  containerflip status [--control PATH] [--json] [--check]
  containerflip stop [--control PATH]
  containerflip --help [COMMAND] | --version

The supervisor (run) binds the listening sockets once and hands them to
each worker generation as fd 3 and up (LISTEN_FDS). A deploy (SIGHUP or
'containerflip deploy') starts a new generation on the same sockets and
retires the old one once the new one says READY=1; a new generation that
fails to become ready is stopped and the old one keeps serving.

Options:
  -h, --help      print this help (or a command's: --help COMMAND)
  -V, --version   print the version

Run 'containerflip COMMAND --help' for a command's options.
See containerflip(1) for the full manual.
";

pub const RUN_HELP: &str = "\
Usage: containerflip run [OPTIONS] -- COMMAND [ARG...]

Own the listening sockets and supervise generations of COMMAND.

Options:
  -l, --listen [NAME=]ADDR   socket to own (repeatable): PORT, :PORT,
                             IPV4:PORT, [IPV6]:PORT, unix:PATH or fd:N
      --backlog N            listen(2) backlog [default: 4096]
      --notify-mode MODE     NOTIFY_SOCKET type: dgram or stream [default: dgram]
      --ready-timeout DUR    stop a generation not ready by then; 0 = wait
                             forever [default: 60s]
      --drain-timeout DUR    SIGKILL a draining generation after [default: 30s]
      --stop-signal SIG      signal that asks a generation to drain [default: TERM]
      --on-crash ACTION      restart or exit when the active generation
                             dies on its own [default: restart]
      --control PATH         control socket [default: see containerflip(1)]
      --pidfile PATH         write the supervisor's pid here
  -C, --chdir DIR            working directory of workers
      --env-file PATH        KEY=VALUE lines added to each new worker's
                             environment, read at every spawn
  -q, --quiet                log only warnings and errors
  -v, --verbose              log more
  -h, --help                 print this help

DUR is a number with a unit: ms, s, m or h (a bare number is seconds).
SIG is a signal name (TERM, SIGQUIT, RTMIN+1) or number.
";

pub const DEPLOY_HELP: &str = "\
Usage: containerflip deploy [--control PATH] [--timeout DUR] [-- COMMAND [ARG...]]

Start a new generation (with COMMAND if given, else the current command),
print its progress and exit 0 once it serves, 1 if it failed closed,
3 if no supervisor answers.

Options:
      --control PATH   control socket [default: see containerflip(1)]
      --timeout DUR    stop waiting after DUR (the deploy goes on); 0 = forever
  -h, --help           print this help
";

pub const ROLLBACK_HELP: &str = "\
Usage: containerflip rollback [--control PATH]

Deploy the command that was current before the last command change.
Exit 0 once it serves, 1 if it failed or there is none, 3 if no
supervisor answers.

Options:
      --control PATH   control socket [default: see containerflip(1)]
  -h, --help           print this help
";

pub const STATUS_HELP: &str = "\
Usage: containerflip status [--control PATH] [--json] [--check]

Show listeners, generations, counters and the last failure.

Options:
      --control PATH   control socket [default: see containerflip(1)]
      --json           print one JSON object
      --check          print one line; exit 0 if a ready generation serves
                       and every listener listens, else 1 (3 if no
                       supervisor answers); with --json, print the JSON
                       object instead of the line
  -h, --help           print this help
";

pub const STOP_HELP: &str = "\
Usage: containerflip stop [--control PATH]

Stop the supervisor gracefully, wait until it has exited and print its
exit status. Exit 0 once it is gone, 3 if no supervisor answers.

Options:
      --control PATH   control socket [default: see containerflip(1)]
  -h, --help           print this help
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    Dgram,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCrash {
    Restart,
    Exit,
}

#[derive(Debug)]
pub struct RunConfig {
    pub listen: Vec<listen::Spec>,
    pub backlog: i32,
    pub notify_mode: NotifyMode,
    /// `None`: wait forever.
    pub ready_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub stop_signal: i32,
    pub on_crash: OnCrash,
    pub control: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    pub chdir: Option<PathBuf>,
    pub env_file: Option<PathBuf>,
    pub verbosity: u8,
    pub command: Vec<OsString>,
}

#[derive(Debug)]
pub enum Command {
    Run(RunConfig),
    Deploy {
        control: Option<PathBuf>,
        timeout: Option<Duration>,
        command: Option<Vec<OsString>>,
    },
    Rollback {
        control: Option<PathBuf>,
    },
    Status {
        control: Option<PathBuf>,
        json: bool,
        check: bool,
    },
    Stop {
        control: Option<PathBuf>,
    },
    Help(&'static str),
    Version,
}

/// A usage error: one line naming what was wrong, ending with where to
/// look (the command's own `--help` once the command is known). `main`
/// prints it and exits 2.
#[derive(Debug)]
pub struct Usage {
    what: String,
    command: Option<&'static str>,
}

impl Usage {
    pub fn new(what: impl Into<String>) -> Usage {
        Usage {
            what: what.into(),
            command: None,
        }
    }

    /// The error as one of `command`'s.
    pub fn of(mut self, command: &'static str) -> Usage {
        self.command.get_or_insert(command);
        self
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The words came from the command line: a newline or an escape
        // in them must not break the one line or reach the terminal.
        let what = crate::log::printable(&self.what);
        match self.command {
            Some(c) => write!(f, "{c}: {what} (see 'containerflip {c} --help')"),
            None => write!(f, "{what} (see 'containerflip --help')"),
        }
    }
}

impl From<lexopt::Error> for Usage {
    /// lexopt's own text quotes values with `{:?}`; ours are shown raw
    /// and escaped once, by `Display`.
    fn from(e: lexopt::Error) -> Usage {
        use lexopt::Error as E;
        Usage::new(match e {
            E::UnexpectedOption(o) => format!("invalid option '{o}'"),
            E::UnexpectedArgument(a) => format!("unexpected argument '{}'", a.to_string_lossy()),
            E::UnexpectedValue { option, value } => {
                format!("{option} takes no value, got '{}'", value.to_string_lossy())
            }
            E::MissingValue {
                option: Some(option),
            } => format!("{option}: missing value"),
            E::NonUnicodeValue(v) => format!("invalid UTF-8 in '{}'", v.to_string_lossy()),
            e => e.to_string(),
        })
    }
}

type Result<T> = std::result::Result<T, Usage>;

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut p = lexopt::Parser::from_iter(args.clone());
    match p.next()? {
        None => Err(Usage::new(
            "missing command: run, deploy, rollback, status or stop",
        )),
        Some(Short('h') | Long("help")) => help_on(p),
        Some(Short('V') | Long("version")) => alone(p, Command::Version),
        Some(Value(cmd)) => match cmd.to_str() {
            Some("run") => parse_run(p, &args).map_err(|e| e.of("run")),
            Some("deploy") => parse_deploy(p, &args).map_err(|e| e.of("deploy")),
            Some("rollback") => {
                parse_control_only(p, ROLLBACK_HELP, |control| Command::Rollback { control })
                    .map_err(|e| e.of("rollback"))
            }
            Some("stop") => parse_control_only(p, STOP_HELP, |control| Command::Stop { control })
                .map_err(|e| e.of("stop")),
            Some("status") => parse_status(p).map_err(|e| e.of("status")),
            _ => Err(Usage::new(format!(
                "unknown command '{}'",
                cmd.to_string_lossy()
            ))),
        },
        Some(arg) => Err(arg.unexpected().into()),
    }
}

/// `--help [COMMAND]`: the help of the command named, if any.
fn help_on(mut p: lexopt::Parser) -> Result<Command> {
    let text = match p.next()? {
        None => return Ok(Command::Help(HELP)),
        Some(Value(cmd)) => match cmd.to_str() {
            Some("run") => RUN_HELP,
            Some("deploy") => DEPLOY_HELP,
            Some("rollback") => ROLLBACK_HELP,
            Some("status") => STATUS_HELP,
            Some("stop") => STOP_HELP,
            _ => {
                return Err(Usage::new(format!(
                    "--help: unknown command '{}'",
                    cmd.to_string_lossy()
                )));
            }
        },
        Some(arg) => return Err(arg.unexpected().into()),
    };
    alone(p, Command::Help(text))
}

/// `--version`, and `--help COMMAND`, take nothing after them.
fn alone(mut p: lexopt::Parser, command: Command) -> Result<Command> {
    match p.next()? {
        None => Ok(command),
        Some(arg) => Err(arg.unexpected().into()),
    }
}

/// The worker command: `first` and every argument after it. `args` is the
/// whole command line, to tell whether `first` followed a `--`. A word
/// before `--` that is followed by a `--` is a mistake
/// (`--ready-timeout 5 s -- x`), never the start of the command.
fn worker_command(
    first: OsString,
    p: &mut lexopt::Parser,
    args: &[OsString],
) -> Result<Vec<OsString>> {
    let rest: Vec<OsString> = p.raw_args()?.collect();
    let at = args.len() - rest.len() - 1;
    let after_separator = at > 0 && args[at - 1] == "--";
    if !after_separator && rest.iter().any(|a| a == "--") {
        return Err(Usage::new(format!(
            "unexpected argument '{}' before '--' (options come first, then '--' and the worker command)",
            first.to_string_lossy()
        )));
    }
    let mut command = vec![first];
    command.extend(rest);
    Ok(command)
}

fn parse_run(mut p: lexopt::Parser, args: &[OsString]) -> Result<Command> {
    let mut c = RunConfig {
        listen: Vec::new(),
        backlog: 4096,
        notify_mode: NotifyMode::Dgram,
        ready_timeout: Some(Duration::from_secs(60)),
        drain_timeout: Duration::from_secs(30),
        stop_signal: libc::SIGTERM,
        on_crash: OnCrash::Restart,
        control: None,
        pidfile: None,
        chdir: None,
        env_file: None,
        verbosity: 1,
        command: Vec::new(),
    };
    while let Some(arg) = p.next()? {
        match arg {
            Short('l') | Long("listen") => {
                let v = string(&mut p, "--listen")?;
                let spec = listen::Spec::parse(&v)
                    .map_err(|e| Usage::new(format!("--listen '{v}': {e}")))?;
                if c.listen.iter().any(|l| l.addr.clashes(&spec.addr)) {
                    let what = match spec.addr {
                        listen::Addr::Unix(_) => "that socket path",
                        listen::Addr::Fd(_) => "that descriptor",
                        _ => "that address (or its port on all addresses)",
                    };
                    return Err(Usage::new(format!(
                        "--listen '{v}': {what} is already given"
                    )));
                }
                c.listen.push(spec);
            }
            Long("backlog") => {
                let v = string(&mut p, "--backlog")?;
                c.backlog = v.parse::<i32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Usage::new(format!("--backlog: expected a positive number, got '{v}'"))
                })?;
            }
            Long("notify-mode") => {
                c.notify_mode = match string(&mut p, "--notify-mode")?.as_str() {
                    "dgram" => NotifyMode::Dgram,
                    "stream" => NotifyMode::Stream,
                    v => {
                        return Err(Usage::new(format!(
                            "--notify-mode: expected dgram or stream, got '{v}'"
                        )));
                    }
                }
            }
            Long("ready-timeout") => {
                let d = duration(&mut p, "--ready-timeout")?;
                c.ready_timeout = (!d.is_zero()).then_some(d);
            }
            Long("drain-timeout") => {
                c.drain_timeout = duration(&mut p, "--drain-timeout")?;
                // Unlike --ready-timeout 0 (wait forever), a zero here would
                // SIGKILL every retiring generation at once: say so.
                if c.drain_timeout.is_zero() {
                    return Err(Usage::new(
                        "--drain-timeout: must be more than 0 (a drain needs time to finish requests)",
                    ));
                }
            }
            Long("stop-signal") => {
                let v = string(&mut p, "--stop-signal")?;
                c.stop_signal = signals::parse(&v).ok_or_else(|| {
                    Usage::new(format!(
                        "--stop-signal: expected a signal name or number, got '{v}'"
                    ))
                })?;
                if !signals::ends_by_default(c.stop_signal) {
                    return Err(Usage::new(format!(
                        "--stop-signal: {} does not end a process that leaves it unhandled \
                         (it is ignored or stops it by default)",
                        signals::name(c.stop_signal)
                    )));
                }
            }
            Long("on-crash") => {
                c.on_crash = match string(&mut p, "--on-crash")?.as_str() {
                    "restart" => OnCrash::Restart,
                    "exit" => OnCrash::Exit,
                    v => {
                        return Err(Usage::new(format!(
                            "--on-crash: expected restart or exit, got '{v}'"
                        )));
                    }
                }
            }
            Long("control") => c.control = Some(path(&mut p, "--control")?),
            Long("pidfile") => c.pidfile = Some(path(&mut p, "--pidfile")?),
            Short('C') | Long("chdir") => c.chdir = Some(path(&mut p, "--chdir")?),
            Long("env-file") => c.env_file = Some(path(&mut p, "--env-file")?),
            Short('q') | Long("quiet") => c.verbosity = 0,
            Short('v') | Long("verbose") => c.verbosity = 2,
            Short('h') | Long("help") => return Ok(Command::Help(RUN_HELP)),
            Value(first) => c.command = worker_command(first, &mut p, args)?,
            _ => return Err(arg.unexpected().into()),
        }
    }
    if c.command.is_empty() {
        return Err(Usage::new("missing the worker command after '--'"));
    }
    if c.command[0].is_empty() {
        return Err(Usage::new("the worker command is empty"));
    }
    Ok(Command::Run(c))
}

fn parse_deploy(mut p: lexopt::Parser, args: &[OsString]) -> Result<Command> {
    let mut control = None;
    let mut timeout = None;
    let mut command: Option<Vec<OsString>> = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("control") => control = Some(path(&mut p, "--control")?),
            Long("timeout") => {
                // 0 waits forever, as --ready-timeout 0 does.
                timeout = Some(duration(&mut p, "--timeout")?).filter(|d| !d.is_zero());
            }
            Short('h') | Long("help") => return Ok(Command::Help(DEPLOY_HELP)),
            Value(first) => command = Some(worker_command(first, &mut p, args)?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if let Some(c) = &command {
        if c[0].is_empty() {
            return Err(Usage::new("the worker command is empty"));
        }
        // What the supervisor would refuse, refused here as what it is.
        if c.len() > protocol::MAX_ARGS {
            return Err(Usage::new(format!(
                "the command has {} words; at most {} go over the control socket",
                c.len(),
                protocol::MAX_ARGS
            )));
        }
        let size = protocol::encode_request("deploy", None, Some(c)).len();
        if size > protocol::MAX_REQUEST {
            return Err(Usage::new(format!(
                "the command is too long ({size} bytes as a request; at most {} KiB go over the control socket)",
                protocol::MAX_REQUEST / 1024
            )));
        }
    }
    Ok(Command::Deploy {
        control,
        timeout,
        command,
    })
}

fn parse_status(mut p: lexopt::Parser) -> Result<Command> {
    let (mut control, mut json, mut check) = (None, false, false);
    while let Some(arg) = p.next()? {
        match arg {
            Long("control") => control = Some(path(&mut p, "--control")?),
            Long("json") => json = true,
            Long("check") => check = true,
            Short('h') | Long("help") => return Ok(Command::Help(STATUS_HELP)),
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Command::Status {
        control,
        json,
        check,
    })
}

/// Commands whose only option is `--control`.
fn parse_control_only(
    mut p: lexopt::Parser,
    help: &'static str,
    make: fn(Option<PathBuf>) -> Command,
) -> Result<Command> {
    let mut control = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("control") => control = Some(path(&mut p, "--control")?),
            Short('h') | Long("help") => return Ok(Command::Help(help)),
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(make(control))
}

/// An option's value. A `--` in its place means the value was left out
/// (`--control -- server`), never a value.
fn value(p: &mut lexopt::Parser, opt: &str) -> Result<OsString> {
    match p.value() {
        Ok(v) if v != "--" => Ok(v),
        _ => Err(Usage::new(format!("{opt}: missing value"))),
    }
}

fn string(p: &mut lexopt::Parser, opt: &str) -> Result<String> {
    let v = value(p, opt)?;
    v.into_string()
        .map_err(|v| Usage::new(format!("{opt}: invalid UTF-8 in '{}'", v.to_string_lossy())))
}

fn path(p: &mut lexopt::Parser, opt: &str) -> Result<PathBuf> {
    let v = value(p, opt)?;
    if v.is_empty() {
        return Err(Usage::new(format!(
            "{opt}: expected a path, got an empty string"
        )));
    }
    Ok(PathBuf::from(v))
}

fn duration(p: &mut lexopt::Parser, opt: &str) -> Result<Duration> {
    let v = string(p, opt)?;
    parse_duration(&v).ok_or_else(|| {
        Usage::new(format!(
            "{opt}: expected a duration like 500ms, 30s or 2m (at most 876000h), got '{v}'"
        ))
    })
}

/// The longest duration accepted anywhere (about 100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds, at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    // Deadlines are `Instant + Duration`, which panics on overflow: cap
    // every duration at MAX_DURATION (far beyond any sensible timeout).
    (ms <= MAX_DURATION.as_millis() as u64).then(|| Duration::from_millis(ms))
}

/// `412ms`, `3s`, `60s`, `600s`: exact, in seconds when whole, for log
/// lines and deploy failure reasons (`no READY=1 within 60s`, SPEC §5.3).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) && ms >= 1000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        std::iter::once("containerflip")
            .chain(s.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("bogus"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("99999999999h"), None);
        // The cap is inclusive: the longest duration the usage error
        // names is accepted, one more unit is not.
        assert_eq!(parse_duration("876000h"), Some(MAX_DURATION));
        assert_eq!(parse_duration("876001h"), None);
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration(""), None);
        assert_eq!(format_duration(Duration::from_millis(412)), "412ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(60)), "60s");
        assert_eq!(format_duration(Duration::from_secs(600)), "600s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn run_options() {
        let Command::Run(c) = parse(args(&[
            "run",
            "--listen=8080",
            "--ready-timeout",
            "0",
            "--stop-signal=SIGQUIT",
            "--",
            "node",
            "--inspect",
            "app.js",
        ]))
        .unwrap() else {
            panic!("not run")
        };
        assert_eq!(c.ready_timeout, None);
        assert_eq!(c.stop_signal, libc::SIGQUIT);
        assert_eq!(c.command, ["node", "--inspect", "app.js"]);
    }

    #[test]
    fn backlog_must_be_positive() {
        let backlog = |v: &str| parse(args(&["run", "--backlog", v, "--", "x"]));
        let Command::Run(c) = backlog("1").unwrap() else {
            panic!("not run")
        };
        assert_eq!(c.backlog, 1);
        for bad in ["0", "-1", "2147483648", "many"] {
            let e = backlog(bad).unwrap_err();
            assert!(e.to_string().contains("--backlog"), "{bad}: {e}");
        }
    }

    #[test]
    fn usage_errors_name_the_option() {
        let e = parse(args(&["run", "--ready-timeout", "bogus", "--", "x"])).unwrap_err();
        assert!(e.to_string().contains("--ready-timeout"), "{e}");
        let e = parse(args(&["run", "--frobnicate", "--", "x"])).unwrap_err();
        assert!(e.to_string().contains("--frobnicate"), "{e}");
        let e = parse(args(&["run", "--listen", "8080"])).unwrap_err();
        assert!(e.to_string().contains("command"), "{e}");
    }
}
