//! Many hosts on one broker (DESIGN.md, "Fleet"): several worker processes with distinct
//! `--node`, data directories and fake states share one exchange of the test's own. New
//! containers go where there is room, every later request for a name runs on its owner only,
//! a name is placed once however many hosts race for it, and what waits for a host that is gone
//! expires into `504`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use orchestrator_producer::{Client, Publish};

use crate::faults::close_worker_connections;
use crate::helpers::{
    named, raw_client, spawn_worker_with, start_request, wait_until_owned, TestWorker,
    WorkerOptions, AMQP_URL, REPLY_TIMEOUT,
};

/// `count` workers on one fresh exchange, with `--max-containers` from `capacities` (none when
/// shorter) and `extra` arguments each.
pub(crate) async fn fleet(count: usize, capacities: &[u32], extra: &[&str]) -> Vec<TestWorker> {
    let exchange = format!("test.fleet.{}", uuid::Uuid::new_v4().simple());
    let mut workers = Vec::new();
    for i in 0..count {
        let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        if let Some(capacity) = capacities.get(i) {
            args.extend(["--max-containers".to_owned(), capacity.to_string()]);
        }
        let options = WorkerOptions {
            exchange: Some(exchange.clone()),
            node: Some(format!(
                "host{i}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )),
            args,
            ..WorkerOptions::default()
        };
        workers.push(spawn_worker_with(options).await);
    }
    workers
}

pub(crate) fn owner<'a>(workers: &'a [TestWorker], node: &str) -> &'a TestWorker {
    workers
        .iter()
        .find(|w| w.node == node)
        .unwrap_or_else(|| panic!("no host {node} in the fleet"))
}

/// `rabbitmqctl list_bindings`: the bindings from `exchange` with `key`.
pub(crate) fn bindings(exchange: &str, key: &str) -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_bindings",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            (fields.len() == 3 && fields[0] == exchange && fields[2] == key)
                .then(|| fields[1].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn new_containers_spread_over_the_hosts_and_every_request_for_a_name_runs_on_its_owner() {
    // Arrange: three hosts with room for three containers each.
    let workers = fleet(3, &[3, 3, 3], &[]).await;
    let client = &workers[0].client;

    // Act: nine starts through the exchange, then a stop and a getcont of each.
    let mut owners = BTreeMap::new();
    for i in 0..9 {
        let name = format!("nb{i}");
        let body = start_request(&name).to_string();
        let reply = client
            .call_raw(body.as_bytes(), Publish::default(), REPLY_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{reply:?}");
        owners.insert(name, reply.node.clone());
    }
    for (name, node) in &owners {
        for op in ["stop", "getcont"] {
            let body = named(op, name).to_string();
            let reply = client
                .call_raw(body.as_bytes(), Publish::default(), REPLY_TIMEOUT)
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(&reply.node, node, "{op} {name} answered by its owner");
        }
    }

    // Assert: three per host, and each host's apptainer only ever saw its own containers.
    for worker in &workers {
        let mine: BTreeSet<&String> = owners
            .iter()
            .filter(|(_, node)| **node == worker.node)
            .map(|(name, _)| name)
            .collect();
        assert_eq!(mine.len(), 3, "{} holds {mine:?}", worker.node);
        for call in worker.fake_actions() {
            let foreign = owners
                .keys()
                .find(|name| !mine.contains(name) && call.concerns(name));
            assert!(
                foreign.is_none(),
                "{} ran {:?} for another host's container",
                worker.node,
                call.argv
            );
        }
        let stops = worker
            .fake_actions()
            .iter()
            .filter(|c| c.subcommand() == "instance stop")
            .count();
        assert_eq!(stops, 3, "{} stopped its own three", worker.node);
    }
}

/// Placement probes ownership with a mandatory publish and reads "nobody owns it" from the
/// broker's return. Probes that shared a channel with other placements' publishes could take
/// another publish's confirm, read "owned" and drop the start unanswered (seen by the bench:
/// 1 to 3 starts in 200 without a reply).
#[tokio::test]
async fn every_one_of_many_simultaneous_starts_of_new_names_is_answered() {
    // Arrange: two hosts, two client connections.
    let workers = fleet(2, &[], &[]).await;
    let exchange = workers[0].exchange.clone();
    let clients = [
        Client::connect(AMQP_URL, &exchange).await.unwrap(),
        Client::connect(AMQP_URL, &exchange).await.unwrap(),
    ];

    // Act: 150 starts of distinct new names, published together.
    let mut pending = Vec::new();
    for i in 0..150 {
        let body = start_request(&format!("many{i:03}")).to_string();
        pending.push(
            clients[i % 2]
                .send(body.as_bytes(), Publish::default())
                .await
                .unwrap(),
        );
    }

    // Assert: each answered 201 (none dropped), each on one host.
    let mut unanswered = Vec::new();
    for (i, reply) in pending.into_iter().enumerate() {
        match reply.wait(REPLY_TIMEOUT).await {
            Ok(reply) => assert_eq!(reply.status, 201, "{reply:?}"),
            Err(_) => unanswered.push(format!("many{i:03}")),
        }
    }
    assert!(
        unanswered.is_empty(),
        "starts never answered: {unanswered:?}"
    );
}

#[tokio::test]
async fn fifty_simultaneous_starts_of_one_name_make_exactly_one_container() {
    // Arrange: three hosts, five client connections.
    let workers = fleet(3, &[], &[]).await;
    let exchange = workers[0].exchange.clone();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(AMQP_URL, &exchange).await.unwrap());
    }
    let body = start_request("nb1").to_string();

    // Act: 50 starts of nb1 with distinct message ids, published together.
    let mut pending = Vec::new();
    for i in 0..50 {
        let options = Publish {
            message_id: Some(format!("race-{i}")),
            ..Publish::default()
        };
        pending.push(clients[i % 5].send(body.as_bytes(), options).await.unwrap());
    }
    let mut statuses = BTreeMap::new();
    let mut created_on = Vec::new();
    for reply in pending {
        let reply = reply.wait(REPLY_TIMEOUT).await.unwrap();
        *statuses.entry(reply.status).or_insert(0) += 1;
        if reply.status == 201 {
            created_on.push(reply.node.clone());
        }
    }

    // Assert
    assert_eq!(statuses, BTreeMap::from([(201, 1), (409, 49)]));
    let holders: Vec<&String> = workers
        .iter()
        .filter(|w| w.running_instances().contains(&"nb1".to_owned()))
        .map(|w| &w.node)
        .collect();
    assert_eq!(holders, [&created_on[0]], "one host runs nb1");
    let topology = workers[0].topology();
    let host_queue = owner(&workers, &created_on[0]).host_queue();
    for source in [topology.exchange().to_owned(), topology.owners()] {
        assert_eq!(
            bindings(&source, "nb1"),
            std::slice::from_ref(&host_queue),
            "{source}"
        );
    }
}

#[tokio::test]
async fn starts_beyond_the_fleets_room_wait_and_are_placed_when_room_frees() {
    // Arrange: room for 2, 5 and 10 containers.
    let capacities = [2usize, 5, 10];
    let workers = fleet(3, &[2, 5, 10], &[]).await;
    let client = &workers[0].client;

    // Act: 20 starts.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20 {
        let body = start_request(&format!("cap{i:02}")).to_string();
        let pending = client
            .send(body.as_bytes(), Publish::default())
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(pending.wait(REPLY_TIMEOUT * 2).await);
        });
    }
    let mut placed = Vec::new();
    let settle = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(reply)) = tokio::time::timeout_at(settle.into(), rx.recv()).await {
        placed.push(reply.unwrap());
    }

    // Assert: 17 placed, each host at its room, 3 waiting; reads are answered meanwhile.
    assert_eq!(placed.len(), 17, "{placed:?}");
    assert!(placed.iter().all(|r| r.status == 201), "{placed:?}");
    for (worker, capacity) in workers.iter().zip(capacities) {
        let running = worker.running_instances().len();
        assert_eq!(running, capacity, "{} runs {running}", worker.node);
    }
    let began = Instant::now();
    assert_eq!(
        workers[1].call(named("getcont", "unknown")).await.status,
        404
    );
    let all = workers[1]
        .call(serde_json::json!({"op": "getallcont"}))
        .await;
    assert_eq!(all.status, 200);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "reads waited behind the starts"
    );

    // Act: room for three frees (the smallest host's two containers and one of the middle
    // host's are stopped and deleted).
    let mut freed = Vec::new();
    for (index, take) in [(0, 2), (1, 1)] {
        let host = &workers[index];
        let theirs = placed
            .iter()
            .filter(|r| r.node == host.node)
            .map(|r| r.container_name.clone().unwrap())
            .take(take);
        for name in theirs {
            assert_eq!(host.call(named("stop", &name)).await.status, 200);
            assert_eq!(host.call(named("deletecont", &name)).await.status, 204);
            freed.push(name);
        }
    }

    // Assert: the three waiting starts are placed, and every host is at its room again.
    for _ in 0..3 {
        let reply = tokio::time::timeout(REPLY_TIMEOUT, rx.recv())
            .await
            .expect("a waiting start placed")
            .unwrap()
            .unwrap();
        assert_eq!(reply.status, 201, "{reply:?}");
    }
    for (worker, capacity) in workers.iter().zip(capacities) {
        let running = worker.running_instances().len();
        assert_eq!(running, capacity, "{} runs {running}", worker.node);
    }
}

#[tokio::test]
async fn a_second_worker_with_a_node_id_in_use_exits_at_once_naming_it() {
    let workers = fleet(1, &[], &[]).await;
    let first = &workers[0];

    // Ready at once: the first worker's consumer counts.
    let mut second = spawn_worker_with(WorkerOptions {
        exchange: Some(first.exchange.clone()),
        node: Some(first.node.clone()),
        ..WorkerOptions::default()
    })
    .await;

    let status = second.wait_for_exit(Duration::from_secs(20)).await;
    let status = status.unwrap_or_else(|| panic!("still running; log:\n{}", second.log()));
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains(&format!("node {}", first.node)) && log.contains("--node"),
        "{log}"
    );
    assert_eq!(first.call(named("getcont", "nb1")).await.status, 404);
}

#[tokio::test]
async fn a_binding_removed_behind_the_workers_back_is_restored_at_the_next_reconnect() {
    // Arrange: nb1 on a host of one.
    let workers = fleet(1, &[], &[]).await;
    let worker = &workers[0];
    assert_eq!(worker.call(start_request("nb1")).await.status, 201);
    let topology = worker.topology();

    // Act: its bindings removed, then the worker's connections closed by the broker.
    let raw = raw_client().await;
    for exchange in [topology.exchange().to_owned(), topology.owners()] {
        raw.channel
            .queue_unbind(
                worker.host_queue().as_str().into(),
                exchange.as_str().into(),
                "nb1".into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    assert!(bindings(topology.exchange(), "nb1").is_empty());
    assert!(close_worker_connections(worker) > 0);

    // Assert
    wait_until_owned(&worker.exchange, "nb1", REPLY_TIMEOUT).await;
    let reply = worker.call(named("getcont", "nb1")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// A worker that aborts at `step` of placing `start nb1`, started again without the hook:
/// one container, one successful instance start, one final reply.
async fn crash_during_placement(step: &str) {
    let exchange = format!("test.fleet.{}", uuid::Uuid::new_v4().simple());
    let mut worker = spawn_worker_with(WorkerOptions {
        exchange: Some(exchange.clone()),
        env: vec![("ORCHESTRATOR_TEST_ABORT_AT".into(), step.into())],
        ..WorkerOptions::default()
    })
    .await;
    let mut raw = raw_client().await;
    let properties = BasicProperties::default()
        .with_correlation_id("crash-1".into())
        .with_message_id("crash-1".into());
    raw.publish(&exchange, &start_request("nb1"), properties)
        .await;
    let exited = worker.wait_for_exit(REPLY_TIMEOUT).await;
    assert!(exited.is_some(), "the hook aborted the worker at {step}");

    worker.remove_env("ORCHESTRATOR_TEST_ABORT_AT");
    worker.restart().await;

    let reply = raw.next_reply().await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let second = tokio::time::timeout(Duration::from_secs(5), raw.replies.next()).await;
    assert!(second.is_err(), "a second reply came: {second:?}");
    assert_eq!(worker.running_instances(), ["nb1"]);
    let starts = worker
        .fake_actions()
        .iter()
        .filter(|c| c.subcommand() == "instance start" && c.exit == 0)
        .count();
    assert_eq!(starts, 1, "one instance start");
    assert_eq!(
        bindings(&exchange, "nb1"),
        [worker.host_queue()],
        "nb1 bound once, to its host"
    );
}

#[tokio::test]
async fn a_worker_that_dies_after_forwarding_a_placed_start_answers_it_once() {
    crash_during_placement("placement-forwarded").await;
}

#[tokio::test]
async fn a_worker_that_dies_after_binding_a_placed_name_answers_its_start_once() {
    crash_during_placement("placement-bound").await;
}

#[tokio::test]
#[ignore = "intermittent: in about 1 run of 10 on a loaded machine (and once in CI) no 504 \
            arrives within 60 s; the cause is not found (a message without TTL at the head of the \
            dead host's quorum queue would block expiry behind it); issue 13 stays open"]
async fn a_request_with_a_deadline_waiting_for_a_host_that_is_gone_is_answered_504() {
    // Arrange: nb1 on one host of two, which is then killed.
    let mut workers = fleet(2, &[], &[]).await;
    let reply = workers[0].call(start_request("nb1")).await;
    assert_eq!(reply.status, 201);
    let owner_node = reply.node.clone();
    let owner_index = workers.iter().position(|w| w.node == owner_node).unwrap();
    workers[owner_index].kill();
    let other = &workers[1 - owner_index];

    // Act: a stop with a 2 s deadline, which waits in the dead host's queue.
    let mut raw = raw_client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let properties = BasicProperties::default()
        .with_correlation_id("late".into())
        .with_expiration("2000".into())
        .with_timestamp(now);
    raw.publish(&other.exchange, &named("stop", "nb1"), properties)
        .await;

    // Assert: answered 504 by the host still alive; nothing ran.
    let reply = raw.next_reply().await;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.node, other.node);
    assert_eq!(
        serde_json::to_value(reply.error.unwrap().code).unwrap(),
        "deadline_exceeded"
    );
    workers[owner_index].restart().await;
    let reply = workers[owner_index].call(named("getcont", "nb1")).await;
    assert_eq!(reply.status, 200);
    let Some(schemas::ReplyResult::Container(record)) = reply.result else {
        panic!("a record")
    };
    assert!(record.container_active, "the expired stop never ran");
}

#[tokio::test]
async fn a_probe_reaching_a_host_is_dropped_without_a_reply() {
    // Arrange: nb1 on a host of one.
    let workers = fleet(1, &[], &[]).await;
    let worker = &workers[0];
    assert_eq!(worker.call(start_request("nb1")).await.status, 201);

    // Act: ownership probes (AMQP type orchestrator.probe, no reply_to) reach its queue.
    let raw = raw_client().await;
    for _ in 0..3 {
        assert!(crate::helpers::is_owned(&raw.channel, &worker.exchange, "nb1").await);
    }
    assert_eq!(worker.call(named("getcont", "nb1")).await.status, 200);

    // Assert: nothing was answered to the default reply queue, nothing is left in the queue.
    for queue in [worker.reply_queue.clone(), worker.host_queue()] {
        let depth = orchestrator_producer::declared(&raw.connection, &queue)
            .await
            .unwrap()
            .expect("the queue exists")
            .message_count();
        assert_eq!(depth, 0, "{queue}");
    }
}
