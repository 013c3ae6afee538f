//! The private RabbitMQ nodes of `orchestrator_harness::brokers`, checked against the broker
//! alone (no worker): what the broker-restart and cluster tests build on. A node restarted or
//! killed here is never the shared broker on 5672.

use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use orchestrator_harness::brokers::PrivateBroker;

/// How long a node may take to serve a queue again after a restart or a leader election.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
/// How long one publish waits for its confirm.
const CONFIRM_LIMIT: Duration = Duration::from_secs(30);

/// Declares the durable quorum queue `queue` through `url`, replicated (on a cluster) to
/// `group_size` nodes.
async fn declare_quorum_queue(url: &str, queue: &str, group_size: i32) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongInt(group_size),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap_or_else(|e| panic!("declare {queue} on {url}: {e}"));
    let _ = connection.close(200, "declared".into()).await;
}

/// Publishes `body` to `queue` persistent and mandatory; true when the broker confirmed it
/// into the queue within `CONFIRM_LIMIT`.
async fn publish_confirmed(channel: &Channel, queue: &str, body: &str) -> bool {
    let properties = BasicProperties::default().with_delivery_mode(2);
    let confirmation =
        orchestrator_producer::publish_confirmed(channel, queue, body.as_bytes(), properties);
    match tokio::time::timeout(CONFIRM_LIMIT, confirmation).await {
        Ok(Ok(confirmation)) => confirmation.is_ack() && confirmation.take_message().is_none(),
        _ => false,
    }
}

/// Publishes `body` to the existing `queue` through `url` until the broker confirms it, on a
/// new connection for each try (a failed one may have closed its channel), for at most `limit`.
async fn publish_through(url: &str, queue: &str, body: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await {
            let confirmed = match connection.create_channel().await {
                Ok(channel) => {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .is_ok()
                        && publish_confirmed(&channel, queue, body).await
                }
                Err(_) => false,
            };
            let _ = connection.close(200, "published".into()).await;
            if confirmed {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not confirm {body:?} into {queue} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Takes the next message of `queue` through `url`, acknowledged; polls (a node that has just
/// started, or a queue electing a leader, may fail a try) for at most `limit`.
async fn take_next(url: &str, queue: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let outcome = try_take(url, queue).await;
        if let Ok(Some(body)) = outcome {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no message from {queue} through {url} within {limit:?}: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One `basic.get` of `queue` through `url` on a connection of its own: the message's body,
/// acknowledged, or `None` when the queue is empty. A message whose ack fails goes back to the
/// queue when the channel closes.
async fn try_take(url: &str, queue: &str) -> Result<Option<String>, String> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    // The channel lives to the end: dropping it closes it, and the ack with it.
    let taken = async {
        let channel = connection.create_channel().await?;
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?
        else {
            return Ok(None);
        };
        message.delivery.ack(BasicAckOptions::default()).await?;
        Ok::<_, lapin::Error>(Some(
            String::from_utf8_lossy(&message.delivery.data).into_owned(),
        ))
    }
    .await;
    let _ = connection.close(200, "taken".into()).await;
    taken.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_message_in_a_quorum_queue_outlives_stop_app_and_start_app() {
    // Arrange
    let broker = tokio::task::block_in_place(|| PrivateBroker::start(1));
    let queue = "private-broker.restart";
    declare_quorum_queue(broker.url(0), queue, 1).await;
    publish_through(broker.url(0), queue, "kept across a restart", CONFIRM_LIMIT).await;

    // Act
    tokio::task::block_in_place(|| {
        broker.stop_app(0);
        broker.start_app(0);
    });

    // Assert
    let body = take_next(broker.url(0), queue, RECOVERY_LIMIT).await;
    assert_eq!(body, "kept across a restart");
    assert_eq!(
        try_take(broker.url(0), queue).await,
        Ok(None),
        "a second message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_serving_a_quorum_queue_when_one_node_is_killed() {
    // Arrange
    let broker = tokio::task::block_in_place(|| PrivateBroker::start(3));
    let mut running = tokio::task::block_in_place(|| broker.running_nodes(0));
    running.sort();
    let all: Vec<String> = (0..3).map(|i| broker.node_name(i)).collect();
    assert_eq!(running, all, "the cluster does not run all three nodes");
    let queue = "private-broker.cluster";
    // Declared through node 0, which therefore holds the queue's first leader: killing it
    // forces an election.
    declare_quorum_queue(broker.url(0), queue, 3).await;
    publish_through(broker.url(0), queue, "before", CONFIRM_LIMIT).await;

    // Act
    tokio::task::block_in_place(|| broker.kill(0));
    publish_through(broker.url(1), queue, "after", RECOVERY_LIMIT).await;

    // Assert
    let first = take_next(broker.url(2), queue, RECOVERY_LIMIT).await;
    let second = take_next(broker.url(2), queue, RECOVERY_LIMIT).await;
    assert_eq!([first.as_str(), second.as_str()], ["before", "after"]);
    assert_eq!(
        try_take(broker.url(2), queue).await,
        Ok(None),
        "a third message"
    );
    let survivors = tokio::task::block_in_place(|| broker.running_nodes(1));
    assert_eq!(survivors.len(), 2, "running after the kill: {survivors:?}");

    // The killed node comes back into the cluster.
    tokio::task::block_in_place(|| broker.start_node(0));
    let deadline = Instant::now() + RECOVERY_LIMIT;
    while tokio::task::block_in_place(|| broker.running_nodes(1)).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "node 0 did not rejoin within {RECOVERY_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
