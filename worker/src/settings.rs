//! Worker settings: command-line flags with environment fallbacks, every one in `--help`.
//!
//! Parsing only; nothing here touches the broker, the disk or apptainer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use schemas::{NodeId, Topology};

/// The orchestrator worker: takes container requests from RabbitMQ, runs them through the
/// `apptainer` command line one at a time per container, and publishes a reply envelope to each
/// requester's reply queue with the request's correlation id.
#[derive(Debug, Clone, Parser)]
#[command(name = "orchestrator-worker", version, about, long_about = None)]
pub struct Settings {
    /// AMQP URL of the broker (amqp:// or amqps://). The password is never logged, and a value
    /// from the environment is not shown here; the default is RabbitMQ's local guest account.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// The fleet's exchange: clients publish every request to it with the container's name as
    /// routing key. Every other broker name derives from it (`<exchange>.place`,
    /// `<exchange>.host.<node>`, ...); every worker of one fleet uses the same exchange.
    #[arg(long, env = "ORCHESTRATOR_EXCHANGE", default_value = schemas::DEFAULT_EXCHANGE, value_parser = topology)]
    pub exchange: Topology,

    /// The type of the durable queues this worker declares for the fleet (its host queue,
    /// `<exchange>.place`, `<exchange>.place.start`, `<exchange>.expired`): `quorum` (replicated
    /// on a RabbitMQ cluster; the default) or `classic`. Every worker of a fleet must use the
    /// same type: a queue that exists with another type is refused at start-up.
    #[arg(long, env = "ORCHESTRATOR_QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,

    /// Most container instances this host runs at once; a `start` of a new name is taken by
    /// this host only while it has room (running containers plus starts placed here and not yet
    /// finished). Starts beyond the fleet's room wait, in order, until a host has room.
    /// Default: unlimited.
    #[arg(long, env = "ORCHESTRATOR_MAX_CONTAINERS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_containers: Option<u32>,

    /// After an unclean end of the previous run in this data directory, how long to wait, in
    /// seconds, for the broker to drop that run's connection, which still holds this node's
    /// lease (`<exchange>.alive.<node>`); the broker drops a dead connection after missed
    /// heartbeats. After a clean end, a held lease means another worker runs with this node
    /// id, and the worker exits at once.
    #[arg(long, env = "ORCHESTRATOR_LEASE_WAIT", default_value_t = 120)]
    pub lease_wait_secs: u64,

    /// Durable queue for replies to requests that carry no `reply_to`.
    #[arg(long, env = "ORCHESTRATOR_REPLY_QUEUE", default_value = schemas::DEFAULT_REPLY_QUEUE, value_parser = reply_queue_name)]
    pub reply_queue: String,

    /// Directory for the state database, images and definition files.
    #[arg(
        long,
        env = "ORCHESTRATOR_DATA_DIR",
        default_value = "/var/lib/apptainer-orchestrator"
    )]
    pub data_dir: PathBuf,

    /// The apptainer executable (a name looked up on PATH, or a path).
    #[arg(long, env = "APPTAINER_BIN", default_value = "apptainer")]
    pub apptainer: PathBuf,

    /// How many image builds may run at once: the heavy apptainer calls (CPU, disk, image
    /// downloads). Containers of different names build in parallel up to this many.
    #[arg(long, env = "ORCHESTRATOR_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    /// How many other apptainer commands may run at once (instance start, stop and list,
    /// exec). They have their own limit so that a stop or a start never waits behind builds.
    #[arg(long, env = "ORCHESTRATOR_COMMAND_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub command_concurrency: u32,

    /// How many unacknowledged deliveries the broker may send ahead.
    #[arg(long, env = "ORCHESTRATOR_PREFETCH", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// This worker's node id, unique in the fleet: it names the host's queue and lease, and is
    /// reported in every reply. 1 to 64 characters of letters, digits, `_`, `.` and `-`.
    /// Default: the host name.
    #[arg(long, env = "ORCHESTRATOR_NODE", value_parser = node_id)]
    pub node: Option<NodeId>,

    /// Colon-separated directories that binds and volumes may come from (after symlinks are
    /// resolved). Default: the `volumes` folder of the data directory.
    #[arg(long, env = "ORCHESTRATOR_ALLOWED_BIND_ROOTS", value_delimiter = ':')]
    pub allowed_bind_roots: Vec<PathBuf>,

    /// Apptainer network for instances (`--network`); `none` gives them no network namespace
    /// and no IP of their own. Anything but `none` needs root (or an administrator's allow-list).
    #[arg(long, env = "ORCHESTRATOR_NETWORK", default_value = "bridge")]
    pub network: String,

    /// Where `volume_name` is bound inside the container.
    #[arg(long, env = "ORCHESTRATOR_HOME_MOUNT", default_value = schemas::DEFAULT_HOME_MOUNT)]
    pub home_mount: String,

    /// More environment variables to pass to apptainer, comma-separated (`NAME*` for every
    /// variable starting with NAME). By default it gets only PATH, HOME, USER, LOGNAME, LANG,
    /// LC_*, TZ, TMPDIR, APPTAINER_CONFIGDIR and _CACHEDIR (APPTAINER_TMPDIR is always
    /// `<data-dir>/build-tmp`): apptainer passes its
    /// environment into every container, and other APPTAINER_* variables change its flags.
    #[arg(long, env = "ORCHESTRATOR_APPTAINER_ENV", value_delimiter = ',')]
    pub apptainer_env: Vec<String>,

    /// Longest an image build may take, in seconds, before it is killed.
    #[arg(long, env = "ORCHESTRATOR_BUILD_TIMEOUT", default_value_t = 3600)]
    pub build_timeout_secs: u64,

    /// Longest any other apptainer command may take, in seconds, before it is killed.
    #[arg(long, env = "ORCHESTRATOR_COMMAND_TIMEOUT", default_value_t = 120)]
    pub command_timeout_secs: u64,

    /// Seconds `instance stop` waits for the service before it kills it (`--timeout`).
    #[arg(long, env = "ORCHESTRATOR_STOP_GRACE", default_value_t = 10)]
    pub stop_grace_secs: u64,

    /// On SIGTERM/SIGINT, how long running operations may take to finish, in seconds.
    #[arg(long, env = "ORCHESTRATOR_DRAIN_TIMEOUT", default_value_t = 60)]
    pub drain_timeout_secs: u64,

    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, env = "ORCHESTRATOR_MAX_BODY", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most requests accepted but not yet finished; past it the worker stops taking deliveries
    /// and the broker keeps them.
    #[arg(long, env = "ORCHESTRATOR_MAX_PENDING", default_value_t = 10_000)]
    pub max_pending: usize,

    /// Seconds between comparisons of the records with the instances apptainer runs (one also
    /// runs at start-up); 0 turns the periodic comparison off.
    #[arg(long, env = "ORCHESTRATOR_RECONCILE_INTERVAL", default_value_t = 60)]
    pub reconcile_interval_secs: u64,

    /// What to do with a container whose instance died outside the orchestrator: `restart` it
    /// (as the earlier server did at start-up), or `none` (only record it as stopped).
    #[arg(long, env = "ORCHESTRATOR_RESTORE_POLICY", value_enum, default_value_t = RestorePolicy::Restart)]
    pub restore_policy: RestorePolicy,

    /// How many times a request may be interrupted (the worker dying while running it, or its
    /// delivery coming back unprocessed) before it is given up: answered with an error, and a
    /// delivery moved to the dead-letter queue `<exchange>.dead`.
    #[arg(long, env = "ORCHESTRATOR_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// How many times a reply the broker refuses (its reply queue is full and rejects
    /// publishes) is published before it is set aside: kept in the state database for
    /// `--dedupe-hours`, counted in `orchestrator_replies_set_aside_total`, not sent again. The
    /// attempts are 1 s apart at first, doubling up to a minute; other replies never wait.
    #[arg(long, env = "ORCHESTRATOR_REPLY_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub reply_attempts: u32,

    /// How long a finished request's reply is kept to answer a redelivered duplicate, in hours.
    #[arg(long, env = "ORCHESTRATOR_DEDUPE_HOURS", default_value_t = 24)]
    pub dedupe_hours: u64,

    /// Log lines on stderr: `text` for people (coloured only on a terminal), `json` for log
    /// collectors (one object per line). `RUST_LOG` chooses what is logged.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address of the HTTP listener serving /healthz, /readyz and /metrics (e.g.
    /// 127.0.0.1:9464). Off when unset; only loopback addresses unless --http-allow-remote.
    #[arg(long, env = "ORCHESTRATOR_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// Let --http-addr be a non-loopback address. The endpoints have no authentication: expose
    /// them only on a network where anyone who can reach them may read the metrics.
    #[arg(long, env = "ORCHESTRATOR_HTTP_ALLOW_REMOTE")]
    pub http_allow_remote: bool,

    /// Check the settings, the broker, apptainer and the data directory, print one line per
    /// check and exit: 0 when all pass, 1 otherwise. Nothing is consumed.
    #[arg(long)]
    pub check: bool,
}

/// An empty queue name would only surface later as "the queue  does not exist".
fn queue_name(name: &str, flag: &str, env: &str, default: &str) -> Result<String, String> {
    if name.trim().is_empty() {
        return Err(format!(
            "the queue's name is empty; give {flag} a name, or unset {env} (the default is {default})"
        ));
    }
    Ok(name.to_owned())
}

fn topology(exchange: &str) -> Result<Topology, String> {
    Topology::new(exchange)
}

fn node_id(node: &str) -> Result<NodeId, String> {
    NodeId::parse(node)
}

/// See [`Settings::queue_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

fn reply_queue_name(name: &str) -> Result<String, String> {
    queue_name(
        name,
        "--reply-queue",
        "ORCHESTRATOR_REPLY_QUEUE",
        schemas::DEFAULT_REPLY_QUEUE,
    )
}

/// See [`Settings::log_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// See [`Settings::restore_policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestorePolicy {
    Restart,
    None,
}

impl Settings {
    /// `--node`, or the host name; a host name that is not a valid node id is refused with
    /// what to do.
    pub fn node_id(&self) -> Result<NodeId, String> {
        if let Some(node) = &self.node {
            return Ok(node.clone());
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        NodeId::parse(&host).map_err(|e| {
            format!(
                "{e}; the host name is not usable as a node id, so give --node / ORCHESTRATOR_NODE"
            )
        })
    }

    pub fn state_db(&self) -> PathBuf {
        self.data_dir.join("state.sqlite")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }

    /// Apptainer's `APPTAINER_TMPDIR` (build bundles), emptied at start-up.
    pub fn apptainer_temp_dir(&self) -> PathBuf {
        self.data_dir.join("build-tmp")
    }

    pub fn definitions_dir(&self) -> PathBuf {
        self.data_dir.join("definitions")
    }

    pub fn bind_roots(&self) -> Vec<PathBuf> {
        if self.allowed_bind_roots.is_empty() {
            vec![self.data_dir.join("volumes")]
        } else {
            self.allowed_bind_roots.clone()
        }
    }

    pub fn build_timeout(&self) -> Duration {
        Duration::from_secs(self.build_timeout_secs)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs)
    }

    /// The queue deliveries that keep coming back unprocessed are moved to.
    pub fn dead_letter_queue(&self) -> String {
        self.exchange.dead_letters()
    }

    /// How long to wait for the lease of an uncleanly ended run (`--lease-wait-secs`).
    pub fn lease_wait(&self) -> Duration {
        Duration::from_secs(self.lease_wait_secs)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// The HTTP listener's address, refused when it is not loopback and remote access was not
    /// asked for.
    pub fn http_listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.http_addr {
            Some(addr) if !addr.ip().is_loopback() && !self.http_allow_remote => Err(format!(
                "--http-addr {addr} is not a loopback address; the endpoints have no authentication, so pass --http-allow-remote to serve them on other interfaces"
            )),
            addr => Ok(addr),
        }
    }

    /// The broker URL with its password replaced, for logs and error messages.
    pub fn redacted_amqp_url(&self) -> String {
        redact_url(&self.amqp_url)
    }
}

pub use schemas::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let settings = Settings::try_parse_from(["orchestrator-worker"]).unwrap();
        assert_eq!(settings.exchange.exchange(), "apptainer");
        assert_eq!(settings.queue_type, QueueType::Quorum);
        assert_eq!(settings.max_containers, None);
        assert_eq!(settings.reply_queue, "apptainer.replies");
        assert_eq!(
            settings.bind_roots(),
            [PathBuf::from("/var/lib/apptainer-orchestrator/volumes")]
        );
        assert_eq!(settings.log_format, LogFormat::Text);
        assert_eq!(settings.http_listen_addr(), Ok(None));
    }

    #[test]
    fn the_http_listener_stays_on_loopback_unless_remote_access_is_asked_for() {
        let remote =
            Settings::try_parse_from(["orchestrator-worker", "--http-addr", "0.0.0.0:9464"])
                .unwrap();
        assert!(remote
            .http_listen_addr()
            .unwrap_err()
            .contains("--http-allow-remote"));
        let allowed = Settings::try_parse_from([
            "orchestrator-worker",
            "--http-addr",
            "0.0.0.0:9464",
            "--http-allow-remote",
        ])
        .unwrap();
        assert!(allowed.http_listen_addr().unwrap().is_some());
        let local =
            Settings::try_parse_from(["orchestrator-worker", "--http-addr", "[::1]:9464"]).unwrap();
        assert!(local.http_listen_addr().unwrap().is_some());
    }
}
