//! The control protocol (SPEC §6), version 1: line-oriented, every line
//! ending in `\n`, argv carried byte-exact.
//!
//! ```text
//! request:  containerflip/1 VERB [PARAM]     VERB: deploy rollback status stop
//!           arg HEX                          deploy only, one per argv word,
//!                                            hex of the raw bytes
//!           (empty line)                     end of request
//! replies:  progress TEXT                    as it happens
//!           data TEXT                        output (status)
//!           ok TEXT | error TEXT             last line; then the server closes
//! ```
//!
//! `status` takes `text`, `json`, `check` or `json-check` (the JSON
//! object, and the verdict of `check` as the last line). A request is at
//! most [`MAX_REQUEST`] bytes and [`MAX_ARGS`] words; a reply line at
//! most [`MAX_OUTPUT`] bytes.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The first word of every request.
pub const PROTOCOL: &str = "containerflip/1";
/// The largest request, blank line included.
pub const MAX_REQUEST: usize = 256 * 1024;
/// The most `arg` lines (argv words) in a deploy.
pub const MAX_ARGS: usize = 4096;
/// The most reply bytes queued for one client, and so the longest line.
pub const MAX_OUTPUT: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFormat {
    Text,
    Json,
    Check,
    /// The JSON object, then the verdict of `Check` as the last line.
    JsonCheck,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A new command, or `None` for the current one.
    Deploy(Option<Vec<OsString>>),
    Rollback,
    Status(StatusFormat),
    Stop,
}

/// Encode a request (client side).
pub fn encode_request(verb: &str, param: Option<&str>, args: Option<&[OsString]>) -> Vec<u8> {
    let mut out = format!("{PROTOCOL} {verb}").into_bytes();
    if let Some(p) = param {
        out.push(b' ');
        out.extend_from_slice(p.as_bytes());
    }
    out.push(b'\n');
    for a in args.unwrap_or_default() {
        out.extend_from_slice(b"arg ");
        for b in a.as_bytes() {
            out.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// Parse a complete request (everything before the empty line).
pub fn parse_request(text: &[u8]) -> std::result::Result<Request, String> {
    let mut lines = text.split(|&b| b == b'\n');
    let head = lines.next().unwrap_or_default();
    let head =
        std::str::from_utf8(head).map_err(|_| "the request line is not UTF-8".to_string())?;
    let mut words = head.split(' ');
    let proto = words.next().unwrap_or_default();
    check_protocol(proto.as_bytes())?;
    let verb = words.next().unwrap_or_default();
    let param = words.next();
    if words.next().is_some() {
        return Err("too many words in the request line".into());
    }
    let mut args = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some(hex) = line.strip_prefix(b"arg ") else {
            return Err("expected 'arg HEX' lines after the request line".into());
        };
        if args.len() == MAX_ARGS {
            return Err(format!("more than {MAX_ARGS} arguments"));
        }
        let word = unhex(hex).ok_or("an 'arg' line is not valid hex")?;
        // execve could not carry it: refused here, not a failed deploy.
        if word.contains(&0) {
            return Err(format!("argument {} contains a NUL byte", args.len() + 1));
        }
        args.push(OsString::from_vec(word));
    }
    let no_args = |r: Request| {
        if args.is_empty() {
            Ok(r)
        } else {
            Err(format!("'{verb}' takes no arguments"))
        }
    };
    match (verb, param) {
        ("deploy", None) => {
            if args.first().is_some_and(|a| a.is_empty()) {
                return Err("the command is empty".into());
            }
            Ok(Request::Deploy((!args.is_empty()).then_some(args)))
        }
        ("rollback", None) => no_args(Request::Rollback),
        ("stop", None) => no_args(Request::Stop),
        ("status", None | Some("text")) => no_args(Request::Status(StatusFormat::Text)),
        ("status", Some("json")) => no_args(Request::Status(StatusFormat::Json)),
        ("status", Some("check")) => no_args(Request::Status(StatusFormat::Check)),
        ("status", Some("json-check")) => no_args(Request::Status(StatusFormat::JsonCheck)),
        ("deploy" | "rollback" | "stop" | "status", Some(p)) => {
            Err(format!("'{verb}' does not take '{}'", shown_word(p)))
        }
        _ => Err(format!("unknown request '{}'", shown_word(verb))),
    }
}

/// A client's word in an error line: its first 20 characters, escaped.
fn shown_word(w: &str) -> String {
    crate::log::printable(&w.chars().take(20).collect::<String>())
}

fn check_protocol(proto: &[u8]) -> std::result::Result<(), String> {
    if proto == PROTOCOL.as_bytes() {
        return Ok(());
    }
    let shown: String = proto.escape_ascii().take(40).map(char::from).collect();
    Err(format!(
        "unsupported protocol '{shown}': this supervisor speaks {PROTOCOL}"
    ))
}

/// The request line alone, as soon as it is complete: a peer speaking
/// something else (HTTP, CRLF line ends) hears so at once rather than
/// after the request deadline.
pub fn check_request_line(input: &[u8]) -> std::result::Result<(), String> {
    let Some(end) = input.iter().position(|&b| b == b'\n') else {
        return Ok(());
    };
    let line = &input[..end];
    if std::str::from_utf8(line).is_err() {
        return Err("the request line is not UTF-8".into());
    }
    // The protocol word first, so that an HTTP request is named as such.
    let (line, crlf) = match line.strip_suffix(b"\r") {
        Some(l) => (l, true),
        None => (line, false),
    };
    check_protocol(line.split(|&b| b == b' ').next().unwrap_or_default())?;
    if crlf {
        return Err("lines end in LF, not CRLF".into());
    }
    Ok(())
}

fn unhex(hex: &[u8]) -> Option<Vec<u8>> {
    // from_str_radix alone would take a sign ("+f").
    if !hex.len().is_multiple_of(2) || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    hex.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// Index of the blank line that ends a request: "\n\n" (or a request
/// that starts with a blank line, which parses as an error).
pub fn find_end(input: &[u8]) -> Option<usize> {
    if input.first() == Some(&b'\n') {
        return Some(0);
    }
    input.windows(2).position(|w| w == b"\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_round_trips_byte_exact() {
        let argv: Vec<OsString> = vec![
            "printf".into(),
            "a b".into(),
            "\"q'".into(),
            "line\nbreak".into(),
            "".into(),
            OsString::from_vec(vec![0xff, 0xfe, b'x']),
        ];
        let req = encode_request("deploy", None, Some(&argv));
        let end = find_end(&req).unwrap();
        assert_eq!(parse_request(&req[..end]), Ok(Request::Deploy(Some(argv))));
    }

    #[test]
    fn bad_requests() {
        assert!(
            parse_request(b"containerflip/2 status")
                .unwrap_err()
                .contains("protocol")
        );
        assert!(
            parse_request(b"containerflip/1 frobnicate")
                .unwrap_err()
                .contains("unknown")
        );
        assert!(parse_request(b"\xff\xfe").is_err());
        assert!(parse_request(b"containerflip/1 deploy\narg zz").is_err());
        assert_eq!(
            parse_request(b"containerflip/1 deploy\narg 74727565\narg 6100"),
            Err("argument 2 contains a NUL byte".into())
        );
        assert_eq!(
            parse_request(b"containerflip/1 status json"),
            Ok(Request::Status(StatusFormat::Json))
        );
    }
}
