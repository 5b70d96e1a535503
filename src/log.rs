//! Operator log lines on stderr: one event per line, `containerflip: `
//! first, the generation and pid in every line about a generation. The
//! line shapes are listed in DESIGN.md; tests match on them. Also the
//! command output on stdout (`out`, whose write errors `out_error`
//! keeps), and text made safe for one line (`printable`, `shell_words`).

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(1);

/// 0 = quiet (warnings and errors), 1 = normal, 2 = verbose.
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    LEVEL.load(Ordering::Relaxed) >= level
}

/// Write one line. stderr is unbuffered; a single `write` per line keeps
/// lines whole when workers share the terminal.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut buf = Vec::with_capacity(128);
    let _ = buf.write_fmt(format_args!("containerflip: {args}\n"));
    let _ = std::io::stderr().write_all(&buf);
}

/// `s` with control characters (newline, escape, DEL, ...) written as
/// Rust escapes (`\n`, `\u{1b}`): text a worker chose cannot move the
/// cursor, recolour or hide parts of an operator's terminal. A backslash
/// is doubled, so that `\n` always means an escaped newline.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The OS error of the first write to stdout that failed (0: none).
static OUT_ERROR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Write `text` and a newline to stdout (the client commands' output).
/// A failed write is not worth a panic (with `panic = "abort"`, a
/// SIGABRT): it is remembered, and [`out_error`] turns it into an exit
/// status, so `status --json > file` on a full disk does not succeed.
pub fn out(text: &str) {
    let mut buf = Vec::with_capacity(text.len() + 1);
    buf.extend_from_slice(text.as_bytes());
    buf.push(b'\n');
    let mut stdout = std::io::stdout();
    if let Err(e) = stdout.write_all(&buf).and_then(|()| stdout.flush()) {
        let code = e.raw_os_error().unwrap_or(libc::EIO);
        let _ = OUT_ERROR.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Why writing to stdout failed, if it did.
pub fn out_error() -> Option<std::io::Error> {
    match OUT_ERROR.load(Ordering::Relaxed) {
        0 => None,
        code => Some(std::io::Error::from_raw_os_error(code)),
    }
}

/// A lifecycle event (hidden by `-q`).
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { if $crate::log::enabled(1) { $crate::log::line(format_args!($($t)*)) } };
}

/// Detail shown with `-v`.
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { if $crate::log::enabled(2) { $crate::log::line(format_args!($($t)*)) } };
}

/// Something went wrong but we carry on (always shown).
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::line(format_args!($($t)*)) };
}

/// Render argv for a log line, quoting words that need it.
pub fn shell_words(argv: &[std::ffi::OsString]) -> String {
    argv.iter()
        .map(|a| {
            let s = a.to_string_lossy();
            let plain = !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                s.into_owned()
            } else {
                format!("'{}'", crate::log::printable(&s).replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(shell_words(&["node".into(), "a b".into()]), "node 'a b'");
        assert_eq!(
            shell_words(&[
                "it's".into(),
                "a\nb".into(),
                "\x1b[31mred\x7f".into(),
                r"a\b".into()
            ]),
            r"'it'\''s' 'a\nb' '\u{1b}[31mred\u{7f}' 'a\\b'"
        );
    }

    /// C1 controls count too: U+009B is an 8-bit CSI to some terminals.
    #[test]
    fn printable_escapes_c1_controls() {
        assert_eq!(printable("a\u{9b}31mb\u{85}c"), r"a\u{9b}31mb\u{85}c");
        assert_eq!(printable("é ü 日本"), "é ü 日本");
    }
}
