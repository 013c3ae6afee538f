//! What the benchmark starts and stops: the worker binary against `fake-apptainer` as child
//! processes (found next to the bench's own executable, run through the shared
//! `orchestrator_harness`, as the integration tests run it), and the bulk seeding of a
//! worker's store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use orchestrator_harness::{self as harness, WorkerSetup};
pub use orchestrator_harness::{delete_exchanges, delete_queues, Binaries};
use orchestrator_worker::store::{ContainerRow, Store};

/// How long a worker may take to start consuming before the run is abandoned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// `orchestrator-worker` and `fake-apptainer` from the bench's own directory, or an error
/// that says which build makes them.
pub fn binaries_next_to_bench() -> anyhow::Result<Binaries> {
    let exe = std::env::current_exe().context("could not locate the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?;
    let found = Binaries {
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

/// How to run one worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub concurrency: u32,
    /// Extra environment (for fake-apptainer: `FAKE_APPTAINER_DELAY_MS`, ...).
    pub env: Vec<(String, String)>,
}

/// One worker process and the directory it owns.
pub struct WorkerProcess {
    /// The worker's `--exchange`.
    pub exchange: String,
    pub dir: PathBuf,
    process: harness::WorkerProcess,
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
        let id = uuid::Uuid::new_v4().simple().to_string();
        let exchange = format!("bench.{label}.{id}");
        let node = format!("bench-{}", &id[..12]);
        let reply_queue = format!("bench.{label}.{id}.replies");
        let mut setup = WorkerSetup::new(amqp_url, dir, &exchange, &node, &reply_queue);
        setup.concurrency = spec.concurrency;
        setup.env = spec.env.clone();
        let process = harness::WorkerProcess::start(bins, setup)
            .with_context(|| format!("could not start {}", bins.worker.display()))?;
        Ok(Self {
            exchange,
            dir: dir.to_owned(),
            process,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid().expect("the worker runs until stopped")
    }

    /// Polls the host queue's consumer count until the worker consumes; returns how long
    /// that took from `since`.
    pub async fn wait_until_consuming(&mut self, since: Instant) -> anyhow::Result<Duration> {
        match self
            .process
            .wait_until_consuming(READY_TIMEOUT, Duration::from_millis(5))
            .await
        {
            Ok(()) => Ok(since.elapsed()),
            Err(e) => bail!("{e}; its log:\n{}", self.process.log_tail(20)),
        }
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
        Ok(self.process.control_fake(lines)?)
    }

    /// Whether fake-apptainer has begun a `build` (its log has a line for one).
    pub fn build_began(&self) -> bool {
        std::fs::read_to_string(self.dir.join("fake.log"))
            .map(|log| log.lines().any(|l| l.contains("\"build\"")))
            .unwrap_or(false)
    }

    /// Stops the worker (SIGTERM, then SIGKILL after a deadline), stops every instance it
    /// started and deletes its queues.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.process.terminate(STOP_TIMEOUT).await?;
        self.process.stop_instances();
        self.process.delete_queues().await;
        Ok(())
    }
}
