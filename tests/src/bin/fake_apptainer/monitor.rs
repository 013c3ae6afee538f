//! The two hidden processes that make up a running instance, started by
//! `cmd/instance_start.rs` (reference sections 2 and 5.1).
//!
//! An instance is a real process tree, detached from the caller:
//! * the **monitor**, a copy of this binary named `Apptainer instance: USER [NAME]`
//!   (the `ppid` of the state file), in its own process group, with its standard
//!   streams on /dev/null, a private pipe and the `.err` log, so that it neither
//!   holds the caller's pipes open nor dies with the caller's process group;
//! * **appinit** (the `pid`), its child, which only waits to be signalled. The
//!   startscript never runs on the host: its first command line is appended to
//!   the `.out` log as `startscript would run: ...` instead.
//!
//! The monitor writes `<configdir>/instances/app/<host>/<user>/NAME/NAME.json`,
//! reports on the pipe, then waits for appinit; when appinit dies it deletes the
//! state directory (not the logs) and exits. If the monitor itself is killed the
//! state file stays behind, stale, and is pruned silently by the next lookup; its
//! appinit notices the loss of its parent and exits.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::cli::Fail;
use crate::ident::Ident;
use crate::instance_state::{prune, read_state, Instance};
use crate::sys;

/// Environment variable carrying the monitor's instructions (JSON).
const MONITOR_ENV: &str = "FAKE_APPTAINER_INTERNAL_MONITOR";

/// Environment variable carrying appinit's expected parent pid.
const APPINIT_ENV: &str = "FAKE_APPTAINER_INTERNAL_APPINIT";

/// How long `instance start` waits for the monitor to report.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the monitor and waits for its report; returns appinit's pid.
pub fn spawn_monitor(ident: &Ident, name: &str, spec: &str, log_err: &Path) -> Result<i64, Fail> {
    let failed = |why: String| {
        Fail::Fatal(format!(
            "while executing starter: failed to start instance: {why}"
        ))
    };
    let err_log = sys::open_append(log_err)
        .map_err(|e| failed(format!("open {}: {}", log_err.display(), sys::go_err(&e))))?;
    let mut child = Command::new("/proc/self/exe")
        .arg0(format!("Apptainer instance: {} [{}]", ident.user, name))
        .env(MONITOR_ENV, spec)
        .env_remove(APPINIT_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err_log))
        .current_dir("/")
        .process_group(0)
        .spawn()
        .map_err(|e| failed(sys::go_err(&e)))?;
    let Some(pipe) = child.stdout.take() else {
        return Err(failed("no pipe to the instance monitor".to_string()));
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(pipe).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
    let mut words = line.split_whitespace();
    match words.next() {
        Some("ready") => {
            if let Some(pid) = words.next().and_then(|w| w.parse().ok()) {
                return Ok(pid);
            }
        }
        Some("error") => {
            let _ = child.wait();
            let why = line.trim_end().strip_prefix("error").unwrap_or_default();
            return Err(Fail::Fatal(why.trim_start().to_string()));
        }
        _ => {}
    }
    sys::send_signal(i64::from(child.id()), 9);
    let _ = child.wait();
    Err(failed(
        "the instance monitor did not report a started instance".to_string(),
    ))
}

/// Runs the monitor or appinit when this binary was started as one.
pub fn hidden_mode() -> Option<i32> {
    let arg0 = std::env::args_os().next()?;
    let arg0 = arg0.to_string_lossy();
    if arg0 == "appinit" {
        let parent = std::env::var(APPINIT_ENV).ok()?.parse().ok()?;
        return Some(appinit(parent));
    }
    if arg0.starts_with("Apptainer instance: ") {
        let spec = std::env::var(MONITOR_ENV).ok()?;
        return Some(monitor(&spec));
    }
    None
}

/// Sets the kernel's short process name (`ps -o comm`, `pgrep NAME`); spawning
/// `/proc/self/exe` would otherwise leave it as `exe`.
fn set_process_name(name: &str) {
    let _ = fs::write("/proc/self/comm", name);
}

/// Waits to be signalled (the default action of SIGINT/SIGTERM ends it); leaves
/// when its monitor is gone.
fn appinit(parent: u32) -> i32 {
    set_process_name("appinit");
    loop {
        thread::sleep(Duration::from_millis(50));
        if std::os::unix::process::parent_id() != parent {
            return 0;
        }
    }
}

/// The monitor: starts appinit, writes the state file, reports `ready PID PPID`
/// (or `error MESSAGE`) on stdout, waits for appinit, then removes the state.
fn monitor(spec: &str) -> i32 {
    set_process_name("fake-apptainer");
    let mut report = io::stdout();
    let Ok(spec) = serde_json::from_str::<serde_json::Value>(spec) else {
        let _ = writeln!(
            report,
            "error container creation failed: bad monitor instructions"
        );
        return 255;
    };
    let field = |key: &str| {
        spec.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let me = i64::from(std::process::id());
    let state_path = PathBuf::from(field("stateFile"));
    let log_out = PathBuf::from(field("logOutPath"));
    let script_line = field("scriptLine");
    if !script_line.is_empty() {
        let line = format!("{} would run: {script_line}", field("scriptKind"));
        let _ = sys::append_line(&log_out, &line);
    }
    let fail = |report: &mut io::Stdout, why: String| {
        let _ = writeln!(report, "error {why}");
        255
    };
    let out = match sys::open_append(&log_out) {
        Ok(f) => f,
        Err(e) => {
            return fail(
                &mut report,
                format!("container creation failed: {}", sys::go_err(&e)),
            )
        }
    };
    let spawned = Command::new("/proc/self/exe")
        .arg0("appinit")
        .env(APPINIT_ENV, me.to_string())
        .env_remove(MONITOR_ENV)
        .stdin(Stdio::null())
        .stdout(out)
        .current_dir("/")
        .spawn();
    let mut appinit = match spawned {
        Ok(child) => child,
        Err(e) => {
            return fail(
                &mut report,
                format!("container creation failed: {}", sys::go_err(&e)),
            )
        }
    };
    let instance = Instance {
        name: field("name"),
        pid: i64::from(appinit.id()),
        ppid: me,
        user: field("user"),
        image: field("image"),
        config: field("config"),
        ip: field("ip"),
        log_err: field("logErrPath"),
        log_out: field("logOutPath"),
    };
    // A concurrent start may have taken the name meanwhile.
    let taken = read_state(&state_path).is_some_and(|o| o.ppid != me && sys::is_monitor(o.ppid));
    let written = if taken {
        Err(format!("instance {} already exists", instance.name))
    } else {
        state_path
            .parent()
            .map_or(Ok(()), |d| sys::mkdir_p(d, 0o700))
            .and_then(|()| {
                sys::write_atomic(
                    &state_path,
                    instance.state_json().compact().as_bytes(),
                    0o644,
                )
            })
            .map_err(|e| format!("container creation failed: {}", sys::go_err(&e)))
    };
    if let Err(why) = written {
        let _ = appinit.kill();
        let _ = appinit.wait();
        return fail(&mut report, why);
    }
    let _ = writeln!(report, "ready {} {me}", instance.pid);
    let _ = report.flush();
    let _ = appinit.wait();
    prune(&state_path, me);
    0
}
