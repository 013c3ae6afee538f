//! The fleet's admin plane: leases, the fleet-wide `getallcont`, `orchestrator fleet hosts` and
//! `orchestrator fleet forget`, with several workers on one broker.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use orchestrator_worker::fleet::lease::{lease, Lease};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use orchestrator_producer::Publish;
use schemas::fleet::FleetHosts;
use schemas::{ContainerPage, Reply, ReplyResult};
use serde_json::json;

use crate::cli::{assert_exit, orchestrator, stderr, stdout};
use crate::helpers::{
    named, spawn_worker_with, start_request, TestWorker, WorkerOptions, AMQP_URL,
};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_lease_held_by_another_connection_is_seen_held_and_a_missing_one_gone() {
    // Arrange: one connection holds an exclusive queue, as a worker holds its lease.
    let holder = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let alive = unique("lease-test.alive");
    let channel = holder.create_channel().await.unwrap();
    channel
        .queue_declare(
            alive.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let asker = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();

    // Act / Assert: RabbitMQ answers 405 RESOURCE_LOCKED (held) and 404 (missing).
    let refused = asker
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            alive.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    match refused.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => assert_eq!(amqp.get_id(), 405, "{amqp:?}"),
        other => panic!("not a protocol error: {other:?}"),
    }
    assert_eq!(lease(&asker, &alive).await, Lease::Held);
    assert_eq!(
        lease(&asker, &unique("lease-test.alive")).await,
        Lease::Gone
    );
    holder.close(200, "done".into()).await.unwrap();
    assert_eq!(lease(&asker, &alive).await, Lease::Gone);
}

/// `count` workers on one fleet, nodes `<prefix>-a`, `-b`, ..., each with `args`.
async fn fleet(prefix: &str, count: usize, args: &[&str]) -> Vec<TestWorker> {
    let exchange = format!("test.fleet-admin.{}", uuid::Uuid::new_v4().simple());
    let mut workers = Vec::new();
    for i in 0..count {
        let node = format!("{prefix}-{}", (b'a' + i as u8) as char);
        let options = WorkerOptions {
            exchange: Some(exchange.clone()),
            node: Some(node),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..WorkerOptions::default()
        };
        workers.push(spawn_worker_with(options).await);
    }
    workers
}

fn page(reply: &Reply) -> &ContainerPage {
    match &reply.result {
        Some(ReplyResult::Page(page)) => page,
        other => panic!("not a page: {other:?} in {reply:?}"),
    }
}

/// Starts `names`, one after the other (each waits for its 201): with capacity 1 on every host,
/// each lands on another host.
async fn start_all(worker: &TestWorker, names: &[&str]) -> BTreeMap<String, String> {
    let mut placed = BTreeMap::new();
    for name in names {
        let reply = worker.call(start_request(name)).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        placed.insert((*name).to_owned(), reply.node.clone());
    }
    placed
}

pub(crate) fn signal(worker: &TestWorker, signal: Signal) {
    let pid = worker.pid().expect("the worker runs");
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

#[tokio::test]
async fn getallcont_across_three_hosts_lists_every_container_once_with_its_node() {
    // Arrange: one container on each host (capacity 1 each).
    let workers = fleet("gather", 3, &["--max-containers", "1"]).await;
    let placed = start_all(&workers[0], &["nb1", "nb2", "nb3"]).await;
    let nodes: std::collections::BTreeSet<_> = placed.values().collect();
    assert_eq!(nodes.len(), 3, "one container on each host: {placed:?}");

    // Act
    let reply = workers[1]
        .call(json!({"op": "getallcont", "page": 1, "page_size": 2}))
        .await;
    let second = workers[2]
        .call(json!({"op": "getallcont", "page": 2, "page_size": 2}))
        .await;

    // Assert: every container once, by name, each with the node that holds it.
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.warnings.is_empty(), "{:?}", reply.warnings);
    let listed: Vec<(String, String)> = page(&reply)
        .containers
        .iter()
        .chain(&page(&second).containers)
        .map(|r| (r.container_name.clone(), r.node.clone().unwrap_or_default()))
        .collect();
    let expected: Vec<(String, String)> = placed.into_iter().collect();
    assert_eq!(
        listed,
        expected,
        "{second:?}\n{}",
        workers
            .iter()
            .map(|w| w.log())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!((page(&reply).total, page(&second).total), (3, 3));
}

#[tokio::test]
async fn a_killed_host_is_named_at_once_and_a_stopped_one_within_the_gather_timeout() {
    // Arrange
    let workers = fleet(
        "silent",
        3,
        &["--max-containers", "1", "--gather-timeout", "2s"],
    )
    .await;
    start_all(&workers[0], &["nb1", "nb2", "nb3"]).await;
    let (killed, stopped) = (&workers[1], &workers[2]);

    // Act / Assert: killed, its lease goes with its connection: named without waiting.
    signal(killed, Signal::SIGKILL);
    lease_gone(killed, Duration::from_secs(10)).await;
    let asked = Instant::now();
    let reply = workers[0].call(json!({"op": "getallcont"})).await;
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?} for a dead host"
    );
    assert_eq!(page(&reply).total, 2, "{reply:?}");
    assert!(
        reply
            .warnings
            .iter()
            .any(|w| w.contains(&format!("host {} is not running", killed.node))),
        "{:?}",
        reply.warnings
    );

    // Stopped, it keeps its lease but cannot answer: named after the gather timeout.
    signal(stopped, Signal::SIGSTOP);
    let (reply, waited) = getallcont_from_a_running_host(&workers[0]).await;
    signal(stopped, Signal::SIGCONT);
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "waited {waited:?}"
    );
    assert_eq!(page(&reply).total, 1, "{reply:?}");
    assert!(
        reply
            .warnings
            .iter()
            .any(|w| w.contains(&format!("host {} did not answer within 2s", stopped.node))),
        "{:?}",
        reply.warnings
    );
}

/// Whether `worker`'s lease is held now, asked of the broker.
pub(crate) async fn lease_of(worker: &TestWorker) -> Lease {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let alive = worker
        .topology()
        .alive_queue(&schemas::NodeId::parse(&worker.node).unwrap());
    let held = lease(&connection, &alive).await;
    let _ = connection.close(200, "done".into()).await;
    held
}

/// Waits (at most `limit`) until the broker has dropped the worker's connection, and with it
/// its lease.
pub(crate) async fn lease_gone(worker: &TestWorker, limit: Duration) {
    crate::helpers::eventually("the worker's lease is gone", limit, async || {
        lease_of(worker).await == Lease::Gone
    })
    .await;
}

/// A `getallcont` answered by a host that runs, and how long it took. `<exchange>.place` is
/// consumed by every host, a stopped one too (its connection lives until the broker's heartbeat
/// timeout): a request the broker hands to the stopped host waits there, so the test asks
/// again, at most three times (round-robin over two consumers reaches the running one).
async fn getallcont_from_a_running_host(worker: &TestWorker) -> (Reply, Duration) {
    for _ in 0..3 {
        let asked = Instant::now();
        let pending = worker
            .send(json!({"op": "getallcont"}), Publish::default())
            .await;
        if let Ok(reply) = pending.wait(Duration::from_secs(8)).await {
            return (reply, asked.elapsed());
        }
    }
    panic!("no running host answered a getallcont in three attempts");
}

async fn fleet_hosts(worker: &TestWorker) -> FleetHosts {
    let output = orchestrator(&worker.exchange, &["fleet", "hosts", "--json"]).await;
    assert_exit(&output, 0, "fleet hosts");
    serde_json::from_str(&stdout(&output)).unwrap()
}

#[tokio::test]
async fn fleet_hosts_shows_every_host_with_its_counts_and_a_killed_one_not_alive() {
    // Arrange: three containers, one on each host, one of them stopped.
    let mut workers = fleet("hosts", 3, &["--max-containers", "1"]).await;
    let placed = start_all(&workers[0], &["nb1", "nb2", "nb3"]).await;
    assert_eq!(workers[0].call(named("stop", "nb2")).await.status, 200);
    let counts = |node: &str| {
        let held: Vec<&String> = placed
            .iter()
            .filter(|(_, n)| n.as_str() == node)
            .map(|(name, _)| name)
            .collect();
        let running = held.iter().filter(|name| name.as_str() != "nb2").count();
        (held.len() as u64, running as u64)
    };

    // Act
    let table = fleet_hosts(&workers[0]).await;

    // Assert
    assert_eq!(table.hosts.len(), 3, "{table:?}");
    for host in &table.hosts {
        assert!(host.alive && host.answered, "{host:?}");
        assert_eq!((host.held, host.running), counts(&host.node), "{host:?}");
        assert_eq!(host.capacity, Some(1), "{host:?}");
        assert!(host.queue_depth.is_some(), "{host:?}");
    }

    // Killed, with two requests waiting in its queue: still listed, not alive, its queue two
    // deep at least (admin messages for it wait there too), with what it last said.
    let gone = workers
        .iter()
        .position(|w| w.node == placed["nb3"])
        .unwrap();
    let node = workers[gone].node.clone();
    workers[gone].kill();
    let asking = &workers[(gone + 1) % 3];
    let _waiting = [
        asking
            .send(named("getcont", "nb3"), Publish::default())
            .await,
        asking.send(named("stop", "nb3"), Publish::default()).await,
    ];
    let mut table = fleet_hosts(asking).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let dead = table.hosts.iter().find(|h| h.node == node).cloned();
        let dead = dead.unwrap_or_else(|| panic!("{node} is not listed: {table:?}"));
        // What it last said reaches every host within the hello's check period.
        if dead.held == 1 || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        table = fleet_hosts(asking).await;
    };
    assert!(!dead.alive && !dead.answered, "{dead:?}");
    assert_eq!((dead.held, dead.running), counts(&node), "{dead:?}");
    assert!(dead.queue_depth >= Some(2), "{dead:?}");
    let alive = table.hosts.iter().filter(|h| h.alive).count();
    assert_eq!(alive, 2, "{table:?}");
}

#[tokio::test]
async fn fleet_forget_is_refused_while_the_host_runs() {
    let workers = fleet("refuse", 1, &[]).await;
    let output = orchestrator(&workers[0].exchange, &["fleet", "forget", &workers[0].node]).await;
    assert_exit(&output, 1, "fleet forget of a running host");
    assert!(
        stderr(&output).contains("is running"),
        "{}",
        stderr(&output)
    );
    let call = workers[0].call(start_request("nb1")).await;
    assert_eq!(call.status, 201, "the host still takes requests: {call:?}");
}

#[tokio::test]
async fn after_a_host_is_killed_fleet_forget_answers_its_waiting_requests_503_and_its_names_start_elsewhere(
) {
    // Arrange: nb1 on one host, which is then killed with three requests waiting for it.
    let mut workers = fleet("forget", 2, &["--max-containers", "1"]).await;
    let placed = start_all(&workers[0], &["nb1"]).await;
    let gone = workers
        .iter()
        .position(|w| w.node == placed["nb1"])
        .unwrap();
    let other = 1 - gone;
    workers[gone].kill();
    let mut waiting = Vec::new();
    for op in ["getcont", "stop", "deletecont"] {
        waiting.push(
            workers[other]
                .send(named(op, "nb1"), Publish::default())
                .await,
        );
    }

    // Act
    let output = orchestrator(
        &workers[other].exchange,
        &["fleet", "forget", &workers[gone].node],
    )
    .await;

    // Assert: answered 503, then nb1 starts on the other host.
    assert_exit(&output, 0, "fleet forget");
    // At least the three sent while it was dead; the start may be there too, redelivered when
    // the host was killed after its reply was published but before its ack reached the broker
    // (its requester ignores a second final reply for a correlation id already answered).
    let answered: usize = stdout(&output)
        .split("answered ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", stdout(&output)));
    assert!((3..=4).contains(&answered), "{}", stdout(&output));
    for pending in waiting {
        let reply = pending.wait(Duration::from_secs(30)).await.unwrap();
        assert_eq!(reply.status, 503, "{reply:?}");
        let error = reply.error.unwrap();
        assert!(
            error.message.contains("send the request again"),
            "{}",
            error.message
        );
    }
    let again = workers[other].call(start_request("nb1")).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(again.node, workers[other].node);
}
