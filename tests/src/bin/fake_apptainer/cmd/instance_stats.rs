//! `instance stats NAME`: the fake's instances have no cgroup, so it always ends with the
//! error apptainer gives when stats are unavailable.

use crate::cli::{self, b, bs, vs, Cmd, Fail, Flag, Kind, Res};
use crate::ident::Ident;
use crate::instance_state::find;

pub static INSTANCE_STATS: Cmd = Cmd {
    name: "stats",
    usage: "apptainer [global options...] instance stats [stats options...] <instance name>",
    short: "Get stats for a named instance",
    flags: &[INSTANCE_STATS_FLAGS],
    interspersed: true,
    subs: &[],
};

static INSTANCE_STATS_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, show stats for an instance of this user",
    ),
    bs("json", 'j', "output stats in json"),
    b(
        "no-stream",
        "disable streaming (live update) of instance stats",
    ),
];

/// A stub: the fake's instances have no cgroup, so stats are never available.
pub fn stats(args: &[String]) -> Res {
    let cmd = &INSTANCE_STATS;
    let p = match cli::parse_with(cmd, args, cli::Arity::Exactly(1)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let ident = Ident::load();
    let user = p.str("user").filter(|u| !u.is_empty());
    let found =
        find(&ident.state_dir_of(user.unwrap_or(&ident.user)), &p.args[0]).map_err(|_| {
            Fail::Command(
                cmd,
                "could not retrieve instance list: syntax error in pattern".to_string(),
            )
        })?;
    match found.len() {
        0 => Err(Fail::Command(cmd, "no instance found".to_string())),
        1 => Err(Fail::Command(
            cmd,
            "stats are only available if cgroups are enabled, see the Apptainer instance user guide for instructions"
                .to_string(),
        )),
        n => Err(Fail::Command(
            cmd,
            format!("query returned more than one instance ({n})"),
        )),
    }
}
