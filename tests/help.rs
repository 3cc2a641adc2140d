//! `mechc --help` lists one short line per command (the long text stays on `mechc CMD --help`),
//! as cargo's and ruff's help do.

mod common;

/// The lines of the `Commands:` section of a help text.
fn command_lines(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| l.trim() != "Commands:").skip(1);
    lines.by_ref().take_while(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

fn help_of(args: &[&str]) -> String {
    let o = common::mechc().args(args).arg("--help").output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn top_level_help_is_one_short_line_per_command() {
    for args in [&[][..], &["eval"][..], &["cache"][..]] {
        let help = help_of(args);
        let lines = command_lines(&help);
        assert!(lines.len() >= 2, "no Commands section in `mechc {} --help`:\n{help}", args.join(" "));
        for l in &lines {
            // A continuation line (wrapped text) would start with spaces past the name column.
            let name = l.split_whitespace().next().unwrap_or("");
            assert!(l.starts_with("  ") && !name.is_empty() && !l.starts_with("   "), "not one line per command: {l:?}\n{help}");
            assert!(l.chars().count() <= 100, "{} chars: {l}", l.chars().count());
        }
    }
    // The commands a newcomer needs are all there, cache included.
    let top = command_lines(&help_of(&[])).join("\n");
    for c in ["import", "inspect", "generate", "trace", "locate", "diff", "compile", "passes", "eval", "tokenize", "bench", "cache"] {
        assert!(top.lines().any(|l| l.split_whitespace().next() == Some(c)), "{c} missing:\n{top}");
    }
    // The long text is still there on the subcommand.
    let diff = help_of(&["diff"]);
    assert!(diff.contains("Works across shape changes"), "{diff}");
    let bench = help_of(&["bench"]);
    assert!(bench.contains("median of --runs"), "{bench}");
}
