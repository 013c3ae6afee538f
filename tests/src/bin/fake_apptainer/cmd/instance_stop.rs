//! `instance stop [options] [NAME|GLOB]` (reference section 3): signals each matching
//! instance's appinit, waits for the monitors to go, kills what outlives the timeout and
//! makes sure no state entry is left behind.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{self, bs, vs, Cmd, Fail, Flag, Kind, Res};
use crate::controls::Controls;
use crate::ident::Ident;
use crate::instance_state::{find, prune, state_file, Instance};
use crate::sylog;
use crate::sys;

pub static INSTANCE_STOP: Cmd = Cmd {
    name: "stop",
    usage: "apptainer [global options...] instance stop [stop options...] [instance]",
    short: "Stop a named instance of a given container image",
    flags: &[INSTANCE_STOP_FLAGS],
    interspersed: true,
    subs: &[],
};

static INSTANCE_STOP_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, stop instances belonging to user",
    ),
    bs("all", 'a', "stop all user's instances"),
    bs("force", 'F', "force kill instance"),
    vs("signal", 's', Kind::Str, "signal sent to the instance"),
    vs(
        "timeout",
        't',
        Kind::Int,
        "force kill non stopped instances after X seconds",
    ),
];

pub fn stop(args: &[String]) -> Res {
    let cmd = &INSTANCE_STOP;
    let p = match cli::parse_with(cmd, args, cli::Arity::Between(0, 1)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    if p.args.is_empty() && !p.bool("all") {
        return Err(Fail::Command(cmd, "invalid command".to_string()));
    }
    let ident = Ident::load();
    let user = p.str("user").filter(|u| !u.is_empty());
    if user.is_some() && ident.uid != 0 {
        return Err(Fail::Fatal(
            "Only root user can stop user's instances".to_string(),
        ));
    }
    let mut signal = 2;
    if let Some(text) = p.str("signal").filter(|s| !s.is_empty()) {
        signal = sys::parse_signal(text)
            .map_err(|e| Fail::Fatal(format!("Could not convert stop signal: {e}")))?;
    }
    if p.bool("force") {
        signal = 9;
    }
    Controls::load().gate("instance-stop")?;
    let pattern = p.args.first().map(String::as_str).unwrap_or("*");
    let timeout = Duration::from_secs(p.int("timeout", 10).max(0) as u64);
    let dir = ident.state_dir_of(user.unwrap_or(&ident.user));
    let found = find(&dir, pattern).map_err(|_| {
        Fail::Command(
            cmd,
            "could not retrieve instance list: syntax error in pattern".to_string(),
        )
    })?;
    if found.is_empty() {
        return Err(Fail::Command(cmd, "no instance found".to_string()));
    }
    for instance in &found {
        sylog::info(&format!(
            "Stopping {} instance of {} (PID={})",
            instance.name, instance.image, instance.pid
        ));
        sys::send_signal(instance.pid, signal);
    }
    wait_stopped(&found, timeout);
    for instance in &found {
        make_sure_gone(&dir, instance);
    }
    cli::ok()
}

/// Polls every 10 ms until each monitor is gone. An appinit without children is
/// killed at once; the rest are killed when the timeout expires (reference 3.2).
fn wait_stopped(found: &[Instance], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<(&Instance, bool)> = found.iter().map(|i| (i, false)).collect();
    loop {
        thread::sleep(Duration::from_millis(10));
        pending.retain(|(i, _)| sys::is_monitor(i.ppid));
        if pending.is_empty() {
            return;
        }
        for (instance, killed) in pending.iter_mut() {
            if !*killed && sys::child_count(instance.pid) == 0 {
                sys::send_signal(instance.pid, 9);
                *killed = true;
            }
        }
        if Instant::now() >= deadline {
            for (instance, _) in &pending {
                sylog::info(&format!(
                    "Killing {} instance of {} (PID={}) (Timeout)",
                    instance.name, instance.image, instance.pid
                ));
                sys::send_signal(instance.pid, 9);
            }
            return;
        }
    }
}

/// After a stop the state entry must be gone: wait briefly for the monitor to
/// remove it, else kill the monitor and remove it here.
fn make_sure_gone(dir: &Path, instance: &Instance) {
    let grace = Instant::now() + Duration::from_secs(2);
    while sys::is_monitor(instance.ppid) && Instant::now() < grace {
        thread::sleep(Duration::from_millis(10));
    }
    if sys::is_monitor(instance.ppid) {
        sys::send_signal(instance.ppid, 9);
    }
    prune(&state_file(dir, &instance.name), instance.ppid);
}
