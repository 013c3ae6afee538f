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

/// How long a worker may take to start consuming before the run is abandoned, with an empty
/// store; see [`READY_TIME_PER_NAME`].
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// What each container in a worker's store adds to [`READY_TIMEOUT`]: the worker binds every
/// name it holds before it consumes, and the broker takes milliseconds per durable binding
/// (about 3 ms per name, two bindings each, on the 2-core development machine), so 100,000
/// names take minutes.
const READY_TIME_PER_NAME: Duration = Duration::from_millis(10);
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
    /// Extra command-line arguments (`--queue-type classic`, ...).
    pub args: Vec<String>,
    /// How many containers were seeded into its store: each is bound at start-up, and the
    /// readiness deadline allows for that.
    pub seeded: usize,
}

/// One worker process and the directory it owns.
pub struct WorkerProcess {
    /// The worker's `--exchange`.
    pub exchange: String,
    pub dir: PathBuf,
    process: harness::WorkerProcess,
    ready_timeout: Duration,
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
    /// Starts a worker in `dir` (created if needed) on a fresh exchange named after `label`:
    /// a fleet of one.
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
        Self::spawn_member(bins, amqp_url, dir, &exchange, &node, spec)
    }

    /// Starts the worker `node` of the fleet `exchange` in `dir` (created if needed); several
    /// members of one fleet share the exchange and differ in node, directory and fake state.
    pub fn spawn_member(
        bins: &Binaries,
        amqp_url: &str,
        dir: &Path,
        exchange: &str,
        node: &str,
        spec: &WorkerSpec,
    ) -> anyhow::Result<Self> {
        let reply_queue = format!("{exchange}.{node}.replies");
        let mut setup = WorkerSetup::new(amqp_url, dir, exchange, node, &reply_queue);
        setup.concurrency = spec.concurrency;
        setup.env = spec.env.clone();
        setup.args = spec.args.clone();
        let process = harness::WorkerProcess::start(bins, setup)
            .with_context(|| format!("could not start {}", bins.worker.display()))?;
        Ok(Self {
            exchange: exchange.to_owned(),
            dir: dir.to_owned(),
            process,
            ready_timeout: READY_TIMEOUT + READY_TIME_PER_NAME * spec.seeded as u32,
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
            .wait_until_consuming(self.ready_timeout, Duration::from_millis(5))
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

    /// How many names the worker bound at its last connect and how long that took, from its
    /// own log line (`bound this host's container names names=N took=DURATION`); `None` when
    /// the line is not there (yet).
    pub fn startup_binding(&self) -> Option<(usize, Duration)> {
        let log = self.process.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("bound this host's container names"))?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(key))
                .map(str::to_owned)
        };
        let names = field("names=")?.parse().ok()?;
        let took = parse_debug_duration(&field("took=")?)?;
        Some((names, took))
    }

    /// Stops the worker (SIGTERM, then SIGKILL after a deadline), stops every instance it
    /// started and deletes its queues.
    pub async fn stop(self) -> anyhow::Result<()> {
        stop_all(vec![self]).await
    }
}

/// Stops workers that may share one fleet: every one of them first, and only then the
/// instances, queues and exchanges, so that no member is left consuming from a fleet whose
/// exchange is gone.
pub async fn stop_all(workers: Vec<WorkerProcess>) -> anyhow::Result<()> {
    let mut workers = workers;
    let mut first_error = None;
    for worker in &mut workers {
        if let Err(e) = worker.process.terminate(STOP_TIMEOUT).await {
            first_error.get_or_insert(e);
        }
    }
    for worker in &workers {
        worker.process.stop_instances();
        worker.process.delete_queues().await;
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// A `Duration` as its `Debug` form prints it (`3.2s`, `41.5ms`, `812µs`, `90ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" | "us" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_debug_prints_them() {
        for d in [
            Duration::from_millis(3200),
            Duration::from_micros(41_500),
            Duration::from_micros(812),
            Duration::from_nanos(90),
        ] {
            let read = parse_debug_duration(&format!("{d:?}")).expect("parses");
            assert!(
                read.abs_diff(d) < Duration::from_nanos(2),
                "{d:?} read as {read:?}"
            );
        }
        assert_eq!(parse_debug_duration("3 parsecs"), None);
    }
}
