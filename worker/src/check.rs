//! `orchestrator-worker --check`: what an operator runs first on a new host (and systemd before
//! each start). Each check says what it found or why it failed and what to do about it.
//!
//! Nothing is consumed and no container is touched; the only writes are a probe file in the data
//! directory and a probe row in the state database.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::runtime::{Apptainer, Limits, Runtime};
use crate::settings::Settings;
use crate::store::Store;
use schemas::NodeId;

/// How long the broker check may take before it counts as unreachable.
const BROKER_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `apptainer --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Result<String, Failure>,
}

/// Why a check failed, and what the operator can do.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: String,
    pub fix: String,
}

fn failed(reason: impl Into<String>, fix: impl Into<String>) -> Result<String, Failure> {
    Err(Failure {
        reason: reason.into(),
        fix: fix.into(),
    })
}

/// Every check, in the order they ran.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome.is_ok())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            match &check.outcome {
                Ok(found) => writeln!(f, "ok      {}: {found}", check.name)?,
                Err(failure) => writeln!(
                    f,
                    "FAILED  {}: {}\n        fix: {}",
                    check.name, failure.reason, failure.fix
                )?,
            }
        }
        let failed = self.checks.iter().filter(|c| c.outcome.is_err()).count();
        if failed == 0 {
            write!(f, "all {} checks passed", self.checks.len())
        } else {
            write!(f, "{failed} of {} checks FAILED", self.checks.len())
        }
    }
}

/// A check that a worker must pass before it takes any request, and failed.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {}; fix: {}", failure.reason, failure.fix)]
pub struct Unfit {
    pub name: &'static str,
    pub failure: Failure,
}

/// The checks of `--check` without which a worker would take requests it can never answer:
/// the data directory and its state database must accept writes, and apptainer must answer.
/// [`crate::Worker::build`] runs them, so a worker that cannot work exits at once with the
/// check's fix instead of consuming requests (the broker is checked by connecting to it).
pub async fn fit_to_start(settings: &Settings) -> Result<(), Unfit> {
    check_data_dir(settings).await.map_err(|failure| Unfit {
        name: "data directory",
        failure,
    })?;
    check_apptainer(settings).await.map_err(|failure| Unfit {
        name: "apptainer",
        failure,
    })?;
    Ok(())
}

/// Runs every check (a failed one does not stop the others).
pub async fn run(settings: &Settings) -> Report {
    let node = settings.node_id();
    let checks = vec![
        Check {
            name: "settings",
            outcome: node
                .clone()
                .map_err(|reason| Failure {
                    reason,
                    fix: "give --node / ORCHESTRATOR_NODE a valid node id".into(),
                })
                .and_then(|node| check_settings(settings, &node)),
        },
        Check {
            name: "data directory",
            outcome: check_data_dir(settings).await,
        },
        Check {
            name: "broker",
            outcome: match &node {
                Ok(node) => check_broker(settings, node).await,
                Err(reason) => failed(
                    reason.clone(),
                    "give --node / ORCHESTRATOR_NODE a valid node id",
                ),
            },
        },
        Check {
            name: "apptainer",
            outcome: check_apptainer(settings).await,
        },
    ];
    Report { checks }
}

fn check_settings(settings: &Settings, node: &NodeId) -> Result<String, Failure> {
    if let Err(e) = settings.amqp_url.parse::<lapin::uri::AMQPUri>() {
        return failed(
            format!(
                "the broker URL {} cannot be read: {e}",
                settings.redacted_amqp_url()
            ),
            "set --amqp-url / AMQP_URL to amqp://USER:PASSWORD@HOST:PORT/VHOST",
        );
    }
    if let Err(reason) = settings.http_listen_addr() {
        return failed(
            reason,
            "use a 127.0.0.1 or [::1] address, or add --http-allow-remote",
        );
    }
    if !settings.allowed_bind_roots.is_empty() {
        for root in &settings.allowed_bind_roots {
            if !root.is_dir() {
                return failed(
                    format!(
                        "the allowed bind root {} is not a directory",
                        root.display()
                    ),
                    "create it, or fix --allowed-bind-roots / ORCHESTRATOR_ALLOWED_BIND_ROOTS",
                );
            }
        }
    }
    Ok(format!(
        "node {node}, exchange {}, broker {}",
        settings.exchange.exchange(),
        settings.redacted_amqp_url()
    ))
}

async fn check_data_dir(settings: &Settings) -> Result<String, Failure> {
    let dir = &settings.data_dir;
    let fix = format!(
        "create {} and give the worker's user write access to it, or point --data-dir / ORCHESTRATOR_DATA_DIR elsewhere",
        dir.display()
    );
    if let Err(e) = std::fs::create_dir_all(dir) {
        return failed(format!("could not create {}: {e}", dir.display()), fix);
    }
    if let Err(e) = write_and_remove_probe(dir) {
        return failed(format!("{} is not writable: {e}", dir.display()), fix);
    }
    let store = match Store::open(&settings.state_db()) {
        Ok(store) => store,
        Err(e) => {
            return failed(
                format!(
                    "the state database {} does not open: {e}",
                    settings.state_db().display()
                ),
                fix,
            )
        }
    };
    if let Err(e) = store.probe_writable().await {
        return failed(
            format!(
                "the state database {} refuses writes: {e}",
                settings.state_db().display()
            ),
            "free disk space, or check the file's owner and permissions",
        );
    }
    Ok(format!(
        "{} is writable; the state database opens and accepts writes",
        dir.display()
    ))
}

fn write_and_remove_probe(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".check-{}", std::process::id()));
    std::fs::write(&probe, b"orchestrator-worker --check\n")?;
    std::fs::remove_file(&probe)
}

async fn check_broker(settings: &Settings, node: &NodeId) -> Result<String, Failure> {
    let broker = Broker::new(settings, node);
    match tokio::time::timeout(BROKER_CHECK_TIMEOUT, broker.check()).await {
        Ok(Ok(())) => Ok(format!(
            "connected to {} and declared the fleet's topology on the exchange {} (this host's \
             queue {}), {} and {}",
            settings.redacted_amqp_url(),
            broker.topology.exchange(),
            broker.host_queue(),
            broker.reply_queue,
            broker.dead_letter_queue
        )),
        Ok(Err(e)) => failed(
            e.to_string(),
            "start RabbitMQ or fix --amqp-url / AMQP_URL (host, port, credentials, vhost)",
        ),
        Err(_) => failed(
            format!(
                "no answer from {} within {}s",
                settings.redacted_amqp_url(),
                BROKER_CHECK_TIMEOUT.as_secs()
            ),
            "check that the host and port are right and that no firewall drops the connection",
        ),
    }
}

async fn check_apptainer(settings: &Settings) -> Result<String, Failure> {
    // A record directory of its own: the worker's (`run/apptainer-calls`) would make the adapter
    // kill the calls of a worker running on this data directory.
    let records = match tempfile_dir(settings) {
        Ok(dir) => dir,
        Err(e) => {
            return failed(
                format!("could not prepare a scratch directory: {e}"),
                "make the data directory writable",
            )
        }
    };
    let runtime: Arc<dyn Runtime> = match Apptainer::new(
        records.clone(),
        settings.apptainer.clone(),
        settings.network.clone(),
        Limits {
            builds: 1,
            commands: 1,
        },
        settings.stop_grace_secs,
        VERSION_TIMEOUT,
        VERSION_TIMEOUT,
        &settings.apptainer_env,
    ) {
        Ok(runtime) => Arc::new(runtime),
        Err(e) => {
            return failed(
                format!("could not prepare a scratch directory: {e}"),
                "make the data directory writable",
            )
        }
    };
    let version = runtime.version().await;
    let _ = std::fs::remove_dir_all(&records);
    match version {
        Ok(version) => Ok(format!("{} ({version})", settings.apptainer.display())),
        Err(e) => failed(
            e.to_string(),
            "install Apptainer (https://apptainer.org/docs/admin/main/installation.html) or point --apptainer / APPTAINER_BIN at it",
        ),
    }
}

fn tempfile_dir(settings: &Settings) -> std::io::Result<std::path::PathBuf> {
    let dir = settings
        .data_dir
        .join("run")
        .join(format!("check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
