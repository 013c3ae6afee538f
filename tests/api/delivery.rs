//! The delivery path under pressure: reads queued behind a long build do not hold the prefetch,
//! a reply queue that refuses publishes delays nobody else, and dead letters survive a deleted
//! dead-letter queue.

use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orchestrator_producer::Publish;
use serde_json::json;

use crate::helpers::{
    free_loopback_port, named, raw_client, spawn_worker_with, start_request, RawClient,
    WorkerOptions, AMQP_URL, REPLY_TIMEOUT,
};
use crate::http::wait_for_sample;

/// How long a request of an unrelated requester may take on a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(5);

#[tokio::test]
async fn reads_queued_behind_a_long_build_do_not_stop_other_containers_requests() {
    // Arrange: a 12 s build, and six reads of that container queued behind its start.
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--prefetch".into(), "4".into()],
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=12000".into())],
        ..WorkerOptions::default()
    })
    .await;
    let start = worker.send(start_request("slow"), Publish::default()).await;
    worker
        .wait_for_builds_begun(1, Duration::from_secs(30))
        .await;
    let mut reads = Vec::new();
    for _ in 0..6 {
        reads.push(
            worker
                .send(named("getcont", "slow"), Publish::default())
                .await,
        );
    }

    // Act: another container's request, while the build still runs.
    let asked = Instant::now();
    let other = tokio::time::timeout(PROMPTLY, worker.call(named("getcont", "other")))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "another container's read waited more than {PROMPTLY:?} behind reads of a building container; log:\n{}",
                worker.log()
            )
        });

    // Assert: answered at once, the build still running; then the start and the six reads,
    // each read seeing the started container.
    assert_eq!(other.status, 404, "{other:?}");
    assert!(
        !worker
            .fake_calls()
            .iter()
            .any(|c| c.subcommand() == "build"),
        "the build had already ended after {:?}, so the test proves nothing",
        asked.elapsed()
    );
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}");
    for read in reads {
        let read = read.wait(REPLY_TIMEOUT).await.unwrap();
        assert_eq!(read.status, 200, "{read:?}");
        let Some(schemas::ReplyResult::Container(record)) = read.result else {
            panic!("getcont returns the record: {read:?}")
        };
        assert!(record.container_active, "a read overtook the start");
    }
}

/// Declares a reply queue that refuses publishes (`x-overflow=reject-publish`, one message at
/// most) and fills it; exclusive to `raw`'s connection, so it goes with the test.
async fn full_reply_queue(raw: &RawClient) -> String {
    let name = format!("test.full.{}", uuid::Uuid::new_v4().simple());
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    raw.channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    let confirmation = orchestrator_producer::publish_confirmed(
        &raw.channel,
        &name,
        br#"{"filler": true}"#,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert!(confirmation.is_ack() && confirmation.take_message().is_none());
    name
}

#[tokio::test]
async fn a_reply_queue_that_refuses_publishes_delays_no_one_else() {
    // Arrange: a requester whose reply queue is full and refuses publishes.
    let port = free_loopback_port();
    let worker = spawn_worker_with(WorkerOptions {
        args: vec![
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--reply-attempts".into(),
            "3".into(),
        ],
        ..WorkerOptions::default()
    })
    .await;
    let raw = raw_client().await;
    let full = full_reply_queue(&raw).await;
    let to_full = || Publish {
        reply_to: Some(full.clone()),
        ..Publish::default()
    };

    // Act: a write and an invalid request aimed at it, then another requester's requests.
    let _refused_write = worker.send(start_request("refused"), to_full()).await;
    let _refused_invalid = worker.send(json!({"op": "getcnt"}), to_full()).await;
    for request in [
        named("getcont", "other"),
        start_request("other"),
        named("stop", "other"),
    ] {
        let reply = tokio::time::timeout(PROMPTLY, worker.call(request.clone()))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{request} was not answered within {PROMPTLY:?} while another requester's reply queue refuses publishes; log:\n{}",
                    worker.log()
                )
            });
        assert!(reply.ok || reply.status == 404, "{reply:?}");
    }

    // Assert: both refused replies are set aside and counted; the worker keeps serving.
    wait_for_sample(&worker, port, "orchestrator_replies_set_aside_total", 2.0).await;
    assert_eq!(worker.call(named("getcont", "other")).await.status, 200);
    let _ = raw.connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_dead_letter_goes_to_a_redeclared_dead_letter_queue_when_it_was_deleted() {
    // Arrange: a request that comes back redelivered, held by the test while the worker starts
    // again, and the worker's dead-letter queue deleted meanwhile.
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec!["--max-attempts".into(), "1".into()],
        ..WorkerOptions::default()
    })
    .await;
    // A container of this host, so that its requests go to this host's queue.
    assert_eq!(worker.call(start_request("ghost")).await.status, 201);
    worker.kill();
    let poison = Publish {
        correlation_id: Some("poison".into()),
        ..Publish::default()
    };
    let pending = worker.send(named("getcont", "ghost"), poison).await;
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let holder = connection.create_channel().await.unwrap();
    holder
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut held = holder
        .basic_consume(
            worker.host_queue().as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(REPLY_TIMEOUT, held.next())
        .await
        .expect("the request reaches the holder")
        .unwrap()
        .unwrap();
    worker.restart().await;
    // The holder counts as a consumer too: wait for the worker's own subscription.
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while worker.log().matches("consuming requests").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the worker did not subscribe again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = worker.topology().dead_letters();
    holder
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    // Act: give the delivery back; the worker sees it redelivered, over --max-attempts.
    holder
        .basic_cancel("holder".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .unwrap();

    // Assert: answered, and the message is in the dead-letter queue, declared again.
    let reply = pending.wait(REPLY_TIMEOUT).await.expect("a reply");
    assert_eq!(reply.status, 500, "{reply:?}");
    assert!(reply.error.unwrap().message.contains(&dead));
    let declared = orchestrator_producer::declared(&connection, &dead)
        .await
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "the dead-letter message was lost: {dead} does not exist; log:\n{}",
                worker.log()
            )
        });
    assert_eq!(declared.message_count(), 1, "the message is kept in {dead}");
    let _ = connection.close(200, "done".into()).await;
}
