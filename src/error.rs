//! One error type for everything that can stop the supervisor before its
//! event loop runs: what we were doing, on what, and the OS error.
//! `Display` reads "unable to bind 0.0.0.0:8080: Address in use".

use std::fmt;
use std::io;

#[derive(Debug)]
pub struct Error {
    /// What we were doing, e.g. "bind 0.0.0.0:8080".
    doing: String,
    cause: Cause,
}

#[derive(Debug)]
enum Cause {
    Os(io::Error),
    Msg(String),
}

impl Error {
    /// An OS error that happened while `doing`.
    pub fn os(doing: impl Into<String>, err: impl Into<io::Error>) -> Error {
        Error {
            doing: doing.into(),
            cause: Cause::Os(err.into()),
        }
    }

    /// A failure with a reason of our own.
    pub fn msg(doing: impl Into<String>, why: impl Into<String>) -> Error {
        Error {
            doing: doing.into(),
            cause: Cause::Msg(why.into()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths and values in `doing` may come from the command line or
        // the environment: escaped, they cannot break the one line.
        let doing = crate::log::printable(&self.doing);
        match &self.cause {
            Cause::Os(e) => write!(f, "unable to {doing}: {}", os_message(e)),
            Cause::Msg(m) => write!(f, "unable to {doing}: {}", crate::log::printable(m)),
        }
    }
}

/// An errno or OS error as operators read it: [`os_message`].
pub fn os_text(e: impl Into<io::Error>) -> String {
    os_message(&e.into())
}

/// The OS error text without std's " (os error 98)" suffix.
pub fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub type Result<T> = std::result::Result<T, Error>;
