//! The production [`Runtime`]: runs the real `apptainer` binary.
//!
//! No shell: arguments are a vector. Each call runs in its own process group, which is killed
//! whole when the call times out or is dropped. The child's environment is built from an
//! allow-list ([`DEFAULT_PASSED_VARIABLES`] plus `--apptainer-env`): the `APPTAINER_*` variables
//! that silently change flags (`shared/reference/apptainer-cli.md`, 0.4) and the broker URL
//! never reach apptainer, nor through it the containers.
//! A semaphore bounds how many apptainer processes run at once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::children::{kill_group, ChildRegistry};
use super::{Bind, InstanceInfo, Runtime, RuntimeError, Stopped};

/// The variables `apptainer` gets from the worker's environment, by default: what a process
/// needs to find programs and files and to speak the locale, and the apptainer variables that
/// only say where apptainer keeps its own files. Nothing else passes: apptainer hands its
/// environment on to every container, so `AMQP_URL` (the broker password) must not reach it,
/// and `APPTAINER_*`/`SINGULARITY_*`/`APPTAINERENV_*` variables silently change flags or set
/// variables in containers. `--apptainer-env` adds names (`NAME*` for a prefix).
/// `APPTAINER_TMPDIR` is the worker's own choice ([`Apptainer::with_temp_dir`]).
pub const DEFAULT_PASSED_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
    "APPTAINER_CONFIGDIR",
    "APPTAINER_CACHEDIR",
];

/// Whether `name` is one of `patterns` (exact names, or prefixes written `PREFIX*`).
fn passes(name: &str, patterns: &[impl AsRef<str>]) -> bool {
    patterns.iter().any(|pattern| {
        let pattern = pattern.as_ref();
        match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == pattern,
        }
    })
}

/// The environment for apptainer: the variables of `from` that the defaults or `extra` name.
pub fn apptainer_environment(
    from: impl IntoIterator<Item = (String, String)>,
    extra: &[String],
) -> Vec<(String, String)> {
    from.into_iter()
        .filter(|(name, _)| passes(name, DEFAULT_PASSED_VARIABLES) || passes(name, extra))
        .collect()
}

/// After a process exits, how long to wait for the rest of its output. A detached grandchild
/// that kept a pipe open must not hold the call.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// After a timed-out call's process group is killed, how long to wait for all of it to be gone
/// before leaving its record to the next start-up.
const GROUP_GONE_WAIT: Duration = Duration::from_secs(5);

/// How many apptainer processes may run at once, of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Image builds: the heavy calls (CPU, disk, downloads).
    pub builds: usize,
    /// Every other call (instance start, stop and list, exec, version): short, and never made
    /// to wait behind a build.
    pub commands: usize,
}

/// Runs `apptainer` subcommands.
pub struct Apptainer {
    program: PathBuf,
    network: String,
    stop_grace_secs: u64,
    build_timeout: Duration,
    command_timeout: Duration,
    builds: Arc<Semaphore>,
    commands: Arc<Semaphore>,
    env: Vec<(String, String)>,
    children: ChildRegistry,
}

/// The captured result of one call.
struct Output {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn exit_label(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown".into(),
        }
    }

    /// Apptainer's own diagnosis: its FATAL and ERROR lines without their prefixes, or, for
    /// command-line errors (exit 1), the first line of the block.
    fn diagnosis(&self) -> String {
        let marked: Vec<&str> = self
            .stderr
            .lines()
            .filter_map(|line| {
                line.strip_prefix("FATAL:")
                    .or_else(|| line.strip_prefix("ERROR:"))
                    .map(str::trim)
            })
            .collect();
        if !marked.is_empty() {
            return marked.join("; ");
        }
        let first = self.stderr.lines().find(|l| !l.trim().is_empty());
        first.unwrap_or("no error output").trim().to_owned()
    }

    fn failed(&self, command: &'static str) -> RuntimeError {
        count_failure(command);
        RuntimeError::Failed {
            command,
            exit: self.exit_label(),
            message: self.diagnosis(),
        }
    }
}

impl Apptainer {
    /// `children_dir` records the calls in flight; calls an earlier run of the worker left
    /// running are killed here, before anything can resume.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        children_dir: PathBuf,
        program: PathBuf,
        network: String,
        limits: Limits,
        stop_grace_secs: u64,
        build_timeout: Duration,
        command_timeout: Duration,
        extra_env: &[String],
    ) -> std::io::Result<Self> {
        let children = ChildRegistry::new(children_dir)?;
        children.reap_leftovers();
        let env = apptainer_environment(std::env::vars(), extra_env);
        Ok(Self {
            program,
            network,
            stop_grace_secs,
            build_timeout,
            command_timeout,
            builds: Arc::new(Semaphore::new(limits.builds)),
            commands: Arc::new(Semaphore::new(limits.commands)),
            env,
            children,
        })
    }

    /// Gives apptainer `dir` as its `APPTAINER_TMPDIR` (build bundles, SIF conversions), in
    /// place of any inherited value, and empties it first: whatever is in it was left by calls of
    /// an earlier run of the worker, which [`Apptainer::new`] has killed.
    pub fn with_temp_dir(mut self, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            tracing::warn!(path = %path.display(), "removing a temporary file left by an apptainer call of an earlier run");
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        self.env.retain(|(name, _)| name != "APPTAINER_TMPDIR");
        self.env.push((
            "APPTAINER_TMPDIR".into(),
            dir.to_string_lossy().into_owned(),
        ));
        Ok(self)
    }

    /// Runs `apptainer ARGS…` once one of `slots` is free, waiting at most `timeout`.
    async fn run(
        &self,
        slots: &Semaphore,
        command: &'static str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output, RuntimeError> {
        let _permit = slots
            .acquire()
            .await
            .expect("the apptainer semaphore is never closed");
        metrics::counter!(crate::metrics::APPTAINER_INVOCATIONS, "subcommand" => command)
            .increment(1);
        let mut child = Command::new(&self.program)
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                count_failure(command);
                RuntimeError::Spawn {
                    command,
                    program: self.program.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        let group = child.id();
        // Dropped before the call ends (the operation cut off at the drain deadline), the
        // record kills the call's whole process group, not only the leader kill_on_drop reaches.
        let mut record = group.map(|pid| self.children.record(pid));
        let stdout = capture(child.stdout.take());
        let stderr = capture(child.stderr.take());
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.map_err(|e| RuntimeError::Spawn {
                command,
                program: self.program.display().to_string(),
                reason: e.to_string(),
            })?,
            Err(_) => {
                if let Some(group) = group {
                    kill_group(group);
                }
                let _ = child.wait().await;
                if let Some(record) = record.take() {
                    record.kill_and_wait(GROUP_GONE_WAIT).await;
                }
                count_failure(command);
                return Err(RuntimeError::Timeout {
                    command,
                    after: timeout,
                });
            }
        };
        if let Some(record) = record.take() {
            record.finished();
        }
        use std::os::unix::process::ExitStatusExt;
        Ok(Output {
            code: status.code(),
            signal: status.signal(),
            stdout: stdout.collect().await,
            stderr: stderr.collect().await,
        })
    }
}

impl Apptainer {
    /// Runs an `instance list --json` command and reads its output.
    async fn list(&self, args: &[&str]) -> Result<Vec<InstanceInfo>, RuntimeError> {
        let output = self
            .run(&self.commands, "instance list", args, self.command_timeout)
            .await?;
        if output.code != Some(0) {
            return Err(output.failed("instance list"));
        }
        let list: InstanceList =
            serde_json::from_str(&output.stdout).map_err(|e| RuntimeError::Unparseable {
                command: "instance list",
                reason: format!(
                    "{e} in {:?}",
                    output.stdout.chars().take(200).collect::<String>()
                ),
            })?;
        Ok(list
            .instances
            .into_iter()
            .map(|i| InstanceInfo {
                name: i.instance,
                pid: i.pid,
                image: i.img,
                ip: i.ip,
            })
            .collect())
    }
}

/// Counts a failed call in [`crate::metrics::APPTAINER_FAILURES`].
fn count_failure(command: &'static str) {
    metrics::counter!(crate::metrics::APPTAINER_FAILURES, "subcommand" => command).increment(1);
}

/// Output of a pipe, read in the background so a full pipe never blocks the child.
struct Captured {
    buffer: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn capture<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> Captured {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let task = pipe.map(|mut pipe| {
        let buffer = Arc::clone(&buffer);
        tokio::spawn(async move {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buffer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        })
    });
    Captured { buffer, task }
}

impl Captured {
    /// What was read, once the pipe closed or the grace period ran out.
    async fn collect(mut self) -> String {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(OUTPUT_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        let bytes = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn path_arg(path: &Path) -> Result<&str, RuntimeError> {
    path.to_str().ok_or_else(|| RuntimeError::Spawn {
        command: "(arguments)",
        program: "apptainer".into(),
        reason: format!("path {} is not UTF-8", path.display()),
    })
}

/// `instance list --json`: `{"instances": [{"instance", "pid", "img", "ip", ...}]}`. Older
/// versions lack `ip`, so it is optional.
#[derive(Deserialize)]
struct InstanceList {
    instances: Vec<ListedInstance>,
}

#[derive(Deserialize)]
struct ListedInstance {
    instance: String,
    pid: i64,
    img: String,
    #[serde(default)]
    ip: String,
}

#[async_trait::async_trait]
impl Runtime for Apptainer {
    async fn build_sandbox(&self, image: &Path, definition: &Path) -> Result<(), RuntimeError> {
        let args = [
            "build",
            "--force",
            "--sandbox",
            path_arg(image)?,
            path_arg(definition)?,
        ];
        let output = self
            .run(&self.builds, "build", &args, self.build_timeout)
            .await?;
        match output.code {
            Some(0) => Ok(()),
            _ => Err(output.failed("build")),
        }
    }

    async fn start_instance(
        &self,
        image: &Path,
        name: &str,
        binds: &[Bind],
    ) -> Result<(), RuntimeError> {
        let bind_specs: Vec<String> = binds
            .iter()
            .map(|b| format!("{}:{}", b.host, b.container))
            .collect();
        // Contained: no host $HOME, /tmp or working directory in the container, its own IPC
        // namespace, and none of the worker's environment (the request's variables are in the
        // image's %environment). Writable: the per-container sandbox is the container's own
        // root file system, so a user can install packages into it. See SECURITY.md.
        let mut args = vec!["instance", "start", "--containall", "--writable"];
        for spec in &bind_specs {
            args.extend(["--bind", spec.as_str()]);
        }
        if self.network != "none" {
            args.extend(["--net", "--network", self.network.as_str()]);
        }
        args.extend([path_arg(image)?, name]);
        let output = self
            .run(
                &self.commands,
                "instance start",
                &args,
                self.command_timeout,
            )
            .await?;
        match output.code {
            Some(0) => Ok(()),
            _ => Err(output.failed("instance start")),
        }
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        self.list(&["instance", "list", "--json"]).await
    }

    async fn instance(&self, name: &str) -> Result<Option<InstanceInfo>, RuntimeError> {
        // The argument is a glob; a validated name has no glob characters, but match exactly.
        let listed = self.list(&["instance", "list", "--json", name]).await?;
        Ok(listed.into_iter().find(|i| i.name == name))
    }

    async fn stop_instance(&self, name: &str) -> Result<Stopped, RuntimeError> {
        let grace = self.stop_grace_secs.to_string();
        let args = ["instance", "stop", "--timeout", grace.as_str(), name];
        // The stop itself may wait `grace` seconds before killing; allow for it.
        let timeout = self.command_timeout + Duration::from_secs(self.stop_grace_secs);
        let output = self
            .run(&self.commands, "instance stop", &args, timeout)
            .await?;
        match output.code {
            Some(0) => Ok(Stopped::Stopped),
            Some(1) if output.stderr.contains("no instance found") => Ok(Stopped::WasNotRunning),
            _ => Err(output.failed("instance stop")),
        }
    }

    async fn is_dir_in_image(&self, image: &Path, path: &str) -> Result<bool, RuntimeError> {
        if image.is_dir() {
            // A sandbox: its tree is on the host, no container launch needed to look inside.
            // A few metadata reads in the worker's own data directory: done in place.
            return super::sandbox::is_dir(image, path).map_err(|e| RuntimeError::Inspect {
                image: image.display().to_string(),
                reason: e.to_string(),
            });
        }
        let args = ["exec", path_arg(image)?, "test", "-d", path];
        let output = self
            .run(&self.commands, "exec", &args, self.command_timeout)
            .await?;
        match output.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(output.failed("exec")),
        }
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        let output = self
            .run(
                &self.commands,
                "--version",
                &["--version"],
                self.command_timeout,
            )
            .await?;
        match output.code {
            Some(0) => Ok(output.stdout.trim().to_owned()),
            _ => Err(output.failed("--version")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apptainer_gets_only_the_allowed_variables() {
        let worker_env = [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("AMQP_URL", "amqp://u:secret@mq/"),
            ("APPTAINER_CONFIGDIR", "/var/lib/x"),
            ("APPTAINER_BIND", "/:/host"),
            ("APPTAINERENV_LD_PRELOAD", "/evil.so"),
            ("SINGULARITY_ALL", "1"),
            ("FAKE_APPTAINER_LOG", "/tmp/log"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let names = |extra: &[String]| -> Vec<String> {
            apptainer_environment(worker_env.clone(), extra)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(names(&[]), ["PATH", "LC_ALL", "APPTAINER_CONFIGDIR"]);
        assert_eq!(
            names(&["FAKE_APPTAINER_*".to_owned()]),
            [
                "PATH",
                "LC_ALL",
                "APPTAINER_CONFIGDIR",
                "FAKE_APPTAINER_LOG"
            ]
        );
    }
}
