//! `instance`: the command group; dispatches `start`, `run`, `stop`, `list` and `stats` to
//! their files and answers anything else with cobra's `invalid command`.

use super::instance_list::INSTANCE_LIST;
use super::instance_start::{INSTANCE_RUN, INSTANCE_START};
use super::instance_stats::INSTANCE_STATS;
use super::instance_stop::INSTANCE_STOP;
use super::{instance_list, instance_start, instance_stats, instance_stop};
use crate::cli::{help, parse, Cmd, Fail, Res};

pub static INSTANCE: Cmd = Cmd {
    name: "instance",
    usage: "apptainer [global options...] instance",
    short: "Manage containers running as services",
    flags: &[],
    interspersed: false,
    subs: &[
        &INSTANCE_LIST,
        &INSTANCE_RUN,
        &INSTANCE_START,
        &INSTANCE_STATS,
        &INSTANCE_STOP,
    ],
};

pub fn run(args: &[String]) -> Res {
    let sub = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or(&[]);
    match sub {
        Some("start") => instance_start::start(rest, false),
        Some("run") => instance_start::start(rest, true),
        Some("stop") => instance_stop::stop(rest),
        Some("list") => instance_list::list(rest),
        Some("stats") => instance_stats::stats(rest),
        _ => {
            let parsed = parse(&INSTANCE, args)?;
            if parsed.help {
                return help(&INSTANCE);
            }
            Err(Fail::Command(&INSTANCE, "invalid command".to_string()))
        }
    }
}
