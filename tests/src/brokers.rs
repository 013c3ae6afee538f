//! Private RabbitMQ nodes for the tests that stop, kill or cluster a broker, which they must
//! never do to the shared one on 5672: a thin layer over `tests/cluster/up.sh`, `node.sh` and
//! `down.sh` (the scripts hold all the knowledge of how to run the installed rabbitmq-server
//! beside the shared one; this module only picks ports and folders and bounds every call).
//!
//! Each [`PrivateBroker`] takes a slot of its own (ports and a folder), so tests in one process
//! or in several run in parallel. Its methods block for seconds: in an async test, call them
//! through `tokio::task::block_in_place` on a multi-thread runtime (as
//! `tests/api/private_broker.rs` does), so that the test's other tasks (a worker's connection,
//! a consumer) keep running.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The base port of the first slot: node 1 of slot k listens on `FIRST_BASE_PORT + 20 k`.
/// 5681, the scripts' default, is left to whoever runs `up.sh` by hand.
const FIRST_BASE_PORT: u16 = 5701;
/// Ports one slot spans in each range (AMQP from the base, distribution and the command-line
/// tools from the base + 20000); `common.sh` lays them out.
const SLOT_WIDTH: u16 = 20;
/// How many slots are tried: 5701..6281, which stays below Redis's 6379.
const SLOTS: u16 = 30;
/// Offset from the base of the port whose listener holds the slot: inside the slot's
/// distribution range, used by no node.
const SLOT_LOCK_OFFSET: u16 = 20009;

/// Bounds on each script run; the scripts bound each of their own waits at
/// [`STAGE_TIMEOUT`] too, and say what to do when one passes.
const UP_LIMIT: Duration = Duration::from_secs(300);
const NODE_LIMIT: Duration = Duration::from_secs(150);
const DOWN_LIMIT: Duration = Duration::from_secs(90);
const STAGE_TIMEOUT: Duration = Duration::from_secs(120);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cluster")
        .join(name)
}

/// `nodes` RabbitMQ nodes (1, or 3 joined into one cluster) of the installed rabbitmq-server,
/// on loopback ports of their own, with their data under a folder of their own; stopped and
/// removed on drop.
///
/// Nodes are numbered from 0 here (`url(0)` is `urls()[0]`); the scripts and the node names
/// number them from 1 (`node_name(0)` is `orch-test-<base>-1@localhost`).
pub struct PrivateBroker {
    base_port: u16,
    dir: PathBuf,
    urls: Vec<String>,
    /// Held for the broker's life: while it is bound, no other process takes this slot, and the
    /// kernel frees it when this process dies however it dies.
    _slot: TcpListener,
}

impl PrivateBroker {
    /// Starts `nodes` (1 or 3) nodes and, with 3, waits until the cluster reports 3 running
    /// nodes. Takes 6-16 s for one node and 17-34 s for three on a busy two-core machine.
    /// Panics, with the script's message and fix, when they cannot be started (the nodes'
    /// logs are kept then, as after any failed test: see the `Drop` impl).
    pub fn start(nodes: usize) -> PrivateBroker {
        assert!(
            nodes == 1 || nodes == 3,
            "a private broker has 1 or 3 nodes"
        );
        let (base_port, slot) = take_slot();
        let dir = slot_dir(base_port);
        let mut broker = PrivateBroker {
            base_port,
            dir,
            urls: Vec::new(),
            _slot: slot,
        };
        let stdout = broker
            .run("up.sh", &[&nodes.to_string()], UP_LIMIT)
            .unwrap_or_else(|e| panic!("could not start {nodes} private RabbitMQ node(s): {e}"));
        let last = stdout.lines().last().unwrap_or_default();
        broker.urls = last.split(',').map(str::to_owned).collect();
        assert_eq!(
            broker.urls.len(),
            nodes,
            "up.sh printed {last:?} as its URL line"
        );
        broker
    }

    /// The AMQP URL of every node (guest/guest, vhost `/`), node 0 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The AMQP URLs, comma-separated, as `--amqp-url` takes a list of brokers.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }

    /// The AMQP URL of node `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// Node `i`'s AMQP port.
    pub fn port(&self, i: usize) -> u16 {
        self.check(i);
        self.base_port + i as u16
    }

    /// Node `i`'s Erlang node name, e.g. `orch-test-5701-1@localhost`.
    pub fn node_name(&self, i: usize) -> String {
        self.check(i);
        format!("orch-test-{}-{}@localhost", self.base_port, i + 1)
    }

    /// The folder that holds the nodes' data and logs (`node<i+1>/log/`), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rabbitmqctl stop_app` on node `i` only; returns when its AMQP port is closed. The
    /// Erlang VM keeps running, so the node stays a (stopped) cluster member.
    pub fn stop_app(&self, i: usize) {
        self.node(i, &["stop_app"]);
    }

    /// `rabbitmqctl start_app` on node `i` only; returns when its AMQP port answers again.
    pub fn start_app(&self, i: usize) {
        self.node(i, &["start_app"]);
    }

    /// SIGKILL of node `i`'s Erlang VM (no shutdown at all); returns when the process is gone
    /// and its AMQP port is closed.
    pub fn kill(&self, i: usize) {
        self.node(i, &["kill"]);
    }

    /// Starts node `i`'s Erlang VM again after [`kill`](Self::kill) (it rejoins its cluster,
    /// whose member it still is); returns when its AMQP port answers. A no-op when it runs.
    pub fn start_node(&self, i: usize) {
        self.node(i, &["start"]);
    }

    /// The nodes that node `i` reports as running in its cluster (`rabbitmq-diagnostics
    /// cluster_status`).
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        let json = self.rabbitmqctl_tool(
            i,
            "rabbitmq-diagnostics",
            &["-q", "cluster_status", "--formatter", "json"],
        );
        let status: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("cluster_status of node {i} is not JSON ({e}): {json}"));
        status["running_nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("cluster_status of node {i} has no running_nodes: {json}"))
            .iter()
            .filter_map(|node| node.as_str().map(str::to_owned))
            .collect()
    }

    /// `rabbitmqctl -n NODE ARGS...` on node `i`; its standard output. For what the methods
    /// above do not cover: `list_queues`, `set_policy`, `close_all_connections`, ...
    pub fn rabbitmqctl(&self, i: usize, args: &[&str]) -> String {
        self.rabbitmqctl_tool(i, "rabbitmqctl", args)
    }

    /// `tool -n NODE ARGS...` on node `i`, where `tool` is `rabbitmqctl`,
    /// `rabbitmq-diagnostics` or `rabbitmq-queues`; its standard output.
    pub fn rabbitmqctl_tool(&self, i: usize, tool: &str, args: &[&str]) -> String {
        let mut all = vec![tool];
        all.extend_from_slice(args);
        self.node(i, &all)
    }

    fn node(&self, i: usize, args: &[&str]) -> String {
        self.check(i);
        let number = (i + 1).to_string();
        let mut all = vec![number.as_str()];
        all.extend_from_slice(args);
        self.run("node.sh", &all, NODE_LIMIT)
            .unwrap_or_else(|e| panic!("node {i} of the private broker: {args:?} failed: {e}"))
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.urls.len(),
            "node {i} is not one of the private broker's {} node(s)",
            self.urls.len()
        );
    }

    /// Copies every node's `log/` to a folder that outlives the broker, for a failed test.
    fn keep_logs(&self) {
        let kept = std::env::temp_dir().join("orch-test-brokers").join(format!(
            "logs-{}-{}",
            self.base_port,
            std::process::id()
        ));
        for node in ["node1", "node2", "node3"] {
            let from = self.dir.join(node).join("log");
            if !from.exists() {
                continue;
            }
            let to = kept.join(node);
            let copied = std::fs::create_dir_all(&to).and_then(|()| {
                for entry in std::fs::read_dir(&from)? {
                    let entry = entry?;
                    std::fs::copy(entry.path(), to.join(entry.file_name()))?;
                }
                Ok(())
            });
            if let Err(e) = copied {
                eprintln!("could not keep the logs of {}: {e}", from.display());
            }
        }
        eprintln!("the private broker's logs are kept in {}", kept.display());
    }

    /// Runs one of the scripts for this broker's slot, at most `limit`; its stdout, or what
    /// went wrong with its stderr.
    fn run(&self, name: &str, args: &[&str], limit: Duration) -> Result<String, String> {
        run_script(name, args, self.base_port, &self.dir, limit)
    }
}

impl Drop for PrivateBroker {
    /// Stops the nodes and removes their folder (`down.sh`); a failure is printed, not raised,
    /// since a drop may run while a failed test unwinds, and then the nodes' logs are kept
    /// (the path is printed). The slot is freed after it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_logs();
        }
        if let Err(e) = self.run("down.sh", &[], DOWN_LIMIT) {
            eprintln!(
                "could not stop the private broker in {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// The folder of the nodes in the slot with base port `base`.
fn slot_dir(base: u16) -> PathBuf {
    std::env::temp_dir()
        .join("orch-test-brokers")
        .join(format!("slot-{base}"))
}

/// A free slot: its base port and the listener that holds it. A slot whose folder is still
/// there was left by a process that died without its drop (no live process can hold it, since
/// we hold its lock now): its nodes are stopped first. A slot whose ports something else holds
/// is passed over.
fn take_slot() -> (u16, TcpListener) {
    for k in 0..SLOTS {
        let base = FIRST_BASE_PORT + k * SLOT_WIDTH;
        let Ok(lock) = TcpListener::bind(("127.0.0.1", base + SLOT_LOCK_OFFSET)) else {
            continue;
        };
        let dir = slot_dir(base);
        if dir.exists() {
            if let Err(e) = run_script("down.sh", &[], base, &dir, DOWN_LIMIT) {
                eprintln!("passing over slot {base}: its leftover nodes would not stop: {e}");
                continue;
            }
        }
        let ports = (0..3).flat_map(|i| [base + i, base + 20000 + i]);
        if ports
            .into_iter()
            .all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        {
            return (base, lock);
        }
    }
    panic!(
        "no free slot for a private broker among base ports {FIRST_BASE_PORT}..{}: stop what \
         holds them (ss -ltnp), or the leftover nodes (ORCH_TEST_BROKER_BASE_PORT=BASE \
         ORCH_TEST_BROKER_DIR={}/slot-BASE tests/cluster/down.sh)",
        FIRST_BASE_PORT + (SLOTS - 1) * SLOT_WIDTH,
        std::env::temp_dir().join("orch-test-brokers").display()
    )
}

/// Runs `tests/cluster/<name>` for the slot `base`/`dir` in a process group of its own, killed
/// (the group: the rabbitmqctl it runs too) when it takes longer than `limit`.
fn run_script(
    name: &str,
    args: &[&str],
    base: u16,
    dir: &Path,
    limit: Duration,
) -> Result<String, String> {
    let child = Command::new("bash")
        .arg(script(name))
        .args(args)
        .env("ORCH_TEST_BROKER_BASE_PORT", base.to_string())
        .env("ORCH_TEST_BROKER_DIR", dir)
        .env(
            "ORCH_TEST_BROKER_TIMEOUT",
            STAGE_TIMEOUT.as_secs().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not run {name}: {e}"))?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, finished) = mpsc::channel::<std::io::Result<Output>>();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match finished.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| format!("{name}: {e}"))?,
        Err(_) => {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let stderr = finished
                .recv_timeout(Duration::from_secs(5))
                .ok()
                .and_then(Result::ok)
                .map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
                .unwrap_or_default();
            return Err(format!(
                "{name} {args:?} took longer than {limit:?} and was killed; it said:\n{stderr}"
            ));
        }
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{name} {args:?} exited with {}; it said:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
