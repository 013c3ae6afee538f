//! `orchestrator_harness`: the worker as a child process against `fake-apptainer`, the one
//! place that knows how to run it for the integration tests (`tests/api`) and the benchmark
//! (`bench/`). It starts the worker in a directory of its own, waits until it consumes, stops
//! it (SIGTERM, then SIGKILL), stops the fake's instances and deletes the worker's queues.
//!
//! It makes no assertions and finds no binaries: the tests pass `CARGO_BIN_EXE_` paths, the
//! bench the binaries next to itself ([`Binaries`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use schemas::{NodeId, Topology};

/// The binaries a worker process needs: the worker and the `apptainer` it runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub worker: PathBuf,
    pub fake: PathBuf,
}

/// How to run one worker; everything it writes is under `dir`.
#[derive(Debug, Clone)]
pub struct WorkerSetup {
    pub amqp_url: String,
    /// The worker's working directory: `worker.log`, fake-apptainer's `apptainer/` state,
    /// `fake.log` and `fake.control`.
    pub dir: PathBuf,
    /// `--data-dir`: absolute, or relative to `dir`.
    pub data_dir: PathBuf,
    /// `--exchange`: the fleet's names derive from it.
    pub exchange: String,
    pub reply_queue: String,
    /// `--node`: names the worker's host queue.
    pub node: String,
    pub concurrency: u32,
    /// Extra command-line arguments, before `--amqp-url` and `--concurrency`.
    pub args: Vec<String>,
    /// Extra environment (for fake-apptainer: `FAKE_APPTAINER_DELAY_MS`, ...), set last.
    pub env: Vec<(String, String)>,
}

impl WorkerSetup {
    /// A worker `node` of the fleet `exchange` in `dir`, with its data in `dir/data`, four
    /// builds at once.
    pub fn new(amqp_url: &str, dir: &Path, exchange: &str, node: &str, reply_queue: &str) -> Self {
        Self {
            amqp_url: amqp_url.to_owned(),
            dir: dir.to_owned(),
            data_dir: dir.join("data"),
            exchange: exchange.to_owned(),
            reply_queue: reply_queue.to_owned(),
            node: node.to_owned(),
            concurrency: 4,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The fleet's names.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.exchange).expect("a valid exchange name")
    }

    /// This worker's host queue.
    pub fn host_queue(&self) -> String {
        self.topology()
            .host_queue(&NodeId::parse(&self.node).expect("a valid node id"))
    }

    /// The queues the worker declares: its host queue, the fleet's shared queues, its default
    /// reply queue and the dead-letter queue.
    pub fn queues(&self) -> Vec<String> {
        let mut queues = fleet_queues(&self.topology());
        queues.push(self.host_queue());
        queues.push(self.reply_queue.clone());
        queues
    }

    /// The worker's command line and environment: fake-apptainer as `apptainer`, with its
    /// state, log and control file under `dir`.
    fn command(&self, bins: &Binaries) -> std::io::Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("worker.log"))?;
        let mut command = Command::new(&bins.worker);
        command
            .args([
                "--exchange",
                &self.exchange,
                "--reply-queue",
                &self.reply_queue,
            ])
            .args(["--node", &self.node])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .current_dir(&self.dir)
            .args(&self.args)
            .args(["--amqp-url", &self.amqp_url])
            .args(["--concurrency", &self.concurrency.to_string()])
            .envs(fake_env(&bins.fake, &self.dir))
            // The worker passes apptainer only the variables it is told to.
            .env("ORCHESTRATOR_APPTAINER_ENV", "FAKE_APPTAINER_*")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Ok(command)
    }
}

/// The environment that makes a worker run `fake` as `apptainer`, with the fake's state
/// (`apptainer/`), log (`fake.log`) and control file (`fake.control`) under `dir`.
pub fn fake_env(fake: &Path, dir: &Path) -> [(&'static str, PathBuf); 4] {
    [
        ("APPTAINER_BIN", fake.to_owned()),
        ("APPTAINER_CONFIGDIR", dir.join("apptainer")),
        ("FAKE_APPTAINER_LOG", dir.join("fake.log")),
        ("FAKE_APPTAINER_CONTROL", dir.join("fake.control")),
    ]
}

/// Why a worker is not consuming.
#[derive(Debug)]
pub enum NotReady {
    Exited(ExitStatus),
    TimedOut(Duration),
    Broker(lapin::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "the worker exited with {status}"),
            Self::TimedOut(limit) => write!(f, "the worker did not consume within {limit:?}"),
            Self::Broker(e) => write!(f, "could not reach the broker: {e}"),
            Self::Io(e) => write!(f, "could not watch the worker process: {e}"),
        }
    }
}

impl std::error::Error for NotReady {}

/// One worker process (or none, between [`WorkerProcess::kill`] and
/// [`WorkerProcess::restart`]) and how it was started.
pub struct WorkerProcess {
    pub setup: WorkerSetup,
    bins: Binaries,
    child: Option<Child>,
}

impl WorkerProcess {
    /// Starts a worker as `setup` says, creating `dir/apptainer` and the default bind root
    /// `data_dir/volumes` first.
    pub fn start(bins: &Binaries, setup: WorkerSetup) -> std::io::Result<Self> {
        std::fs::create_dir_all(setup.dir.join("apptainer"))?;
        std::fs::create_dir_all(setup.dir.join(&setup.data_dir).join("volumes"))?;
        let mut process = Self {
            setup,
            bins: bins.clone(),
            child: None,
        };
        process.restart()?;
        Ok(process)
    }

    /// Starts the worker again on the same queues, data directory and fake state; the
    /// previous process must have been killed or terminated.
    pub fn restart(&mut self) -> std::io::Result<()> {
        assert!(self.child.is_none(), "stop the worker first");
        self.child = Some(self.setup.command(&self.bins)?.spawn()?);
        Ok(())
    }

    /// The process id, while the worker runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Polls (every `every`, at most `limit`) the host queue's consumer count until the
    /// worker consumes; fails at once when the process exits.
    pub async fn wait_until_consuming(
        &mut self,
        limit: Duration,
        every: Duration,
    ) -> Result<(), NotReady> {
        let connection = Connection::connect(&self.setup.amqp_url, ConnectionProperties::default())
            .await
            .map_err(NotReady::Broker)?;
        let deadline = Instant::now() + limit;
        let result = loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => break Err(NotReady::Exited(status)),
                    Ok(None) => {}
                    Err(e) => break Err(NotReady::Io(e)),
                }
            }
            if orchestrator_producer::consumer_count(&connection, &self.setup.host_queue())
                .await
                .is_ok_and(|consumers| consumers.is_some_and(|n| n > 0))
            {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(NotReady::TimedOut(limit));
            }
            tokio::time::sleep(every).await;
        };
        let _ = connection.close(200, "ready".into()).await;
        result
    }

    /// Waits (at most `limit`) for the worker to exit on its own; its status, or `None` when it
    /// still runs (it is left running).
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the worker at once (SIGKILL): no drain, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits at most `limit` for the worker to exit; returns its status,
    /// or `None` when it had to be killed.
    pub async fn terminate(&mut self, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The worker's log (its stderr, across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.setup.dir.join("worker.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the worker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Changes fake-apptainer's behaviour for the calls the worker makes from now on
    /// (`FAIL=build`, `DELAY_MS=build=2000`, ...); an empty slice restores normal behaviour.
    pub fn control_fake(&self, lines: &[&str]) -> std::io::Result<()> {
        std::fs::write(self.setup.dir.join("fake.control"), lines.join("\n"))
    }

    /// Stops every instance fake-apptainer runs for this worker.
    pub fn stop_instances(&self) {
        let _ = Command::new(&self.bins.fake)
            .args(["instance", "stop", "--all", "--force"])
            .env("APPTAINER_CONFIGDIR", self.setup.dir.join("apptainer"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Deletes the worker's queues ([`WorkerSetup::queues`]) and the fleet's exchanges.
    pub async fn delete_queues(&self) {
        let queues = self.setup.queues();
        let names: Vec<&str> = queues.iter().map(String::as_str).collect();
        delete_queues(&self.setup.amqp_url, &names).await;
        delete_exchanges(&self.setup.amqp_url, &self.setup.topology()).await;
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The queues every worker of the fleet declares, whatever its node: `<ex>.place`,
/// `<ex>.place.start`, `<ex>.expired` and `<ex>.dead`.
pub fn fleet_queues(topology: &Topology) -> Vec<String> {
    vec![
        topology.place(),
        topology.place_start(),
        topology.expired(),
        topology.dead_letters(),
    ]
}

/// Deletes the fleet's exchanges, ignoring failures (they may be gone already).
pub async fn delete_exchanges(amqp_url: &str, topology: &Topology) {
    let Ok(connection) = Connection::connect(amqp_url, ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        for exchange in [
            topology.exchange().to_owned(),
            topology.unrouted(),
            topology.owners(),
            topology.nodes(),
            topology.all(),
            topology.expired(),
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
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
    let _ = connection.close(200, "done".into()).await;
}
