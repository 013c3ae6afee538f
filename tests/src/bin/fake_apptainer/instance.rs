//! `instance start|run|stop|list|stats` (reference sections 2, 3, 4 and 5.1) and
//! the two hidden processes that make up a running instance.
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

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{self, Cmd, Fail, Parsed, Res};
use crate::controls::Controls;
use crate::glob;
use crate::image::{self, ImageMeta};
use crate::json::J;
use crate::sylog;
use crate::sys::{self, Ident};

/// Environment variable carrying the monitor's instructions (JSON).
const MONITOR_ENV: &str = "FAKE_APPTAINER_INTERNAL_MONITOR";
/// Environment variable carrying appinit's expected parent pid.
const APPINIT_ENV: &str = "FAKE_APPTAINER_INTERNAL_APPINIT";

/// How long `instance start` waits for the monitor to report.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The starter apptainer names when it fails (a distribution package's path, reference 2.5).
const STARTER: &str = "/usr/libexec/apptainer/bin/starter";

/// The address range of the default `bridge` network (10.22.0.0/16).
const IP_RANGE: &str = "10.22.0.1-10.22.255.254";

/// One instance state file.
pub struct Instance {
    pub name: String,
    pub pid: i64,
    pub ppid: i64,
    pub user: String,
    pub image: String,
    pub config: String,
    pub ip: String,
    pub log_err: String,
    pub log_out: String,
}

impl Instance {
    /// The state file: keys in the order of apptainer's instance.File.
    fn state_json(&self) -> J {
        J::o(vec![
            ("pid", J::Int(self.pid)),
            ("ppid", J::Int(self.ppid)),
            ("name", J::s(&self.name)),
            ("user", J::s(&self.user)),
            ("image", J::s(&self.image)),
            ("config", J::s(&self.config)),
            ("userns", J::Bool(false)),
            ("cgroup", J::Bool(false)),
            ("ip", J::s(&self.ip)),
            ("logErrPath", J::s(&self.log_err)),
            ("logOutPath", J::s(&self.log_out)),
            ("checkpoint", J::s("")),
            ("sharensMode", J::Bool(false)),
        ])
    }

    fn from_state(text: &str) -> Option<Instance> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let s = |key: &str| {
            v.get(key)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Some(Instance {
            name: s("name"),
            pid: v.get("pid")?.as_i64()?,
            ppid: v.get("ppid")?.as_i64()?,
            user: s("user"),
            image: s("image"),
            config: s("config"),
            ip: s("ip"),
            log_err: s("logErrPath"),
            log_out: s("logOutPath"),
        })
    }

    /// One element of `instance list --json` (reference 4.2).
    fn list_json(&self) -> J {
        J::o(vec![
            ("instance", J::s(&self.name)),
            ("pid", J::Int(self.pid)),
            ("img", J::s(&self.image)),
            ("ip", J::s(&self.ip)),
            ("logErrPath", J::s(&self.log_err)),
            ("logOutPath", J::s(&self.log_out)),
        ])
    }

    /// The binds recorded in the config at start.
    pub fn binds(&self) -> Vec<Bind> {
        let config = sys::base64_decode(&self.config)
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        let Some(list) = config
            .as_ref()
            .and_then(|c| c.get("binds"))
            .and_then(|b| b.as_array())
        else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let s = |k: &str| {
                    b.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                Bind {
                    src: s("source"),
                    dst: s("destination"),
                    opts: s("options"),
                }
            })
            .collect()
    }
}

fn state_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join(format!("{name}.json"))
}

fn read_state(path: &Path) -> Option<Instance> {
    Instance::from_state(&fs::read_to_string(path).ok()?)
}

/// Instances whose name matches `pattern`, sorted by name. Entries whose monitor
/// is gone are deleted silently (reference 4.6).
pub fn find(dir: &Path, pattern: &str) -> Result<Vec<Instance>, glob::BadPattern> {
    glob::validate(pattern)?;
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| glob::matches(pattern, n))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut found = Vec::new();
    for name in names {
        let path = state_file(dir, &name);
        let Some(instance) = read_state(&path) else {
            continue;
        };
        if sys::is_monitor(instance.ppid) {
            found.push(instance);
        } else {
            prune(&path, instance.ppid);
        }
    }
    Ok(found)
}

/// Deletes a state directory if it still belongs to the monitor `ppid`.
fn prune(path: &Path, ppid: i64) {
    if read_state(path).is_some_and(|i| i.ppid == ppid) {
        if let Some(dir) = path.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Instance names allowed by apptainer: `^[a-zA-Z0-9._-]+$`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

// ---------------------------------------------------------------------------
// Binds and environment options

/// One `src[:dst[:opts]]` bind.
pub struct Bind {
    pub src: String,
    pub dst: String,
    pub opts: String,
}

/// `--bind` values plus `APPTAINER_BIND` and `APPTAINER_BINDPATH`, which are merged.
pub fn bind_values(p: &Parsed) -> Vec<String> {
    let mut values: Vec<String> = p.all("bind").into_iter().map(str::to_string).collect();
    for key in ["APPTAINER_BIND", "APPTAINER_BINDPATH"] {
        if let Some(v) = sys::env_nonempty(key) {
            values.push(v);
        }
    }
    values
}

/// Each value is a comma list of `src[:dst[:opts]]`; `\,` and `\:` escape.
pub fn parse_binds(values: &[String]) -> Vec<Bind> {
    let mut binds = Vec::new();
    for value in values {
        for spec in split_escaped(value, ',') {
            if spec.is_empty() {
                continue;
            }
            let parts = split_escaped(&spec, ':');
            let src = parts[0].clone();
            let dst = parts
                .get(1)
                .filter(|d| !d.is_empty())
                .cloned()
                .unwrap_or_else(|| src.clone());
            let opts = parts.get(2).cloned().unwrap_or_default();
            binds.push(Bind { src, dst, opts });
        }
    }
    binds
}

fn split_escaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let last = parts.len() - 1;
        match c {
            '\\' => match chars.next() {
                Some(n) if n == ',' || n == ':' => parts[last].push(n),
                Some(n) => {
                    parts[last].push('\\');
                    parts[last].push(n);
                }
                None => parts[last].push('\\'),
            },
            c if c == sep => parts.push(String::new()),
            c => parts[last].push(c),
        }
    }
    parts
}

/// A bind whose host source is missing fails like apptainer's mount hook (reference 2.5).
pub fn check_binds(binds: &[Bind]) -> Result<(), Fail> {
    for bind in binds {
        if bind.opts.contains("image-src") {
            continue;
        }
        if fs::symlink_metadata(&bind.src).is_err() {
            let (src, dst) = (&bind.src, &bind.dst);
            return Err(Fail::Fatal(format!(
                "container creation failed: mount hook function failure: mount {src}->{dst} error: while mounting {src}: mount source {src} doesn't exist"
            )));
        }
    }
    Ok(())
}

/// `--env` map items in order (a later key replaces an earlier one).
pub fn parse_env(p: &Parsed) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for value in p.all("env") {
        for item in sys::csv_split(value) {
            if let Some((k, v)) = item.split_once('=') {
                env.retain(|(key, _)| key != k);
                env.push((k.to_string(), v.to_string()));
            }
        }
    }
    env
}

// ---------------------------------------------------------------------------
// instance start / run

pub fn start(args: &[String], run: bool) -> Res {
    let cmd: &'static Cmd = if run {
        &cli::INSTANCE_RUN
    } else {
        &cli::INSTANCE_START
    };
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

/// The first requested network when a network namespace is asked for (reference 2.2).
fn network_choice(p: &Parsed) -> Option<String> {
    let mut net = p.bool("net");
    let network = p.str("network");
    if network.is_some() && !net {
        sylog::info("Setting --net (required by --network)");
        net = true;
    }
    if !p.all("network-args").is_empty() && !net {
        sylog::info("Setting --net (required by --network-args)");
        net = true;
    }
    net.then(|| {
        network
            .and_then(|n| n.split(',').next())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or("bridge")
            .to_string()
    })
}

/// Only root may use a CNI network; anyone may use `none` (reference 2.5 and 6.3). The refusal
/// comes from inside the starter, so apptainer echoes it before its own FATAL.
fn check_network_allowed(network: Option<&str>) -> Result<(), Fail> {
    match network {
        Some(net) if net != "none" && sys::uid() != 0 => {
            sylog::fatal("container creation failed: network requires root or a suid installation with /etc/subuid --fakeroot; non-root users can only use --network=none unless permitted by the administrator");
            Err(Fail::Fatal(format!(
                "while executing starter: failed to start instance: while running {STARTER}: exit status 255"
            )))
        }
        _ => Ok(()),
    }
}

/// `IP=` from `--network-args "[net:]K=V;K2=V2"`.
fn requested_ip(network_args: &[&str]) -> Option<String> {
    for arg in network_args {
        for item in sys::csv_split(arg) {
            let body = match (item.find(':'), item.find('=')) {
                (Some(colon), Some(eq)) if colon < eq => &item[colon + 1..],
                _ => item.as_str(),
            };
            for pair in body.split(';') {
                if let Some((k, v)) = pair.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("IP") {
                        let ip = v.trim().split('/').next().unwrap_or_default();
                        return Some(ip.to_string());
                    }
                }
            }
        }
    }
    None
}

/// A requested address if free, else the first of 10.22.0.2, .3, ... not used by
/// a live instance.
fn allocate_ip(state_dir: &Path, p: &Parsed) -> Result<String, Fail> {
    let used: HashSet<String> = find(state_dir, "*")
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip)
        .filter(|ip| !ip.is_empty())
        .collect();
    if let Some(ip) = requested_ip(&p.all("network-args")) {
        if used.contains(&ip) {
            return Err(Fail::Fatal(format!(
                "container creation failed: failed to allocate for range 0: requested IP address {ip} is not available in range set {IP_RANGE}"
            )));
        }
        return Ok(ip);
    }
    for third in 0..=255u32 {
        for fourth in 1..=254u32 {
            if third == 0 && fourth < 2 {
                continue;
            }
            let ip = format!("10.22.{third}.{fourth}");
            if !used.contains(&ip) {
                return Ok(ip);
            }
        }
    }
    Err(Fail::Fatal(format!(
        "container creation failed: failed to allocate for range 0: no IP addresses available in range set: {IP_RANGE}"
    )))
}

/// A lock file holding the pid of the start that allocates an address.
struct IpLock(PathBuf);

impl IpLock {
    fn acquire(ident: &Ident) -> Option<IpLock> {
        let dir = ident.configdir.join("instances");
        sys::mkdir_p(&dir, 0o700).ok()?;
        let path = dir.join(format!(".fake-ipam-{}-{}.lock", ident.host, ident.user));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let _ = write!(file, "{}", std::process::id());
                    return Some(IpLock(path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok());
                    if holder.is_some_and(|pid| !sys::is_running(pid)) {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                }
                Err(_) => return None,
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for IpLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
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

/// Starts the monitor and waits for its report; returns appinit's pid.
fn spawn_monitor(ident: &Ident, name: &str, spec: &str, log_err: &Path) -> Result<i64, Fail> {
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

// ---------------------------------------------------------------------------
// The hidden processes

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

// ---------------------------------------------------------------------------
// instance stop

pub fn stop(args: &[String]) -> Res {
    let cmd = &cli::INSTANCE_STOP;
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

// ---------------------------------------------------------------------------
// instance list

pub fn list(args: &[String]) -> Res {
    let cmd = &cli::INSTANCE_LIST;
    let p = match cli::parse_with(cmd, args, cli::Arity::Between(0, 1)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let (json, logs) = (p.bool("json"), p.bool("logs"));
    if json && logs {
        return Err(Fail::Fatal("more than one flags have been set".to_string()));
    }
    let ident = Ident::load();
    let user = p.str("user").filter(|u| !u.is_empty());
    if user.is_some() && ident.uid != 0 {
        return Err(Fail::Fatal(
            "Only root user can list user's instances".to_string(),
        ));
    }
    let controls = Controls::load();
    controls.gate("instance-list")?;
    if json && controls.garbage_list() {
        sys::stdout("fake-apptainer garbage: {\"instances\": [ not json\n");
        return cli::ok();
    }
    let pattern = p.args.first().map(String::as_str).unwrap_or("*");
    let found = find(&ident.state_dir_of(user.unwrap_or(&ident.user)), pattern).map_err(|_| {
        Fail::Fatal(
            "Could not list instances: could not retrieve instance list: syntax error in pattern"
                .to_string(),
        )
    })?;
    let out = if json {
        let doc = J::o(vec![(
            "instances",
            J::Arr(found.iter().map(Instance::list_json).collect()),
        )]);
        format!("{}\n", doc.indented())
    } else if logs {
        let mut rows = vec![cells(&["INSTANCE NAME", "PID", "LOGS"])];
        for i in &found {
            rows.push(vec![i.name.clone(), i.pid.to_string(), i.log_err.clone()]);
            rows.push(vec![String::new(), String::new(), i.log_out.clone()]);
        }
        tabwrite(&rows)
    } else {
        let mut rows = vec![cells(&["INSTANCE NAME", "PID", "IP", "IMAGE"])];
        for i in &found {
            rows.push(vec![
                i.name.clone(),
                i.pid.to_string(),
                i.ip.clone(),
                i.image.clone(),
            ]);
        }
        tabwrite(&rows)
    };
    sys::stdout(&out);
    cli::ok()
}

fn cells(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// Go's `tabwriter.NewWriter(w, 0, 8, 4, ' ', 0)`: each column as wide as its
/// widest cell plus 4; the last cell of a line is not padded (reference 4.4).
fn tabwrite(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] + 4 - cell.chars().count();
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// instance stats

/// A stub: the fake's instances have no cgroup, so stats are never available.
pub fn stats(args: &[String]) -> Res {
    let cmd = &cli::INSTANCE_STATS;
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
