//! Shared test plumbing: a real worker process per test, against the real broker and
//! `fake-apptainer`, with its own exchange (every broker name derives from it), data directory
//! and fake state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orchestrator_harness::{Binaries, WorkerProcess, WorkerSetup};
use orchestrator_producer::{Client, PendingReply, Publish};
use schemas::Reply;
use serde_json::Value;

/// The broker every test uses: the local one, the worker's default.
pub const AMQP_URL: &str = orchestrator_producer::DEFAULT_AMQP_URL;
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn worker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_orchestrator-worker-under-test")
}

pub fn fake_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fake-apptainer")
}

fn binaries() -> Binaries {
    Binaries {
        worker: worker_bin().into(),
        fake: fake_bin().into(),
    }
}

/// The reply schema, compiled once.
fn reply_validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/json/reply.json");
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::validator_for(&schema).unwrap()
    })
}

/// Fails the test when a reply does not validate against `schemas/json/reply.json`.
pub fn assert_valid_reply(reply: &Reply) {
    let value = serde_json::to_value(reply).unwrap();
    let errors: Vec<String> = reply_validator()
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "reply {value} breaks the schema: {errors:?}"
    );
}

/// Options of a test worker.
#[derive(Default, Clone)]
pub struct WorkerOptions {
    pub concurrency: Option<u32>,
    /// Extra command-line arguments of the worker.
    pub args: Vec<String>,
    /// Another data directory (for example on a small file system).
    pub data_dir: Option<PathBuf>,
    /// Extra environment for the worker (and so for fake-apptainer), e.g. FAKE_APPTAINER_DELAY_MS.
    pub env: Vec<(String, String)>,
    /// Run the worker in the test's directory with `--data-dir data`, a relative path.
    pub relative_data_dir: bool,
    /// Join this fleet (`--exchange`) instead of a fresh one of the test's own.
    pub exchange: Option<String>,
    /// `--node`; a fresh one by default.
    pub node: Option<String>,
    /// The broker of the worker and of its client: [`AMQP_URL`] by default (a private broker,
    /// or the shared one with URL options such as `?heartbeat=5`).
    pub amqp_url: Option<String>,
}

/// One worker process with everything it owns.
pub struct TestWorker {
    /// The worker's node id; its broker connections are named after it.
    pub node: String,
    /// The fleet's exchange: requests are published to it.
    pub exchange: String,
    pub reply_queue: String,
    pub dir: tempfile::TempDir,
    pub client: Client,
    process: WorkerProcess,
}

pub async fn spawn_worker() -> TestWorker {
    spawn_worker_with(WorkerOptions::default()).await
}

pub async fn spawn_worker_with(options: WorkerOptions) -> TestWorker {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::Builder::new()
        .prefix("orchestrator-test-")
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("data/volumes")).unwrap();
    let exchange = options.exchange.unwrap_or_else(|| format!("test.{id}"));
    let reply_queue = format!("test.replies.{id}");
    let node = options.node.unwrap_or_else(|| format!("test-{id}"));
    let amqp_url = options.amqp_url.unwrap_or_else(|| AMQP_URL.to_owned());
    let setup = WorkerSetup::new(&amqp_url, dir.path(), &exchange, &node, &reply_queue);
    let mut setup = setup;
    setup.data_dir = match (options.data_dir, options.relative_data_dir) {
        (Some(data), _) => data,
        (None, true) => PathBuf::from("data"),
        (None, false) => dir.path().join("data"),
    };
    setup.concurrency = options.concurrency.unwrap_or(4);
    setup.args = options.args;
    setup.env = [("RUST_LOG".to_owned(), "info,lapin=warn".to_owned())]
        .into_iter()
        .chain(options.env)
        .collect();
    let process = WorkerProcess::start(&binaries(), setup).expect("the worker binary starts");
    let mut worker = TestWorker {
        node,
        client: Client::connect(&amqp_url, &exchange).await.unwrap(),
        exchange,
        reply_queue,
        dir,
        process,
    };
    worker.wait_until_consuming().await;
    worker
}

impl TestWorker {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(&self.process.setup.data_dir)
    }

    /// A new directory under the default allowed bind root.
    pub fn volume(&self, name: &str) -> String {
        let path = self.data_dir().join("volumes").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path.display().to_string()
    }

    /// Changes fake-apptainer's behaviour for the calls the worker makes from now on
    /// (`FAIL=build`, `DELAY_MS=build=2000`, ...); an empty slice restores normal behaviour.
    pub fn control_fake(&self, lines: &[&str]) {
        self.process.control_fake(lines).unwrap();
    }

    /// This worker's host queue.
    pub fn host_queue(&self) -> String {
        self.process.setup.host_queue()
    }

    /// The fleet's names.
    pub fn topology(&self) -> schemas::Topology {
        self.process.setup.topology()
    }

    /// Waits until the worker's consumer is registered on its host queue.
    async fn wait_until_consuming(&mut self) {
        if let Err(e) = self
            .process
            .wait_until_consuming(READY_TIMEOUT, Duration::from_millis(50))
            .await
        {
            panic!("{e}; log:\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Kills the worker process at once (SIGKILL): no drain, no flush.
    /// The worker process's id while it runs (to stop or kill it with a signal).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Sends SIGTERM and waits (at most `limit`) for the worker to exit; returns its status.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        match self.process.terminate(limit).await.unwrap() {
            Some(status) => status,
            None => panic!(
                "the worker did not exit within {limit:?} of SIGTERM; log:\n{}",
                self.log()
            ),
        }
    }

    /// Starts the worker again on the same queues, data directory and fake state.
    pub async fn restart(&mut self) {
        self.process.restart().expect("kill the worker first");
        self.wait_until_consuming().await;
    }

    /// Removes `name` from the environment the worker is started with from now on.
    pub fn remove_env(&mut self, name: &str) {
        self.process.setup.env.retain(|(key, _)| key != name);
    }

    /// Waits (at most `limit`) for the worker process to exit on its own; its status.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_for_exit(limit).await
    }

    /// Publishes a request and awaits its final reply, which must validate against the schema.
    pub async fn call(&self, request: Value) -> Reply {
        let reply = self
            .client
            .call_raw(
                request.to_string().as_bytes(),
                Publish::default(),
                REPLY_TIMEOUT,
            )
            .await
            .unwrap_or_else(|e| panic!("no reply to {request}: {e}; worker log:\n{}", self.log()));
        assert_valid_reply(&reply);
        reply
    }

    /// Publishes a request and returns a handle on its reply.
    pub async fn send(&self, request: Value, options: Publish) -> PendingReply {
        self.client
            .send(request.to_string().as_bytes(), options)
            .await
            .unwrap()
    }

    /// Every invocation fake-apptainer finished, in the order they ended.
    pub fn fake_calls(&self) -> Vec<FakeCall> {
        let text = std::fs::read_to_string(self.dir.path().join("fake.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v.get("end_ms").is_some())
            .map(|v| FakeCall {
                argv: v["argv"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect(),
                start_ms: v["start_ms"].as_i64().unwrap(),
                end_ms: v["end_ms"].as_i64().unwrap(),
                exit: v["exit"].as_i64().unwrap(),
            })
            .collect()
    }

    /// Finished invocations that act on the host: everything but `instance list`, which the
    /// reconciler also runs on its own, and `--version`, the worker's start-up check.
    pub fn fake_actions(&self) -> Vec<FakeCall> {
        self.fake_calls()
            .into_iter()
            .filter(|c| !matches!(c.subcommand().as_str(), "instance list" | "--version"))
            .collect()
    }

    /// Invocations that have begun (including ones still running or killed).
    pub fn fake_calls_begun(&self) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(self.dir.path().join("fake.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v["event"] == "begin")
            .map(|v| {
                v["argv"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect()
            })
            .collect()
    }

    /// How many `build`s fake-apptainer has begun (finished or not).
    pub fn builds_begun(&self) -> usize {
        self.fake_calls_begun()
            .iter()
            .filter(|argv| argv.first().is_some_and(|a| a == "build"))
            .count()
    }

    /// Waits (at most `limit`) until fake-apptainer has begun `count` builds.
    pub async fn wait_for_builds_begun(&self, count: usize, limit: Duration) {
        let what = format!("build number {count} beginning");
        let every = Duration::from_millis(20);
        poll_until(&what, limit, every, async || self.builds_begun() >= count).await;
    }

    /// Instances fake-apptainer has running, as `instance list --json` reports them.
    pub fn running_instances(&self) -> Vec<String> {
        let output = Command::new(fake_bin())
            .args(["instance", "list", "--json"])
            .env("APPTAINER_CONFIGDIR", self.dir.path().join("apptainer"))
            .output()
            .unwrap();
        let list: Value = serde_json::from_slice(&output.stdout).unwrap();
        list["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["instance"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.process.kill();
        self.process.stop_instances();
        // On a runtime of its own, on a thread of its own: Drop may run inside the test's.
        let process = &self.process;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(process.delete_queues())
            });
        });
    }
}

/// One finished invocation of fake-apptainer.
#[derive(Debug, Clone)]
pub struct FakeCall {
    pub argv: Vec<String>,
    pub start_ms: i64,
    pub end_ms: i64,
    pub exit: i64,
}

impl FakeCall {
    /// `build`, `instance start`, ...: the subcommand, without its options.
    pub fn subcommand(&self) -> String {
        match self.argv.first().map(String::as_str) {
            Some("instance") => {
                format!("instance {}", self.argv.get(1).cloned().unwrap_or_default())
            }
            Some(other) => other.to_owned(),
            None => String::new(),
        }
    }

    /// Whether the invocation names `container` (as an instance or an image path).
    pub fn concerns(&self, container: &str) -> bool {
        self.argv
            .iter()
            .any(|a| a == container || a.ends_with(&format!("/images/{container}")))
    }
}

/// A `start` request for `name` with the fields every start needs.
pub fn start_request(name: &str) -> Value {
    serde_json::json!({
        "op": "start",
        "container_name": name,
        "container_image": "jupyter/base-notebook",
        "image_distributor": "docker",
        "image_os": "jupyter/base-notebook",
        "image_version": "latest",
        "container_command": ["jupyter lab --no-browser"]
    })
}

pub fn named(op: &str, name: &str) -> Value {
    serde_json::json!({"op": op, "container_name": name})
}

/// A reply queue of the test's own (exclusive, consumed without acks) that sees every reply
/// sent to it, duplicates included, and a confirm-mode channel to publish with AMQP properties
/// the `Client` does not set. For tests where the raw envelope is the point; the others call
/// through [`TestWorker::call`].
pub struct RawClient {
    pub connection: Connection,
    pub channel: lapin::Channel,
    pub reply_queue: String,
    pub replies: lapin::Consumer,
}

/// A connection to `url` and a channel on it in confirm mode.
pub async fn confirm_channel(url: &str) -> (Connection, lapin::Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    (connection, channel)
}

pub async fn raw_client() -> RawClient {
    use lapin::options::BasicConsumeOptions;
    let (connection, channel) = confirm_channel(AMQP_URL).await;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let replies = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    RawClient {
        reply_queue: queue.name().as_str().to_owned(),
        connection,
        channel,
        replies,
    }
}

impl RawClient {
    /// Publishes `body` to the fleet's `exchange` (routing key: its container name) with
    /// exactly `properties`, made persistent and with this client's queue as `reply_to`,
    /// through the producer's `publish_routed`; fails the test unless the broker confirms it
    /// into a queue.
    pub async fn publish(&self, exchange: &str, body: &Value, properties: BasicProperties) {
        let properties = properties
            .with_reply_to(self.reply_queue.as_str().into())
            .with_delivery_mode(2);
        let body = body.to_string();
        let key = orchestrator_producer::routing_key_of(body.as_bytes());
        let confirmation = orchestrator_producer::publish_routed(
            &self.channel,
            exchange,
            &key,
            body.as_bytes(),
            properties,
        )
        .await
        .unwrap();
        assert!(confirmation.is_ack(), "the broker refused {body}");
        assert!(
            confirmation.take_message().is_none(),
            "{exchange} routed {body} nowhere: it came back"
        );
    }

    /// The next envelope on this client's queue, within [`REPLY_TIMEOUT`].
    pub async fn next_reply(&mut self) -> Reply {
        use futures_lite::StreamExt;
        let delivery = tokio::time::timeout(REPLY_TIMEOUT, self.replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        serde_json::from_slice(&delivery.data).unwrap()
    }
}

/// Polls `check` every 100 ms until it holds; fails the test, naming `what`, after `limit`.
pub async fn eventually(what: &str, limit: Duration, check: impl AsyncFnMut() -> bool) {
    poll_until(what, limit, Duration::from_millis(100), check).await;
}

/// Polls `check` every `every` until it holds; fails the test, naming `what`, after `limit`.
pub async fn poll_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// A loopback port nothing listens on right now (bound, read, released).
pub fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Deletes everything a fleet `exchange` declared on the broker: its shared queues, the host
/// queues of `nodes`, `extra_queues` and its exchanges.
pub async fn delete_fleet(exchange: &str, nodes: &[&str], extra_queues: &[&str]) {
    let topology = schemas::Topology::new(exchange).unwrap();
    let mut queues = orchestrator_harness::fleet_queues(&topology);
    for node in nodes {
        queues.push(topology.host_queue(&schemas::NodeId::parse(node).unwrap()));
    }
    queues.extend(extra_queues.iter().map(|q| (*q).to_owned()));
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    orchestrator_harness::delete_queues(AMQP_URL, &names).await;
    orchestrator_harness::delete_exchanges(AMQP_URL, &topology).await;
}

/// Whether some host of the fleet `exchange` owns `name` now: a probe (AMQP type
/// `orchestrator.probe`, which hosts acknowledge and drop) published mandatory to
/// `<exchange>.owners` with the name as routing key is routed, not returned.
pub async fn is_owned(channel: &lapin::Channel, exchange: &str, name: &str) -> bool {
    let owners = schemas::Topology::new(exchange).unwrap().owners();
    let properties = BasicProperties::default().with_type(schemas::PROBE_TYPE.into());
    let confirmation =
        orchestrator_producer::publish_routed(channel, &owners, name, b"{}", properties)
            .await
            .unwrap();
    confirmation.take_message().is_none()
}

/// Waits (at most `limit`) until some host of the fleet `exchange` owns `name`.
pub async fn wait_until_owned(exchange: &str, name: &str, limit: Duration) {
    let raw = raw_client().await;
    let what = format!("{name} being owned by a host of {exchange}");
    poll_until(&what, limit, Duration::from_millis(10), async || {
        is_owned(&raw.channel, exchange, name).await
    })
    .await;
    let _ = raw.connection.close(200, "done".into()).await;
}
