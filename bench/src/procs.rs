//! What the benchmark starts and stops: the worker binary against `fake-apptainer` as child
//! processes (found next to the bench's own executable), the bulk seeding of a worker's store,
//! and the broker-side checks (is the worker consuming yet).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use orchestrator_worker::store::{ContainerRow, Store};

/// How long a worker may take to start consuming before the run is abandoned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The binaries the benchmark runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub worker: PathBuf,
    pub fake: PathBuf,
}

impl Binaries {
    /// `orchestrator-worker` and `fake-apptainer` from the bench's own directory, or an error
    /// that says which build makes them.
    pub fn next_to_bench() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("could not locate the bench executable")?;
        let dir = exe
            .parent()
            .context("the bench executable has no directory")?;
        let found = Self {
            worker: dir.join("orchestrator-worker"),
            fake: dir.join("fake-apptainer"),
        };
        let missing: Vec<String> = [&found.worker, &found.fake]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let release = if dir.ends_with("debug") {
                ""
            } else {
                "--release "
            };
            bail!(
                "missing {}; build them with: cargo build {release}--workspace --bins",
                missing.join(" and ")
            );
        }
        Ok(found)
    }
}

/// How to run one worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub concurrency: u32,
    /// Extra environment (for fake-apptainer: `FAKE_APPTAINER_DELAY_MS`, ...).
    pub env: Vec<(String, String)>,
}

/// One worker process and the directory it owns.
pub struct WorkerProcess {
    pub queue: String,
    pub reply_queue: String,
    pub dir: PathBuf,
    child: Child,
    amqp_url: String,
    fake: PathBuf,
}

/// Where a worker under `dir` keeps its state database (the worker's `--data-dir` layout).
pub fn state_db(dir: &Path) -> PathBuf {
    dir.join("data/state.sqlite")
}

/// The shared image every seeded container points at: a sandbox directory holding
/// `/mnt/data`, so `createvolume` finds its container location in it.
pub fn seeded_image(dir: &Path) -> PathBuf {
    dir.join("data/images/bench-seeded")
}

/// The name of the `index`th seeded container.
pub fn seeded_name(index: usize) -> String {
    format!("seeded-{index}")
}

/// Writes `count` stopped containers (`seeded-0` …) into the state database of a worker that
/// will run in `dir`, before it starts: the documented bulk path, through the worker's own
/// [`Store`] (same schema and migrations). Returns how long the writing took.
pub fn seed(dir: &Path, count: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let image = seeded_image(dir);
    std::fs::create_dir_all(image.join("mnt/data"))
        .with_context(|| format!("could not create {}", image.display()))?;
    std::fs::create_dir_all(image.join(".singularity.d"))?;
    let store = Store::open(&state_db(dir)).context("could not open the state database")?;
    let image_path = image.display().to_string();
    let rows = (0..count).map(|i| ContainerRow {
        name: seeded_name(i),
        image: "jupyter/base-notebook".into(),
        distributor: "docker".into(),
        os: "jupyter/base-notebook".into(),
        version: "latest".into(),
        command: vec!["jupyter lab --no-browser".into()],
        environment: Default::default(),
        volume_name: None,
        binds: Default::default(),
        image_path: image_path.clone(),
        active: false,
        ip: String::new(),
    });
    store
        .put_containers_blocking(rows)
        .context("could not seed the state database")?;
    Ok(started.elapsed())
}

impl WorkerProcess {
    /// Starts a worker in `dir` (created if needed) on fresh queues named after `label`.
    pub fn spawn(
        bins: &Binaries,
        amqp_url: &str,
        dir: &Path,
        label: &str,
        spec: &WorkerSpec,
    ) -> anyhow::Result<Self> {
        for sub in ["data/volumes", "apptainer"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("bench.{label}.{id}.requests");
        let reply_queue = format!("bench.{label}.{id}.replies");
        let log = std::fs::File::create(dir.join("worker.log"))?;
        let mut command = Command::new(&bins.worker);
        command
            .args(["--queue", &queue, "--reply-queue", &reply_queue])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--amqp-url", amqp_url])
            .args(["--concurrency", &spec.concurrency.to_string()])
            .env("APPTAINER_BIN", &bins.fake)
            .env("APPTAINER_CONFIGDIR", dir.join("apptainer"))
            .env("FAKE_APPTAINER_CONTROL", dir.join("fake.control"))
            .env("FAKE_APPTAINER_LOG", dir.join("fake.log"))
            // The worker passes apptainer only the variables it is told to.
            .env("ORCHESTRATOR_APPTAINER_ENV", "FAKE_APPTAINER_*")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("could not start {}", bins.worker.display()))?;
        Ok(Self {
            queue,
            reply_queue,
            dir: dir.to_owned(),
            child,
            amqp_url: amqp_url.to_owned(),
            fake: bins.fake.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls the request queue's consumer count until the worker consumes; returns how long
    /// that took from `since`.
    pub async fn wait_until_consuming(&mut self, since: Instant) -> anyhow::Result<Duration> {
        let connection = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .context("could not reach the broker")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let result = loop {
            if let Some(status) = self.child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "the worker exited with {status}; its log:\n{}",
                    self.log_tail()
                ));
            }
            if orchestrator_producer::consumer_count(&connection, &self.queue)
                .await
                .is_ok_and(|consumers| consumers > 0)
            {
                break Ok(since.elapsed());
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "the worker did not consume within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let _ = connection.close(200, "ready".into()).await;
        result
    }

    /// The worker's resident memory (VmRSS), in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(kib / 1024.0)
    }

    /// Changes fake-apptainer's behaviour for the calls the worker makes from now on.
    pub fn control_fake(&self, lines: &[&str]) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("fake.control"), lines.join("\n"))?;
        Ok(())
    }

    /// Whether fake-apptainer has begun a `build` (its log has a line for one).
    pub fn build_began(&self) -> bool {
        std::fs::read_to_string(self.dir.join("fake.log"))
            .map(|log| log.lines().any(|l| l.contains("\"build\"")))
            .unwrap_or(false)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the worker (SIGTERM, then SIGKILL after a deadline), stops every instance it
    /// started and deletes its queues.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = Command::new(&self.fake)
            .args(["instance", "stop", "--all", "--force"])
            .env("APPTAINER_CONFIGDIR", self.dir.join("apptainer"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The worker declares its dead-letter queue next to the request queue.
        let dead_letter = schemas::dead_letter_queue(&self.queue);
        delete_queues(
            &self.amqp_url,
            &[&self.queue, &self.reply_queue, &dead_letter],
        )
        .await;
        Ok(())
    }
}

/// Deletes queues, ignoring failures (they may be gone already).
pub async fn delete_queues(amqp_url: &str, queues: &[&str]) {
    let Ok(connection) = Connection::connect(amqp_url, ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        for queue in queues {
            let _ = channel
                .queue_delete((*queue).into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "bench done".into()).await;
}
