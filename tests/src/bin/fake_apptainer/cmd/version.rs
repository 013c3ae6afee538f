//! `version` (and the root's `--version` is in `cmd/mod.rs`): prints the version this fake
//! claims, `1.4.5-fake`.

use crate::cli::{self, Cmd, Res, VERSION};
use crate::sys;

pub static VERSION_CMD: Cmd = Cmd {
    name: "version",
    usage: "apptainer [global options...] version",
    short: "Show the version for Apptainer",
    flags: &[],
    interspersed: true,
    subs: &[],
};

/// `version`: the bare version on stdout.
pub fn run(args: &[String]) -> Res {
    let p = cli::parse(&VERSION_CMD, args)?;
    if p.help {
        return cli::help(&VERSION_CMD);
    }
    sys::stdout(&format!("{VERSION}\n"));
    cli::ok()
}
