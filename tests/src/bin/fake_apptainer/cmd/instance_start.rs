//! `instance start|run [options] IMAGE NAME [ARGS...]` (reference section 2): checks the
//! image, name, binds and network, then hands the instance to a detached monitor
//! (`monitor.rs`) and waits for its report. The options shared with `exec` are in `action.rs`.

use std::fs;
use std::path::Path;

use crate::action::{bind_values, check_binds, parse_binds, parse_env, Bind, ACTION_FLAGS};
use crate::cli::{self, v, Cmd, Fail, Flag, Kind, Parsed, Res};
use crate::controls::Controls;
use crate::ident::Ident;
use crate::image::{self, ImageMeta};
use crate::instance_state::{find, state_file, valid_name};
use crate::json::J;
use crate::monitor::spawn_monitor;
use crate::network::{allocate_ip, check_network_allowed, network_choice, IpLock};
use crate::sylog;
use crate::sys;

pub static INSTANCE_START: Cmd = Cmd {
    name: "start",
    usage: "apptainer [global options...] instance start [start options...] <container path> <instance name> [startscript args...]",
    short: "Start a named instance of the given container image",
    flags: &[ACTION_FLAGS, INSTANCE_START_FLAGS],
    interspersed: false,
    subs: &[],
};

pub static INSTANCE_RUN: Cmd = Cmd {
    name: "run",
    usage: "apptainer [global options...] instance run [run options...] <container path> <instance name> [runscript args...]",
    short: "Run a named instance of the given container image",
    flags: &[ACTION_FLAGS, INSTANCE_START_FLAGS, INSTANCE_RUN_FLAGS],
    interspersed: false,
    subs: &[],
};

static INSTANCE_START_FLAGS: &[Flag] = &[
    v(
        "pid-file",
        Kind::Str,
        "write instance PID to the file with the given name",
    ),
    v(
        "dmtcp-launch",
        Kind::Str,
        "checkpoint for dmtcp to save container process state to",
    ),
    v(
        "dmtcp-restart",
        Kind::Str,
        "checkpoint for dmtcp to use to restart container process",
    ),
];

static INSTANCE_RUN_FLAGS: &[Flag] = &[v(
    "runscript-timeout",
    Kind::Str,
    "timeout for the runscript interpreter",
)];

pub fn start(args: &[String], run: bool) -> Res {
    let cmd: &'static Cmd = if run { &INSTANCE_RUN } else { &INSTANCE_START };
    let p = match cli::parse_with(cmd, args, cli::Arity::AtLeast(2)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let controls = Controls::load();
    controls.gate("instance-start")?;
    let (image_arg, name) = (p.args[0].as_str(), p.args[1].as_str());
    let ident = Ident::load();
    let network = network_choice(&p);
    if p.bool("writable") && p.bool("writable-tmpfs") {
        sylog::warning("Disabling --writable-tmpfs flag, mutually exclusive with --writable");
    }
    let image = open_image(&p, image_arg, &ident)?;
    if !valid_name(name) {
        return Err(Fail::Fatal(format!(
            "while executing starter: while checking instance name: {name} is not a valid instance name"
        )));
    }
    let state_dir = ident.state_dir();
    if find(&state_dir, name).is_ok_and(|found| !found.is_empty()) {
        return Err(Fail::Fatal(format!("instance {name} already exists")));
    }
    let binds = parse_binds(&bind_values(&p));
    check_binds(&binds)?;
    check_network_allowed(network.as_deref())?;

    let logs_dir = ident.logs_dir();
    make_dirs(&[&logs_dir, &state_dir])?;
    let log_out = logs_dir.join(format!("{name}.out"));
    let log_err = logs_dir.join(format!("{name}.err"));

    // Address allocation is serialised until the new state file exists.
    let lock = network.as_ref().and_then(|_| IpLock::acquire(&ident));
    let ip = match network.as_deref() {
        Some(net) if net != "none" => allocate_ip(&state_dir, &p)?,
        _ => String::new(),
    };
    let meta = ImageMeta::read(Path::new(&image));
    let (kind, script) = if run {
        ("runscript", meta.runscript)
    } else {
        ("startscript", meta.startscript)
    };
    let config = config_json(&p, &binds, network.as_deref(), run);
    let spec = J::o(vec![
        ("name", J::s(name)),
        ("user", J::s(&ident.user)),
        ("image", J::s(&image)),
        ("config", J::s(sys::base64_encode(config.as_bytes()))),
        ("ip", J::s(&ip)),
        ("logErrPath", J::s(log_err.to_string_lossy())),
        ("logOutPath", J::s(log_out.to_string_lossy())),
        (
            "stateFile",
            J::s(state_file(&state_dir, name).to_string_lossy()),
        ),
        ("scriptKind", J::s(kind)),
        (
            "scriptLine",
            J::s(ImageMeta::first_command(script.as_deref()).unwrap_or_default()),
        ),
    ])
    .compact();
    let pid = spawn_monitor(&ident, name, &spec, &log_err)?;
    drop(lock);
    controls.hang_after("instance-start");

    sylog::info("instance started successfully");
    write_pid_file(&p, pid);
    cli::ok()
}

/// The directories of the instance's state and logs.
fn make_dirs(dirs: &[&Path]) -> Result<(), Fail> {
    for dir in dirs {
        sys::mkdir_p(dir, 0o700).map_err(|e| {
            Fail::Fatal(format!(
                "while executing starter: failed to start instance: mkdir {}: {}",
                dir.display(),
                sys::go_err(&e)
            ))
        })?;
    }
    Ok(())
}

/// `--pid-file`: written after a successful start; a failure only warns (reference 2.2).
fn write_pid_file(p: &Parsed, pid: i64) {
    if let Some(pid_file) = p.str("pid-file").filter(|f| !f.is_empty()) {
        if let Err(e) = fs::write(pid_file, format!("{pid}\n")) {
            sylog::warning(&format!(
                "Failed to write pid file: open {pid_file}: {}",
                sys::go_err(&e)
            ));
        }
    }
}

/// The image to start, absolute: not another instance, and not a SIF if `--writable`.
fn open_image(p: &Parsed, image_arg: &str, ident: &Ident) -> Result<String, Fail> {
    if image_arg.starts_with("instance://") {
        return Err(Fail::Fatal(
            "While setting image/instance: starting an instance from another is not allowed"
                .to_string(),
        ));
    }
    let image = image::open(image_arg, ident)?;
    if p.bool("writable") && !Path::new(&image).is_dir() {
        // A SIF is read-only unless it carries an overlay partition, which the fake's never do
        // (apptainer-next.md 1.1).
        return Err(Fail::Fatal(format!(
            "no SIF writable overlay partition found in {image}"
        )));
    }
    Ok(image)
}

/// The instance options, kept (base64 JSON) in the state file's `config` so tests
/// can check what was asked for.
fn config_json(p: &Parsed, binds: &[Bind], network: Option<&str>, run: bool) -> String {
    let binds = binds
        .iter()
        .map(|b| {
            J::o(vec![
                ("source", J::s(&b.src)),
                ("destination", J::s(&b.dst)),
                ("options", J::s(&b.opts)),
            ])
        })
        .collect();
    let env = parse_env(p)
        .into_iter()
        .map(|(k, v)| (k, J::s(v)))
        .collect();
    let flag = |name: &str| J::Bool(p.bool(name));
    J::o(vec![
        ("fakeApptainer", J::Bool(true)),
        ("action", J::s(if run { "run" } else { "start" })),
        ("args", J::strs(&p.args[2..])),
        ("binds", J::Arr(binds)),
        ("env", J::Obj(env)),
        ("network", J::s(network.unwrap_or_default())),
        ("networkArgs", J::strs(&p.all("network-args"))),
        ("hostname", J::s(p.str("hostname").unwrap_or_default())),
        ("contain", flag("contain")),
        ("containAll", flag("containall")),
        ("cleanEnv", flag("cleanenv")),
        ("fakeroot", flag("fakeroot")),
        ("writable", flag("writable")),
        ("writableTmpfs", flag("writable-tmpfs")),
        ("noHome", flag("no-home")),
    ])
    .compact()
}
