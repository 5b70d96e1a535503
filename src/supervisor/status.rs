//! What `containerflip status` shows: a table for people, one JSON object
//! for programs (encoded by hand: no serde at run time), and the one-line
//! verdict of `--check`.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt::Write;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::generation::State;
use crate::log::shell_words;
use crate::protocol::{MAX_OUTPUT, StatusFormat};

/// The largest body sent whole; a reply is queued at once and must stay
/// under the protocol's [`MAX_OUTPUT`] with its line prefixes and verdict.
const WHOLE: usize = MAX_OUTPUT / 2;

/// How much of each unbounded part a body shows. Commands (up to 256 KiB,
/// and six bytes of JSON per control byte), `STATUS=` texts, failure
/// reasons and the lists of generations, listeners and strays could
/// together pass [`MAX_OUTPUT`]; a status must always be answerable, so a
/// body over [`WHOLE`] is made again with [`Caps::SHORT`] (then
/// [`Caps::TINY`]), and says so.
struct Caps {
    /// Bytes of a command's leading words (at least its program is shown).
    command: usize,
    /// Characters of a free text (`STATUS=`, a failure reason, a name).
    text: usize,
    /// Entries of a list (the newest generations).
    items: usize,
}

impl Caps {
    const ALL: Caps = Caps {
        command: usize::MAX,
        text: usize::MAX,
        items: usize::MAX,
    };
    const SHORT: Caps = Caps {
        command: 16 * 1024,
        text: 256,
        items: 64,
    };
    /// The last resort, should even [`Caps::SHORT`] be over [`WHOLE`]
    /// (by the sums above it is not: about 450 KiB at most).
    const TINY: Caps = Caps {
        command: 256,
        text: 64,
        items: 8,
    };

    fn shortened(&self) -> bool {
        self.items != usize::MAX
    }

    /// The leading words of `argv` within `self.command` bytes, and
    /// whether any were left out.
    fn argv<'a>(&self, argv: &'a [OsString]) -> (&'a [OsString], bool) {
        let mut used = 0;
        let keep = argv
            .iter()
            .position(|a| {
                used += a.len() + 1;
                used > self.command
            })
            .map_or(argv.len(), |n| n.max(1));
        (&argv[..keep], keep < argv.len())
    }

    /// `text`, cut to `self.text` characters with an ellipsis.
    fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        cut(text, self.text)
    }

    /// The last `self.items` of `list`: the newest, for generations.
    fn newest<'a, T>(&self, list: &'a [T]) -> &'a [T] {
        &list[list.len().saturating_sub(self.items)..]
    }

    fn first<'a, T>(&self, list: &'a [T]) -> &'a [T] {
        &list[..list.len().min(self.items)]
    }
}

/// `text` cut to `chars` characters, with an ellipsis when it was longer.
fn cut(text: &str, chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]).into(),
        None => text.into(),
    }
}

/// The body of a status reply (`data` lines; none for `check`).
pub(super) fn render(s: &Supervisor, format: StatusFormat, now: Instant) -> Option<String> {
    let body = |caps: &Caps| match format {
        StatusFormat::Text => Some(text(s, now, caps)),
        StatusFormat::Json | StatusFormat::JsonCheck => Some(json(s, now, caps)),
        StatusFormat::Check => None,
    };
    // Text goes out as one `data ` line per line: count those prefixes.
    let size = |b: &String| b.len() + 5 * b.lines().count();
    let mut b = body(&Caps::ALL)?;
    for caps in [Caps::SHORT, Caps::TINY] {
        if size(&b) <= WHOLE {
            break;
        }
        b = body(&caps)?;
    }
    Some(b)
}

/// The verdict of `--check`, healthy or not, in one line: a ready
/// generation serves on listeners that all listen.
pub(super) fn verdict(s: &Supervisor) -> (bool, String) {
    if let Some(l) = s.listeners.iter().find(|l| !l.listening()) {
        let shown = crate::log::printable(&l.display);
        return (false, format!("listener {shown} is not listening"));
    }
    match s.active.filter(|_| s.serving()) {
        Some(n) => (true, format!("gen {n} is serving")),
        None => (false, "no ready generation is serving".into()),
    }
}

fn state(s: &Supervisor) -> &'static str {
    if s.stopping() {
        "stopping"
    } else if s.serving() {
        "serving"
    } else if s.deploying().is_some() {
        "starting"
    } else {
        "not serving"
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// A command as the table shows it: shell words, the tail elided.
fn shown_command(argv: &[OsString], caps: &Caps) -> String {
    let (kept, left_out) = caps.argv(argv);
    let shown = shell_words(kept);
    match cut(&shown, caps.command) {
        Cow::Borrowed(_) if left_out => format!("{shown} …"),
        Cow::Borrowed(_) => shown,
        Cow::Owned(cut) => cut,
    }
}

fn text(s: &Supervisor, now: Instant, caps: &Caps) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "supervisor pid {}, up {}, {}{}",
        std::process::id(),
        human(now - s.started),
        state(s),
        s.active
            .map(|n| format!(" (active gen {n})"))
            .unwrap_or_default()
    );
    let _ = writeln!(o, "command: {}", shown_command(&s.current_cmd, caps));
    if let Some(p) = &s.previous_cmd {
        let _ = writeln!(o, "previous command: {}", shown_command(p, caps));
    }
    let _ = writeln!(o, "listeners:");
    for (i, l) in caps.first(&s.listeners).iter().enumerate() {
        // The display holds a unix path, which may be anything.
        let display = crate::log::printable(&caps.text(&l.display));
        let dead = if l.listening() {
            ""
        } else {
            "  NOT LISTENING (shut down by a worker)"
        };
        let _ = writeln!(
            o,
            "  fd {:<3} {:<10} {display}{dead}",
            3 + i,
            caps.text(&l.name)
        );
    }
    let _ = writeln!(o, "generations:");
    let _ = writeln!(
        o,
        "  {:<5} {:<8} {:<9} {:<7} {:<9} STATUS",
        "GEN", "PID", "STATE", "AGE", "READY-IN"
    );
    for g in caps.newest(&s.gens) {
        let ready = g
            .ready_at
            .map(|r| format!("{}ms", ms(r - g.started)))
            .unwrap_or_else(|| "-".into());
        let mut st = g.state.name().to_string();
        // The active one, while it serves (a stop drains it too).
        if s.active == Some(g.n) && g.state == State::Ready {
            st = "active".into();
        }
        if g.exit.is_some() {
            st = "exited".into();
        }
        let _ = writeln!(
            o,
            "  {:<5} {:<8} {:<9} {:<7} {:<9} {}",
            g.n,
            g.pid,
            st,
            human(now - g.started),
            ready,
            crate::log::printable(&caps.text(g.status_text.as_deref().unwrap_or("")))
        );
    }
    if !s.known_strays.is_empty() {
        let pids: Vec<String> = caps
            .first(&s.known_strays)
            .iter()
            .map(i32::to_string)
            .collect();
        let _ = writeln!(
            o,
            "outside every generation (left their group): pid {}",
            pids.join(", ")
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        o,
        "deploys: {} ok, {} failed; crash restarts: {}",
        c.deploys_ok, c.deploys_failed, c.crash_restarts
    );
    if let Some(f) = &s.last_failure {
        let _ = writeln!(o, "last failure: {}", caps.text(f));
    }
    if caps.shortened() {
        let _ = writeln!(
            o,
            "(shortened to fit the reply bound of the control protocol)"
        );
    }
    o
}

/// A JSON string literal (RFC 8259 §7): quote, backslash and every
/// control character escaped.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".into(), |v| v.to_string())
}

fn json_argv(argv: &[OsString], caps: &Caps) -> String {
    let (kept, _) = caps.argv(argv);
    let words: Vec<String> = kept
        .iter()
        .map(|a| json_str(&cut(&a.to_string_lossy(), caps.command)))
        .collect();
    format!("[{}]", words.join(","))
}

fn json(s: &Supervisor, now: Instant, caps: &Caps) -> String {
    let text = |t: &str| json_str(&caps.text(t));
    let listeners: Vec<String> = caps
        .first(&s.listeners)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "{{\"fd\":{},\"name\":{},\"address\":{},\"listening\":{}}}",
                3 + i,
                text(&l.name),
                text(&l.display),
                l.listening()
            )
        })
        .collect();
    let gens: Vec<String> = caps
        .newest(&s.gens)
        .iter()
        .map(|g| {
            format!(
                "{{\"gen\":{},\"pid\":{},\"state\":{},\"active\":{},\"age_ms\":{},\"ready_ms\":{},\"status\":{},\"exit_code\":{}}}",
                g.n,
                g.pid,
                json_str(if g.exit.is_some() { "exited" } else { g.state.name() }),
                s.active == Some(g.n),
                ms(now - g.started),
                json_opt(g.ready_at.map(|r| ms(r - g.started))),
                g.status_text.as_deref().map_or_else(|| "null".into(), text),
                json_opt(g.exit.map(|e| e.code())),
            )
        })
        .collect();
    let c = &s.counters;
    format!(
        "{{\"pid\":{},\"version\":{},\"uptime_ms\":{},\"state\":{},\"serving\":{},\"active\":{},\"deploying\":{},\"command\":{},\"previous_command\":{},\"listeners\":[{}],\"generations\":[{}],\"strays\":[{}],\"counters\":{{\"deploys_ok\":{},\"deploys_failed\":{},\"crash_restarts\":{}}},\"last_failure\":{},\"truncated\":{}}}",
        std::process::id(),
        json_str(crate::cli::VERSION),
        ms(now - s.started),
        json_str(state(s)),
        s.serving(),
        json_opt(s.active),
        json_opt(s.deploying()),
        json_argv(&s.current_cmd, caps),
        s.previous_cmd
            .as_deref()
            .map_or_else(|| "null".into(), |p| json_argv(p, caps)),
        listeners.join(","),
        gens.join(","),
        caps.first(&s.known_strays)
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        c.deploys_ok,
        c.deploys_failed,
        c.crash_restarts,
        s.last_failure
            .as_deref()
            .map_or_else(|| "null".into(), text),
        caps.shortened(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaping() {
        assert_eq!(
            super::json_str("a\"b\\c\n\u{1}"),
            "\"a\\\"b\\\\c\\n\\u0001\""
        );
        // Every control character comes out escaped, never raw.
        for c in (0..0x20u8).chain([0x7f]).map(char::from) {
            let out = super::json_str(&c.to_string());
            let want = match c {
                '\n' => "\"\\n\"".to_string(),
                '\r' => "\"\\r\"".to_string(),
                '\t' => "\"\\t\"".to_string(),
                c => format!("\"\\u{:04x}\"", c as u32),
            };
            assert_eq!(out, want, "U+{:04X}", c as u32);
        }
    }
}
