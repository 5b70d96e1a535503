//! containerflip: blue/green deploys of a server on one host, with the
//! listening sockets held by a supervisor for its whole life.
//!
//! `main` is thin: block signals, parse the command line, run a command,
//! map the result to an exit status.

#![deny(unsafe_code)]

mod accept;
mod cli;
mod client;
mod control;
mod error;
mod generation;
mod listen;
mod log;
mod notify;
mod protocol;
mod reap;
mod run;
mod rundir;
mod signals;
mod spawn;
mod supervisor;
mod upstream;

#[allow(unsafe_code)]
mod sys;

use std::process::ExitCode;

use cli::Command;

fn main() -> ExitCode {
    sys::ensure_stdio();
    // Block signals before anything else: the supervisor reads them from a
    // signalfd, and none may be lost or act with its default before then.
    let original = match sys::set_signal_mask(&sys::SigSet::all_but_faults()) {
        Ok(m) => m,
        Err(e) => {
            log::line(format_args!(
                "fatal: unable to block signals: {}",
                error::os_message(&e)
            ));
            return ExitCode::from(1);
        }
    };
    let cmd = match cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(usage) => {
            log::line(format_args!("{usage}"));
            return ExitCode::from(2);
        }
    };
    if matches!(cmd, Command::Run(_)) {
        // Children must reach our waitpid; see `default_disposition`.
        let _ = sys::default_disposition(libc::SIGCHLD);
    } else {
        // Client commands keep the caller's signal behaviour (Ctrl-C) and
        // end quietly when their stdout closes (`status | head`).
        let _ = sys::set_signal_mask(&original);
        let _ = sys::default_disposition(libc::SIGPIPE);
    }
    let code = match cmd {
        Command::Help(text) => {
            log::out(text.trim_end_matches('\n'));
            0
        }
        Command::Version => {
            log::out(&format!("containerflip {}", cli::VERSION));
            0
        }
        Command::Run(cfg) => run::run(cfg),
        Command::Deploy {
            control,
            timeout,
            command,
        } => client::deploy(control, timeout, command),
        Command::Rollback { control } => client::rollback(control),
        Command::Status {
            control,
            json,
            check,
        } => client::status(control, json, check),
        Command::Stop { control } => client::stop(control),
    };
    // Output that could not be written (a full disk) is a failure, even of
    // a command that otherwise succeeded.
    let code = match log::out_error() {
        Some(e) => {
            log::line(format_args!(
                "unable to write to stdout: {}",
                error::os_message(&e)
            ));
            if code == 0 { 1 } else { code }
        }
        None => code,
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
