//! `fake-apptainer`: a test double of the real `apptainer` command line.
//!
//! The integration tests put this binary where the orchestrator expects
//! `apptainer`. It follows the facts of `shared/reference/apptainer-cli.md`
//! (Apptainer 1.4.5) for the subset an orchestrator drives, with the priorities of
//! that file's section 10:
//!
//! * **Conventions** (section 0): log messages only on stderr with the exact
//!   `FATAL:   ` / `WARNING: ` / `INFO:    ` prefixes (debug layout under `-d`);
//!   exit 0 on success, 255 for every FATAL, 1 for cobra-level errors (unknown
//!   option or subcommand, wrong argument count, errors returned by a command),
//!   printed as `Error for command "x": ...` followed by the usage block; global
//!   options (`-q`, `-s`, `-d`, `-v`, `--nocolor`, `-c`) only before the
//!   subcommand; `--version` and `version`.
//! * **`build`** (section 1): definition files parsed like apptainer's parser
//!   (header keys, `Bootstrap:` first, multi-stage, section names), the
//!   target-exists rules, a sandbox tree with `.singularity.d/` metadata or a
//!   fake SIF file, built aside and renamed into place at the end, with a
//!   temporary bundle in `$APPTAINER_TMPDIR` and a helper process meanwhile.
//! * **`instance start|run|stop|list|stats`** (sections 2-4): a real, detached
//!   monitor process named `Apptainer instance: USER [NAME]` with an `appinit`
//!   child, the state file and logs under `$APPTAINER_CONFIGDIR` (default
//!   `~/.apptainer`) in the real layout, byte-exact `instance list --json`, glob
//!   matching of names, silent pruning of dead entries, stop signals and timeouts.
//! * **`exec`** and **`inspect`** (section 5).
//!
//! Nothing runs inside a container: there is none. `exec` runs its command on the
//! host (except `test -d/-e/-f` on a sandbox, answered from the sandbox tree), and
//! no `%post`, `%setup`, `%test` or `%startscript` is ever executed.
//!
//! # Test controls
//!
//! Read on every invocation (see `controls.rs`):
//! * `FAKE_APPTAINER_LOG=/path`: one JSON line per invocation at its start
//!   (`{"pid","argv","start_ms","event":"begin"}`) and one at its end
//!   (`{"pid","argv","start_ms","end_ms","exit"}`, plus `"signal"` when the command
//!   run by `exec` died by one).
//! * `FAKE_APPTAINER_FAIL=sub,...`, `FAKE_APPTAINER_DELAY_MS=sub=ms,...`,
//!   `FAKE_APPTAINER_HANG=sub,...`, `FAKE_APPTAINER_HANG_AFTER=sub,...`,
//!   `FAKE_APPTAINER_GARBAGE_LIST=1`, with `sub` one
//!   of `build`, `instance-start`, `instance-stop`, `instance-list`, `exec`.
//! * `FAKE_APPTAINER_CONTROL=/path`: `KEY=VALUE` lines (`FAIL=build`, ...) that
//!   override the variables above while the file exists.

// The map, in layers, top first. `main` logs the invocation (`invocation`), hands the
// arguments to `cmd::run` and prints how it ended (`cli::finish`).
//
// * `cmd/`: one file per subcommand (`build`, `exec`, `inspect`, `instance` with
//   `instance_start|stop|list|stats`, `version`, `buildcfg`) and the root dispatch;
// * what the subcommands build on: `action` (options and binds of `exec` and
//   `instance start`), `definition` (definition files) and `assemble` (producing an
//   image) with `bundle` (the build's temporary bundle and helper), `image` (image
//   metadata, opening images), `instance_state` (state files), `network` (addresses),
//   `monitor` (the hidden monitor and appinit processes of an instance), `controls`
//   (the test controls);
// * `cli/`: what every command shares: outcomes (`Done`, `Fail`), option tables (`flags`),
//   the pflag-like parser (`parse`), cobra-style help and errors (`usage`);
// * foundations: `invocation` (the `FAKE_APPTAINER_LOG` lines), `glob`, `json`, `sylog`
//   (log messages), `ident` (user, host and state directories), `sys` (paths, processes,
//   signals).
//
// A module imports (`crate::x`) only from its own layer or one below, with no cycle; the test
// in `layout_test.rs` holds the layers and checks that (`cargo test -p
// apptainer-orchestrator-tests --bin fake-apptainer`).

#[path = "fake_apptainer/cmd/mod.rs"]
mod cmd;

#[path = "fake_apptainer/action.rs"]
mod action;
#[path = "fake_apptainer/assemble.rs"]
mod assemble;
#[path = "fake_apptainer/bundle.rs"]
mod bundle;
#[path = "fake_apptainer/controls.rs"]
mod controls;
#[path = "fake_apptainer/definition.rs"]
mod definition;
#[path = "fake_apptainer/image.rs"]
mod image;
#[path = "fake_apptainer/instance_state.rs"]
mod instance_state;
#[path = "fake_apptainer/monitor.rs"]
mod monitor;
#[path = "fake_apptainer/network.rs"]
mod network;

#[path = "fake_apptainer/cli/mod.rs"]
mod cli;

#[path = "fake_apptainer/glob.rs"]
mod glob;
#[path = "fake_apptainer/ident.rs"]
mod ident;
#[path = "fake_apptainer/invocation.rs"]
mod invocation;
#[path = "fake_apptainer/json.rs"]
mod json;
#[path = "fake_apptainer/sylog.rs"]
mod sylog;
#[path = "fake_apptainer/sys.rs"]
mod sys;

#[cfg(test)]
#[path = "fake_apptainer/layout_test.rs"]
mod layout_test;

fn main() {
    // The monitor and appinit of a running instance are this binary too.
    if let Some(code) = monitor::hidden_mode().or_else(bundle::helper_mode) {
        std::process::exit(code);
    }
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let invocation = invocation::Invocation::begin(&argv);
    match cli::finish(cmd::run(&argv)) {
        cli::Done::Code(code) => {
            invocation.end(code, None);
            std::process::exit(code);
        }
        cli::Done::Signal(sig) => {
            invocation.end(128 + sig, Some(sig));
            sys::reraise(sig);
        }
    }
}
