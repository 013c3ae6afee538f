//! `exec [options] IMAGE|instance://NAME COMMAND [ARGS...]` (reference 5.3).
//!
//! `test -d|-e|-f|-s|-L|-h PATH` (optionally after `!`) against a sandbox image is
//! answered from the sandbox's own tree. Any other command runs on the host with
//! the caller's standard streams, in the caller's process group, and its exit
//! status is passed through (a death by signal is re-raised). When `setpriv` is
//! available the command gets a parent-death signal, so it does not outlive a
//! killed `exec`. `--env`, `APPTAINERENV_*`, `--cleanenv`/`--containall` and
//! `--cwd`/`--pwd` (mapped through the binds onto the host) are honoured.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::action::{self, Bind, ACTION_FLAGS};
use crate::cli::{self, b, bs, v, Cmd, Done, Fail, Flag, Kind, Parsed, Res};
use crate::controls::Controls;
use crate::ident::Ident;
use crate::image;
use crate::instance_state;
use crate::sys;

pub static EXEC: Cmd = Cmd {
    name: "exec",
    usage: "apptainer [global options...] exec [exec options...] <container> <command>",
    short: "Run a command within a container",
    flags: &[ACTION_FLAGS, EXEC_FLAGS],
    interspersed: false,
    subs: &[],
};

static EXEC_FLAGS: &[Flag] = &[
    bs("pid", 'p', "run container in a new PID namespace"),
    b("no-pid", "do not run container in a new PID namespace"),
    v(
        "cwd",
        Kind::Str,
        "initial working directory for payload process inside the container",
    ),
    v(
        "pwd",
        Kind::Str,
        "initial working directory for payload process inside the container",
    ),
    b(
        "sharens",
        "share the namespace and image with other containers launched from the same parent process",
    ),
];

/// PATH inside a container with a clean environment.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run(args: &[String]) -> Res {
    let cmd = &EXEC;
    let p = match cli::parse_with(cmd, args, cli::Arity::AtLeast(2)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    Controls::load().gate("exec")?;
    let ident = Ident::load();
    let target = &p.args[0];
    let (image, binds, instance_name) = match target.strip_prefix("instance://") {
        Some(name) => {
            if !instance_state::valid_name(name) {
                return Err(Fail::Fatal(format!(
                    "While setting image/instance: {name} is not a valid instance name"
                )));
            }
            let found = instance_state::find(&ident.state_dir(), name).unwrap_or_default();
            let Some(inst) = found.into_iter().next() else {
                return Err(Fail::Fatal(format!(
                    "While setting image/instance: no instance found with name {name}"
                )));
            };
            let binds = inst.binds();
            (inst.image, binds, Some(name))
        }
        None => {
            let image = image::open(target, &ident)?;
            let binds = action::parse_binds(&action::bind_values(&p));
            action::check_binds(&binds)?;
            (image, binds, None)
        }
    };
    let command = &p.args[1];
    let command_args = &p.args[2..];
    if let Some(code) = sandbox_test(Path::new(&image), command, command_args) {
        return Ok(Done::Code(code));
    }
    let env = environment(&p, &image, instance_name);
    let program = resolve_program(command, &env)?;

    let mut process = match setpriv() {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
            c
        }
        None => {
            let mut c = Command::new(&program);
            c.arg0(command);
            c
        }
    };
    process.args(command_args).env_clear().envs(env);
    if let Some(dir) = working_dir(&p, &binds) {
        process.current_dir(dir);
    }
    let status = process.status().map_err(|e| {
        Fail::Fatal(format!(
            "exec {} failed: {}",
            program.display(),
            sys::go_err(&e)
        ))
    })?;
    match (status.code(), status.signal()) {
        (Some(code), _) => Ok(Done::Code(code)),
        (None, Some(sig)) => Ok(Done::Signal(sig)),
        (None, None) => Ok(Done::Code(255)),
    }
}

/// Answers `test OP PATH` from inside a sandbox directory.
fn sandbox_test(image: &Path, command: &str, args: &[String]) -> Option<i32> {
    if command != "test" || !image.is_dir() {
        return None;
    }
    let (negate, rest) = match args.first().map(String::as_str) {
        Some("!") => (true, &args[1..]),
        _ => (false, args),
    };
    let [op, path] = rest else {
        return None;
    };
    let inside = image.join(path.trim_start_matches('/'));
    let result = match op.as_str() {
        "-e" => fs::metadata(&inside).is_ok(),
        "-d" => inside.is_dir(),
        "-f" => inside.is_file(),
        "-s" => fs::metadata(&inside).is_ok_and(|m| m.len() > 0),
        "-L" | "-h" => fs::symlink_metadata(&inside).is_ok_and(|m| m.file_type().is_symlink()),
        _ => return None,
    };
    Some(if result != negate { 0 } else { 1 })
}

/// The command's environment: the caller's (or a clean one), `APPTAINERENV_*`,
/// `--env`, and apptainer's own variables.
fn environment(p: &Parsed, image: &str, instance: Option<&str>) -> Vec<(String, String)> {
    let clean = p.bool("cleanenv") || p.bool("containall");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    };
    for (k, v) in std::env::vars() {
        if !clean || matches!(k.as_str(), "HOME" | "TERM" | "LANG" | "USER") {
            set(k, v);
        }
    }
    if clean {
        set("PATH".to_string(), CONTAINER_PATH.to_string());
    }
    for (k, v) in std::env::vars() {
        if let Some(name) = k.strip_prefix("APPTAINERENV_") {
            set(name.to_string(), v);
        }
    }
    for (k, v) in action::parse_env(p) {
        set(k, v);
    }
    set("APPTAINER_CONTAINER".to_string(), image.to_string());
    set("APPTAINER_NAME".to_string(), sys::basename(image));
    if let Some(name) = instance {
        set("APPTAINER_INSTANCE".to_string(), name.to_string());
    }
    env
}

/// Looks the command up in the PATH it will run with.
fn resolve_program(command: &str, env: &[(String, String)]) -> Result<PathBuf, Fail> {
    if command.contains('/') {
        let path = PathBuf::from(command);
        return match fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(Fail::Fatal(format!("stat {command}: {}", sys::go_err(&e)))),
        };
    }
    let search = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(CONTAINER_PATH, |(_, v)| v.as_str());
    for dir in search.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(command);
        let executable = fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return Ok(candidate);
        }
    }
    Err(Fail::Fatal(format!(
        "\"{command}\": executable file not found in $PATH"
    )))
}

/// `--cwd`/`--pwd`: a container path under a bind destination maps to the bind
/// source; a directory that does not exist on the host is ignored.
fn working_dir(p: &Parsed, binds: &[Bind]) -> Option<PathBuf> {
    let dir = p.str("cwd").or_else(|| p.str("pwd"))?;
    let mapped = binds
        .iter()
        .filter(|b| b.dst != "/")
        .filter(|b| {
            let dst = b.dst.trim_end_matches('/');
            dir == dst || dir.starts_with(&format!("{dst}/"))
        })
        .max_by_key(|b| b.dst.len())
        .map(|b| {
            let dst = b.dst.trim_end_matches('/');
            format!("{}{}", b.src, &dir[dst.len()..])
        });
    let candidate = PathBuf::from(mapped.unwrap_or_else(|| dir.to_string()));
    candidate.is_dir().then_some(candidate)
}

fn setpriv() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}
