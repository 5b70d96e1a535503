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

/// `containerflip --help COMMAND` is `containerflip COMMAND --help`.
#[test]
fn help_names_a_command() {
    for cmd in COMMANDS {
        assert_eq!(help(&["--help", cmd]), help(&[cmd, "--help"]), "{cmd}");
    }
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

// ---------------------------------------------------------------------------
// Per command: each command's `--help`, its subsection of the man page's
// OPTIONS section and its arm of each completion offer the same options,
// short ones included.

/// The OPTIONS subsections that apply to a command (`None`: the program
/// alone, `containerflip --help`).
fn man_subsections(cmd: Option<&str>) -> Vec<&'static str> {
    match cmd {
        None => vec!["every command", "containerflip alone"],
        Some("rollback" | "stop") => vec!["rollback, stop", "every command"],
        Some("run") => vec!["run", "every command"],
        Some("deploy") => vec!["deploy", "every command"],
        Some("status") => vec!["status", "every command"],
        Some(other) => panic!("no such command {other}"),
    }
}

/// `-x` single-letter options in a text: a dash after a boundary, one
/// letter, then no other word character.
fn short_options(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    for i in 0..b.len().saturating_sub(1) {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        let after = b.get(i + 2).copied();
        if b[i] == b'-'
            && boundary
            && b[i + 1].is_ascii_alphabetic()
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            out.insert(text[i..i + 2].to_string());
        }
    }
    out
}

fn options_in(text: &str) -> BTreeSet<String> {
    let mut out = long_options(text);
    out.extend(short_options(text));
    out
}

/// The options `containerflip [CMD] --help` lists: the option column of
/// the lines of its `Options:` block.
fn help_options(cmd: Option<&str>) -> BTreeSet<String> {
    let text = match cmd {
        Some(c) => help(&[c, "--help"]),
        None => help(&["--help"]),
    };
    let block = text
        .split_once("\nOptions:\n")
        .unwrap_or_else(|| panic!("no Options: in {cmd:?} --help:\n{text}"))
        .1;
    let mut out = BTreeSet::new();
    for line in block.lines() {
        let item = line.trim_start();
        if !line.starts_with(' ') || !item.starts_with('-') {
            continue; // continuation lines are indented more and start with text
        }
        let column = item.split("  ").next().unwrap();
        out.extend(options_in(column));
    }
    assert!(!out.is_empty(), "no options parsed from {cmd:?} --help");
    out
}

/// `.SS` name -> the options of the `.TP` items under it in OPTIONS.
fn man_options_by_subsection() -> Vec<(String, BTreeSet<String>)> {
    let man = man_source();
    let start = man.find("\n.SH OPTIONS").expect("OPTIONS section");
    let end = man[start + 1..]
        .find("\n.SH ")
        .map_or(man.len(), |e| start + 1 + e);
    let lines: Vec<&str> = man[start..end].lines().collect();
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix(".SS ") {
            out.push((name.trim().trim_matches('"').to_string(), BTreeSet::new()));
        } else if *line == ".TP"
            && let Some(head) = lines.get(i + 1)
        {
            let (name, opts) = out
                .last_mut()
                .unwrap_or_else(|| panic!("OPTIONS item before any .SS: {head}"));
            let found = options_in(head);
            assert!(!found.is_empty(), "no option in {name}'s item {head:?}");
            opts.extend(found);
        }
    }
    out
}

fn man_options_for(cmd: Option<&str>) -> BTreeSet<String> {
    let sections = man_options_by_subsection();
    let mut out = BTreeSet::new();
    for want in man_subsections(cmd) {
        let (_, opts) = sections
            .iter()
            .find(|(name, _)| name == want)
            .unwrap_or_else(|| panic!("no .SS {want} in OPTIONS: {sections:?}"));
        out.extend(opts.iter().cloned());
    }
    out
}

/// Both directions: `expected` (from --help) against `have`.
fn assert_same(what: &str, expected: &BTreeSet<String>, have: &BTreeSet<String>) {
    let missing: Vec<_> = expected.difference(have).collect();
    let stale: Vec<_> = have.difference(expected).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "{what}: lacks {missing:?} that --help lists; offers {stale:?} that --help does not"
    );
}

fn commands() -> Vec<Option<&'static str>> {
    std::iter::once(None)
        .chain(COMMANDS.iter().copied().map(Some))
        .collect()
}

#[test]
fn each_command_help_matches_its_man_subsection() {
    // The parser itself: a few options it must see.
    let run = help_options(Some("run"));
    for o in [
        "-l",
        "--listen",
        "-C",
        "--chdir",
        "-q",
        "-v",
        "-h",
        "--env-file",
    ] {
        assert!(run.contains(o), "{o} not parsed from run --help: {run:?}");
    }
    let top = help_options(None);
    for o in ["-h", "--help", "-V", "--version"] {
        assert!(top.contains(o), "{o} not parsed from --help: {top:?}");
    }
    // Every subsection is one the mapping knows.
    let known: BTreeSet<&str> = commands().into_iter().flat_map(man_subsections).collect();
    for (name, _) in man_options_by_subsection() {
        assert!(
            known.contains(name.as_str()),
            "OPTIONS has a .SS {name} this test does not map to a command"
        );
    }
    for cmd in commands() {
        assert_same(
            &format!(
                "man page OPTIONS for {}",
                cmd.unwrap_or("containerflip alone")
            ),
            &help_options(cmd),
            &man_options_for(cmd),
        );
    }
}

/// The drift check fails when an option is on one side only, either way:
/// the lists above, each with one option the other lacks.
#[test]
fn the_drift_check_fails_on_an_option_on_one_side_only() {
    let help = help_options(Some("run"));
    let man = man_options_for(Some("run"));
    assert_same("unchanged", &help, &man);
    let with = |set: &BTreeSet<String>| {
        let mut set = set.clone();
        set.insert("--frobnicate".to_string());
        set
    };
    for (help, man) in [(with(&help), man.clone()), (help.clone(), with(&man))] {
        let drift = std::panic::catch_unwind(|| assert_same("run", &help, &man));
        let why = drift.expect_err("an option on one side only passed the drift check");
        let why = why.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(why.contains("\"--frobnicate\""), "{why}");
    }
}

/// `man -l` renders the page (what a packager and a user will run).
#[test]
fn man_renders_the_page() {
    let out = match Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(root().join("man/containerflip.1"))
        .env("MANWIDTH", "80")
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            return crate::common::notice("SKIPPED man_renders_the_page: man is not installed");
        }
    };
    assert!(out.status.success(), "man -l failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for section in ["NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "SEE ALSO"] {
        assert!(text.contains(section), "man -l shows no {section}:\n{text}");
    }
}

fn completion(file: &str) -> String {
    std::fs::read_to_string(root().join("contrib/completions").join(file)).expect("completion file")
}

/// The bash `case $cmd in` arms: `ARM) opts="..."`. bash offers long
/// options only.
fn bash_options(cmd: Option<&str>) -> BTreeSet<String> {
    let text = completion("containerflip.bash");
    let block = text
        .split_once("case $cmd in")
        .expect("case $cmd in")
        .1
        .split_once("esac")
        .expect("esac")
        .0;
    let mut found = None;
    for line in block.lines() {
        let Some((arm, rest)) = line.trim().split_once(')') else {
            continue;
        };
        let matches = match cmd {
            None => arm == "*",
            Some(c) => arm.split('|').any(|a| a == c),
        };
        if matches {
            assert!(found.is_none(), "two bash arms for {cmd:?}");
            let opts = rest.split('"').nth(1).expect("opts=\"...\"");
            found = Some(options_in(opts));
        }
    }
    found.unwrap_or_else(|| panic!("no bash arm for {cmd:?}"))
}

/// fish: `complete` lines whose condition applies to the command (or, for
/// the program alone, `not __fish_seen_subcommand_from $commands`).
fn fish_options(cmd: Option<&str>) -> BTreeSet<String> {
    let text = completion("containerflip.fish");
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("complete ")) {
        let Some(cond) = line.split("-n \"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let applies = match (cmd, cond.strip_prefix("not ")) {
            (None, Some(_)) => true,
            (None, None) | (Some(_), Some(_)) => false,
            (Some(c), None) => {
                let from = cond
                    .strip_prefix("__fish_seen_subcommand_from ")
                    .unwrap_or_else(|| panic!("unexpected fish condition {cond:?}"));
                from.split_whitespace().any(|w| w == c || w == "$commands")
            }
        };
        if !applies {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(2) {
            match w[0] {
                "-l" => out.insert(format!("--{}", w[1])),
                "-s" => out.insert(format!("-{}", w[1])),
                _ => false,
            };
        }
    }
    out
}

/// zsh: the `case $words[2] in` arms (`$control` is the --control spec),
/// and the `CURRENT == 2` block for the program alone.
fn zsh_options(cmd: Option<&str>) -> BTreeSet<String> {
    let text = completion("_containerflip");
    let block = match cmd {
        None => text
            .split_once("if (( CURRENT == 2 )); then")
            .expect("the CURRENT == 2 block")
            .1
            .split_once("fi")
            .expect("fi")
            .0
            .lines()
            .filter(|l| l.contains("_arguments"))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(c) => {
            let arms = text
                .split_once("case $words[2] in")
                .expect("case $words[2] in")
                .1
                .split_once("esac")
                .expect("esac")
                .0;
            let mut found = None;
            for arm in arms.split(";;") {
                let arm = arm.trim_start();
                let Some((pattern, body)) = arm.split_once(')') else {
                    continue;
                };
                if pattern.split('|').any(|p| p.trim() == c) {
                    assert!(found.is_none(), "two zsh arms for {c}");
                    found = Some(body.replace("\"$control\"", "'--control[control socket]'"));
                }
            }
            found.unwrap_or_else(|| panic!("no zsh arm for {c}"))
        }
    };
    options_in(&block)
}

#[test]
fn each_command_completions_offer_its_options() {
    for cmd in commands() {
        let name = cmd.unwrap_or("containerflip alone");
        let help = help_options(cmd);
        let longs: BTreeSet<String> = help
            .iter()
            .filter(|o| o.starts_with("--"))
            .cloned()
            .collect();
        assert_same(&format!("bash, {name}"), &longs, &bash_options(cmd));
        assert_same(&format!("fish, {name}"), &help, &fish_options(cmd));
        assert_same(&format!("zsh, {name}"), &help, &zsh_options(cmd));
    }
}

/// Runs `shell ARGS`; `None` (with a visible notice) when the shell is
/// not installed (.ci/run installs zsh and fish).
fn shell(shell: &str, args: &[&str]) -> Option<String> {
    match Command::new(shell).args(args).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{shell} {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(e) => {
            crate::common::skipped("completions_work_in_their_shells", &format!("{shell}: {e}"));
            None
        }
    }
}

/// The completion files parse in their shells, and bash and fish, asked
/// to complete `containerflip CMD --`, offer exactly the long options of
/// `CMD --help` (and the commands after `containerflip`).
#[test]
fn completions_work_in_their_shells() {
    let dir = root().join("contrib/completions");
    let file = |f: &str| dir.join(f).to_str().unwrap().to_string();
    shell("zsh", &["-n", &file("_containerflip")]);
    shell("fish", &["--no-execute", &file("containerflip.fish")]);
    let bash = file("containerflip.bash");
    shell("bash", &["-n", &bash]).expect("bash is needed");
    let fish = file("containerflip.fish");
    let have_fish = Command::new("fish").arg("--version").output().is_ok();
    for cmd in commands() {
        let name = cmd.unwrap_or("containerflip alone");
        let line = match cmd {
            Some(c) => format!("containerflip {c} --"),
            None => "containerflip --".to_string(),
        };
        let longs: BTreeSet<String> = help_options(cmd)
            .into_iter()
            .filter(|o| o.starts_with("--"))
            .collect();
        let script = format!(
            "source {bash}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _containerflip; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let offered: BTreeSet<String> = shell("bash", &["-c", &script])
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_same(&format!("bash completing `{line}`"), &longs, &offered);
        if have_fish {
            let script = format!("source {fish}; complete -C '{line}'");
            let offered: BTreeSet<String> = shell("fish", &["-c", &script])
                .unwrap()
                .lines()
                .map(|l| l.split('\t').next().unwrap().to_string())
                .collect();
            assert_same(
                &format!("fish completing `{line}`, {name}"),
                &longs,
                &offered,
            );
        }
    }
    // After the program name alone: the commands.
    let script = format!(
        "source {bash}; COMP_WORDS=(containerflip ''); COMP_CWORD=1; _containerflip; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let offered = shell("bash", &["-c", &script]).unwrap();
    for c in commands().into_iter().flatten() {
        assert!(
            offered.lines().any(|l| l == c),
            "bash does not offer {c}: {offered}"
        );
    }
}

/// `option -> "[default: X]"` of `containerflip CMD --help` (entries
/// joined across their continuation lines).
fn help_defaults(cmd: &str) -> Vec<(String, String)> {
    let text = help(&[cmd, "--help"]);
    let block = text.split_once("\nOptions:\n").unwrap().1;
    let block = block.split("\n\n").next().unwrap();
    let mut entries: Vec<String> = Vec::new();
    for line in block.lines() {
        if line.trim_start().starts_with('-') {
            entries.push(line.to_string());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    entries
        .iter()
        .filter_map(|e| {
            let value = e.split_once("[default: ")?.1.split_once(']')?.0;
            let opt = long_options(e.split("  ").find(|c| !c.trim().is_empty())?)
                .into_iter()
                .next()?;
            Some((opt, value.to_string()))
        })
        .collect()
}

/// The OPTIONS items of the rendered man page under `.SS sub`: the
/// heading line and the body as one line of words.
fn rendered_items(sub: &str) -> Vec<(String, String)> {
    let out = Command::new("groff")
        .args([
            "-man",
            "-Tascii",
            "-P-c",
            "-P-b",
            "-P-u",
            "-P-o",
            "-rLL=300n",
        ])
        .arg(root().join("man/containerflip.1"))
        .output()
        .expect("groff renders the man page");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = text.split_once("\nOPTIONS\n").expect("OPTIONS").1;
    let mut items = Vec::new();
    let mut in_sub = false;
    for line in section.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            break; // the next .SH
        }
        if line.starts_with("   ") && !line.starts_with("    ") {
            in_sub = line.trim() == sub;
            continue;
        }
        if !in_sub {
            continue;
        }
        if line.starts_with("       -") {
            items.push((line.trim().to_string(), String::new()));
        } else if let Some((_, body)) = items.last_mut() {
            body.push(' ');
            body.push_str(line.trim());
        }
    }
    items
        .into_iter()
        .map(|(h, b)| (h, b.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// Every `[default: X]` of `run --help` is the default the man page gives
/// (`Default X` or `(X, the default)`), and every default the man page
/// states that way is in --help.
#[test]
fn run_defaults_agree_between_help_and_man_page() {
    let help = help_defaults("run");
    assert!(help.len() >= 6, "defaults parsed from run --help: {help:?}");
    let man = rendered_items("run");
    assert!(man.len() >= 10, "items rendered under run: {man:?}");
    let says = |body: &str, v: &str| {
        body.contains(&format!("Default {v}")) || body.contains(&format!("({v}, the default)"))
    };
    for (opt, value) in &help {
        if value.starts_with("see ") {
            continue;
        }
        let (head, body) = man
            .iter()
            .find(|(h, _)| long_options(h).contains(opt))
            .unwrap_or_else(|| panic!("{opt} is not an item of the man page's run options"));
        assert!(
            says(body, value),
            "--help says {opt} defaults to {value}; the man page's {head:?} says: {body}"
        );
    }
    for (head, body) in &man {
        let stated = body.split_once("Default ").map(|(_, r)| r).or_else(|| {
            body.split_once(", the default)")
                .map(|(l, _)| l.rsplit('(').next().unwrap())
        });
        let Some(stated) = stated else { continue };
        if stated.starts_with(':') {
            continue; // "Default: none." is not a [default: ...] in --help
        }
        let value = stated
            .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
            .next()
            .unwrap()
            .trim_end_matches('.');
        assert!(
            help.iter()
                .any(|(o, v)| v == value && long_options(head).contains(o)),
            "the man page's {head:?} says the default is {value:?}; run --help does not: {help:?}"
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
    // Commands the control protocol cannot carry (4096 words, 256 KiB).
    let words: Vec<&str> = ["deploy", "--", "true"]
        .into_iter()
        .chain(std::iter::repeat_n("x", 4096))
        .collect();
    let half = "x".repeat(100 * 1024);
    let bytes = ["deploy", "--", "true", &half, &half];
    // (arguments, what the one line must name)
    for (args, names) in [
        (&words[..], "the command has 4097 words"),
        (&bytes[..], "the command is too long"),
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
        (
            &["run", "--listen", "127.0.0.1:0", "--control", "--", "true"],
            "--control: missing value",
        ),
        (&["run", "-C", "--", "true"], "--chdir: missing value"),
        (
            &["deploy", "--timeout", "5", "s", "--", "true"],
            "unexpected argument 's' before '--'",
        ),
        (
            &["run", "-l", "fd:3", "-l", "fd:03", "--", "true"],
            "--listen 'fd:03': that descriptor is already given",
        ),
        (&["--version", "extra"], "extra"),
        (&["--help", "bogus"], "--help: unknown command 'bogus'"),
        (&["--help", "run", "x"], "unexpected argument 'x'"),
        // Shown as typed, escaped once (lexopt's own text would quote it
        // with {:?} and escape it twice).
        (&["status", "a\nb"], "status: unexpected argument 'a\\nb'"),
        // The pointer names the command's own --help.
        (&["status", "extra"], "(see 'containerflip status --help')"),
        // Words from the command line are escaped: still one line, and
        // no escape sequence reaches the terminal.
        (&["run", "--li\nsten", "--", "true"], "'--li\\nsten'"),
        (
            &["run", "--on-crash", "\x1b[31m", "--", "true"],
            "got '\\u{1b}[31m'",
        ),
    ] {
        let out = Command::new(bin()).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains('\x1b'), "{args:?}: {err}");
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
