//! What a command prints for `--help` and what a failed invocation prints before it exits
//! (reference section 0.4): cobra's usage block, pflag's option list, `Error for command "x": ...`
//! (exit 1) and sylog's `FATAL:` (exit 255).

use std::io::Write;

use super::flags::{Flag, Kind};
use super::{ok, Cmd, Done, Fail, Res};
use crate::sylog;
use crate::sys;

const RUN_LINE: &str = "Run 'apptainer --help' for more detailed usage information.\n";

/// cobra's UsageString with apptainer's UseTemplate.
fn usage_string(cmd: &Cmd) -> String {
    let mut out = format!("Usage:\n  {}", cmd.usage);
    if !cmd.subs.is_empty() {
        out.push_str(" <command>\n\nAvailable Commands:");
        for sub in cmd.subs {
            out.push_str(&format!("\n  {:<11} {}", sub.name, sub.short));
        }
    }
    out.push('\n');
    out
}

/// pflag's FlagUsages: sorted by name, usage texts aligned.
fn flag_usages(cmd: &Cmd) -> String {
    let mut flags: Vec<&Flag> = cmd.all_flags().collect();
    flags.sort_by_key(|f| f.long);
    let lines: Vec<(String, &Flag)> = flags
        .into_iter()
        .map(|f| {
            let mut line = match f.short {
                Some(s) => format!("  -{s}, --{}", f.long),
                None => format!("      --{}", f.long),
            };
            match f.kind {
                Kind::Bool => {}
                Kind::Str => line.push_str(" string"),
                Kind::Int => line.push_str(" int"),
                Kind::List => line.push_str(" strings"),
                Kind::Map => line.push_str(" stringToString"),
            }
            (line, f)
        })
        .collect();
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (line, flag) in lines {
        let default = if flag.long == "timeout" {
            " (default 10)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{line}{}   {}{default}\n",
            " ".repeat(width - line.len()),
            flag.usage
        ));
    }
    out
}

/// `--help`: the help text on stdout, exit 0.
pub fn help(cmd: &'static Cmd) -> Res {
    let text = format!(
        "{}\n\n{}\nOptions:\n{}\n",
        cmd.short,
        usage_string(cmd),
        flag_usages(cmd)
    );
    sys::stdout(&text);
    ok()
}

/// Prints what a failure prints and returns how the invocation ends.
pub fn finish(result: Res) -> Done {
    let fail = match result {
        Ok(done) => return done,
        Err(fail) => fail,
    };
    let text = match fail {
        Fail::Fatal(msg) => {
            sylog::fatal(&msg);
            return Done::Code(255);
        }
        Fail::Command(cmd, msg) => format!(
            "Error for command \"{}\": {msg}\n\n{}\n{RUN_LINE}",
            cmd.name,
            usage_string(cmd)
        ),
        Fail::Flag(cmd, msg) => format!(
            "Error for command \"{}\": {msg}\n\nOptions for {} command:\n\n{}\n{RUN_LINE}",
            cmd.name,
            cmd.name,
            flag_usages(cmd)
        ),
        Fail::Usage(cmd, prefix) => {
            let prefix = prefix
                .map(|p| format!("Error: {p}\n\n"))
                .unwrap_or_default();
            format!("{prefix}{}\n{RUN_LINE}", usage_string(cmd))
        }
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
    Done::Code(1)
}
