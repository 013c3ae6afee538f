//! The subcommands, one file each, and the root command that dispatches to them. Each file
//! declares its command (`Cmd`, usage line and option table), parses its arguments with `cli`
//! and does the work with the shared pieces (`instance_state`, `image`, ...):
//!
//! * `build.rs`: `build TARGET SPEC` (reference 1);
//! * `instance.rs`: the `instance` group, dispatching to `instance_start.rs` (`start` and
//!   `run`, reference 2), `instance_stop.rs` (3), `instance_list.rs` (4), `instance_stats.rs`;
//! * `exec.rs` (5.3), `inspect.rs` (5.2), `version.rs`, `buildcfg.rs`.

mod build;
mod buildcfg;
mod exec;
mod inspect;
mod instance;
mod instance_list;
mod instance_start;
mod instance_stats;
mod instance_stop;
mod version;

use crate::cli::{b, bs, help, ok, parse, vs, Cmd, Fail, Flag, Kind, Parsed, Res, VERSION};
use crate::sylog;
use crate::sys;

pub static ROOT: Cmd = Cmd {
    name: "apptainer",
    usage: "apptainer [global options...]",
    short: "Linux container platform optimized for High Performance Computing (HPC) and Enterprise Performance Computing (EPC)",
    flags: &[ROOT_FLAGS],
    interspersed: false,
    subs: &[
        &build::BUILD,
        &exec::EXEC,
        &inspect::INSPECT,
        &instance::INSTANCE,
        &version::VERSION_CMD,
    ],
};

static ROOT_FLAGS: &[Flag] = &[
    bs(
        "debug",
        'd',
        "print debugging information (highest verbosity)",
    ),
    b("nocolor", "print without color output (default False)"),
    bs("silent", 's', "only print errors"),
    bs("quiet", 'q', "suppress normal output"),
    bs("verbose", 'v', "print additional information"),
    vs(
        "config",
        'c',
        Kind::Str,
        "specify a configuration file (for root or unprivileged installation only)",
    ),
    b(
        "build-config",
        "use configuration needed for building containers",
    ),
    b("version", "version for apptainer"),
];

/// Runs one invocation (everything after argv[0]).
pub fn run(argv: &[String]) -> Res {
    let parsed = parse(&ROOT, argv)?;
    set_message_level(&parsed);
    if parsed.help {
        return help(&ROOT);
    }
    if parsed.bool("version") {
        sys::stdout(&format!("apptainer version {VERSION}\n"));
        return ok();
    }
    let Some(sub) = parsed.args.first() else {
        return Err(Fail::Usage(&ROOT, None));
    };
    let rest = &parsed.args[1..];
    match sub.as_str() {
        "build" => build::run(rest),
        "exec" => exec::run(rest),
        "inspect" => inspect::inspect(rest),
        "instance" => instance::run(rest),
        "version" => version::run(rest),
        "buildcfg" => buildcfg::buildcfg(rest),
        "help" => help(&ROOT),
        other => Err(Fail::Usage(
            &ROOT,
            Some(format!("unknown command \"{other}\" for \"apptainer\"")),
        )),
    }
}

/// Level from APPTAINER_MESSAGELEVEL/QUIET/SILENT/VERBOSE/DEBUG and the global options.
fn set_message_level(parsed: &Parsed) {
    let on = |flag: &str, env: &str| parsed.bool(flag) || sys::env_truthy(env);
    let level = if on("debug", "APPTAINER_DEBUG") {
        5
    } else if on("verbose", "APPTAINER_VERBOSE") {
        4
    } else if on("quiet", "APPTAINER_QUIET") {
        -1
    } else if on("silent", "APPTAINER_SILENT") {
        -3
    } else {
        sys::env_nonempty("APPTAINER_MESSAGELEVEL")
            .and_then(|l| l.parse().ok())
            .unwrap_or(1)
    };
    sylog::set_level(level);
    sylog::debug(&format!("Apptainer version: {VERSION}"));
}
