//! The command-line machinery every subcommand shares (reference sections 0.3 and 0.4): how an
//! invocation ends (`Done`, `Fail`), the command type `Cmd`, options declared with `flags.rs`
//! and read by the pflag-like parser in `parse.rs`, and cobra-style help and errors in
//! `usage.rs`. It knows no subcommand: those are in `cmd/`, which builds on this.

mod flags;
mod parse;
mod usage;

use flags::HELP_FLAG;
pub use flags::{b, bs, v, vs, Flag, Kind};
pub use parse::{parse, parse_with, Arity, Parsed};
pub use usage::{finish, help};

pub const VERSION: &str = "1.4.5-fake";

/// How an invocation ended.
pub enum Done {
    Code(i32),
    /// The command run by `exec` was killed by this signal: re-raise it.
    Signal(i32),
}

/// Why an invocation failed.
pub enum Fail {
    /// `sylog.Fatalf`: `FATAL:   msg`, exit 255.
    Fatal(String),
    /// An error returned from a command's RunE: `Error for command "x": msg` + usage, exit 1.
    Command(&'static Cmd, String),
    /// An option parsing error: `Error for command "x": msg` + the option list, exit 1.
    Flag(&'static Cmd, String),
    /// A cmdline.CommandError: usage only (after `Error: <prefix>` when given), exit 1.
    Usage(&'static Cmd, Option<String>),
}

pub type Res = Result<Done, Fail>;

pub fn ok() -> Res {
    Ok(Done::Code(0))
}

pub struct Cmd {
    pub name: &'static str,
    /// The usage line: the parents' Use strings and this command's.
    pub usage: &'static str,
    pub short: &'static str,
    pub flags: &'static [&'static [Flag]],
    pub interspersed: bool,
    pub subs: &'static [&'static Cmd],
}

impl Cmd {
    fn all_flags(&self) -> impl Iterator<Item = &'static Flag> + '_ {
        self.flags
            .iter()
            .flat_map(|group| group.iter())
            .chain(std::iter::once(&HELP_FLAG))
    }
}
