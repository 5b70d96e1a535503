//! Docs never drift from the CLI: every long option `--help` prints is in
//! the man page and in the shell completions, every option the man page's
//! OPTIONS section documents exists in `--help`, and the man page renders
//! without warnings.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const COMMANDS: [&str; 5] = ["run", "deploy", "rollback", "status", "stop"];

fn bin() -> &'static str {
    crate::common::bin()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `--long-option` words in a text (roff's `\-\-` already unescaped).
fn long_options(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        let starts = b[i] == b'-' && b[i + 1] == b'-' && b[i + 2].is_ascii_lowercase();
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        if starts && boundary {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_lowercase() || b[j] == b'-') {
                j += 1;
            }
            out.insert(text[i..j].trim_end_matches('-').to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn help(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run --help");
    assert!(out.status.success(), "{args:?} exited {}", out.status);
    assert!(out.stderr.is_empty(), "--help wrote to stderr");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

fn all_help_options() -> BTreeSet<String> {
    let mut opts = long_options(&help(&["--help"]));
    for c in COMMANDS {
        opts.extend(long_options(&help(&[c, "--help"])));
    }
    opts
}

fn man_source() -> String {
    std::fs::read_to_string(root().join("man/containerflip.1"))
        .expect("man page")
        .replace("\\-", "-")
}

/// Options documented as items of the OPTIONS section (`.TP` headers).
fn man_options_section() -> BTreeSet<String> {
    let man = man_source();
    let start = man.find("\n.SH OPTIONS").expect("OPTIONS section");
    let end = man[start + 1..]
        .find("\n.SH ")
        .map_or(man.len(), |e| start + 1 + e);
    let lines: Vec<&str> = man[start..end].lines().collect();
    let mut out = BTreeSet::new();
    for w in lines.windows(2) {
        if w[0] == ".TP" {
            out.extend(long_options(w[1]));
        }
    }
    out
}

#[test]
fn every_help_option_is_in_the_man_page() {
    let man = long_options(&man_source());
    let missing: Vec<_> = all_help_options()
        .into_iter()
        .filter(|o| !man.contains(o))
        .collect();
    assert!(
        missing.is_empty(),
        "in --help but not in man/containerflip.1: {missing:?}"
    );
}

#[test]
fn every_man_option_exists_in_help() {
    let help = all_help_options();
    let documented = man_options_section();
    assert!(
        documented.contains("--listen") && documented.contains("--json"),
        "parsed {documented:?}"
    );
    let stale: Vec<_> = documented
        .into_iter()
        .filter(|o| !help.contains(o))
        .collect();
    assert!(
        stale.is_empty(),
        "in the man page's OPTIONS but not in --help: {stale:?}"
    );
}

#[test]
fn every_help_option_is_in_each_completion() {
    let help = all_help_options();
    for file in ["containerflip.bash", "_containerflip", "containerflip.fish"] {
        let text = std::fs::read_to_string(root().join("contrib/completions").join(file))
            .expect("completion file");
        // fish writes `complete … -l listen`; normalise to `--listen`.
        let text: String = text
            .lines()
            .map(|l| if l.starts_with("complete ") { l.replace(" -l ", " --") } else { l.to_string() } + "\n")
            .collect();
        let have = long_options(&text);
        let missing: Vec<_> = help.iter().filter(|o| !have.contains(*o)).collect();
        assert!(missing.is_empty(), "{file} lacks {missing:?}");
        let stale: Vec<_> = have.iter().filter(|o| !help.contains(*o)).collect();
        assert!(
            stale.is_empty(),
            "{file} offers options --help does not know: {stale:?}"
        );
    }
}

#[test]
fn man_page_renders_without_warnings() {
    let out = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .arg(root().join("man/containerflip.1"))
        .output()
        .expect("groff is needed to lint the man page (apt-get install groff)");
    assert!(
        out.status.success(),
        "groff failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "groff warnings:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn version_is_the_crate_version() {
    let v = help(&["--version"]);
    assert_eq!(
        v.trim(),
        format!("containerflip {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    // (arguments, what the one line must name)
    for (args, names) in [
        (&["run", "--frobnicate", "--", "true"][..], "--frobnicate"),
        (
            &["run", "--ready-timeout", "soon", "--", "true"],
            "--ready-timeout",
        ),
        (
            &["run", "--listen", "localhost:80", "--", "true"],
            "--listen",
        ),
        (
            &["run", "--stop-signal", "NOPE", "--", "true"],
            "--stop-signal",
        ),
        (
            &["run", "--notify-mode=carrier-pigeon", "--", "true"],
            "--notify-mode",
        ),
        (&["run", "--listen", "127.0.0.1:0"], "command"),
        (&["status", "--jsn"], "--jsn"),
        (&["frobnicate"], "frobnicate"),
        (&["deploy", "--timeout"], "--timeout"),
    ] {
        let out = Command::new(bin()).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("--help"),
            "{args:?}: no pointer to --help: {err}"
        );
        assert!(
            err.contains(names),
            "{args:?}: does not name {names}: {err}"
        );
    }
}
