//! What `containerflip status` shows: a table for people, one JSON object
//! for programs (encoded by hand: no serde at run time), and the one-line
//! verdict of `--check`.

use std::fmt::Write;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::generation::State;
use crate::log::shell_words;
use crate::protocol::StatusFormat;

/// The body of a status reply (`data` lines; none for `check`).
pub(super) fn render(s: &Supervisor, format: StatusFormat, now: Instant) -> Option<String> {
    match format {
        StatusFormat::Text => Some(text(s, now)),
        StatusFormat::Json | StatusFormat::JsonCheck => Some(json(s, now)),
        StatusFormat::Check => None,
    }
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

fn text(s: &Supervisor, now: Instant) -> String {
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
    let _ = writeln!(o, "command: {}", shell_words(&s.current_cmd));
    if let Some(p) = &s.previous_cmd {
        let _ = writeln!(o, "previous command: {}", shell_words(p));
    }
    let _ = writeln!(o, "listeners:");
    for (i, l) in s.listeners.iter().enumerate() {
        // The display holds a unix path, which may be anything.
        let display = crate::log::printable(&l.display);
        let dead = if l.listening() {
            ""
        } else {
            "  NOT LISTENING (shut down by a worker)"
        };
        let _ = writeln!(o, "  fd {:<3} {:<10} {display}{dead}", 3 + i, l.name);
    }
    let _ = writeln!(o, "generations:");
    let _ = writeln!(
        o,
        "  {:<5} {:<8} {:<9} {:<7} {:<9} STATUS",
        "GEN", "PID", "STATE", "AGE", "READY-IN"
    );
    for g in &s.gens {
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
            crate::log::printable(g.status_text.as_deref().unwrap_or(""))
        );
    }
    if !s.known_strays.is_empty() {
        let pids: Vec<String> = s.known_strays.iter().map(i32::to_string).collect();
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
        let _ = writeln!(o, "last failure: {f}");
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

fn json_argv(argv: &[std::ffi::OsString]) -> String {
    let words: Vec<String> = argv
        .iter()
        .map(|a| json_str(&a.to_string_lossy()))
        .collect();
    format!("[{}]", words.join(","))
}

fn json(s: &Supervisor, now: Instant) -> String {
    let listeners: Vec<String> = s
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "{{\"fd\":{},\"name\":{},\"address\":{},\"listening\":{}}}",
                3 + i,
                json_str(&l.name),
                json_str(&l.display),
                l.listening()
            )
        })
        .collect();
    let gens: Vec<String> = s
        .gens
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
                g.status_text.as_deref().map_or_else(|| "null".into(), json_str),
                json_opt(g.exit.map(|e| e.code())),
            )
        })
        .collect();
    let c = &s.counters;
    format!(
        "{{\"pid\":{},\"version\":{},\"uptime_ms\":{},\"state\":{},\"serving\":{},\"active\":{},\"deploying\":{},\"command\":{},\"previous_command\":{},\"listeners\":[{}],\"generations\":[{}],\"strays\":[{}],\"counters\":{{\"deploys_ok\":{},\"deploys_failed\":{},\"crash_restarts\":{}}},\"last_failure\":{}}}",
        std::process::id(),
        json_str(crate::cli::VERSION),
        ms(now - s.started),
        json_str(state(s)),
        s.serving(),
        json_opt(s.active),
        json_opt(s.deploying()),
        json_argv(&s.current_cmd),
        s.previous_cmd
            .as_deref()
            .map_or_else(|| "null".into(), json_argv),
        listeners.join(","),
        gens.join(","),
        s.known_strays
            .iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        c.deploys_ok,
        c.deploys_failed,
        c.crash_restarts,
        s.last_failure
            .as_deref()
            .map_or_else(|| "null".into(), json_str),
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
