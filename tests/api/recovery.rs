//! Nothing lost, nothing run twice: duplicates and a worker killed mid-operation.

use std::time::{Duration, Instant};

use orchestrator_producer::Publish;

use crate::helpers::{
    named, spawn_worker, spawn_worker_with, start_request, WorkerOptions, REPLY_TIMEOUT,
};

#[tokio::test]
async fn the_same_request_published_twice_runs_once_and_both_get_the_same_reply() {
    let worker = spawn_worker().await;
    let once = |correlation: &str| Publish {
        correlation_id: Some(correlation.into()),
        message_id: Some("start-dup-1".into()),
        ..Publish::default()
    };

    let first = worker.send(start_request("dup"), once("first")).await;
    let second = worker.send(start_request("dup"), once("second")).await;
    let (first, second) = (
        first.wait(REPLY_TIMEOUT).await.unwrap(),
        second.wait(REPLY_TIMEOUT).await.unwrap(),
    );
    // A late duplicate, after the first finished, is answered from the stored reply.
    let third = worker
        .client
        .call_raw(
            start_request("dup").to_string().as_bytes(),
            once("third"),
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();

    assert_eq!(first.status, 201);
    for duplicate in [&second, &third] {
        assert_eq!(
            (duplicate.status, &duplicate.result),
            (first.status, &first.result)
        );
    }
    assert_eq!(second.correlation_id.as_deref(), Some("second"));
    assert_eq!(third.correlation_id.as_deref(), Some("third"));
    let builds = worker
        .fake_calls()
        .iter()
        .filter(|c| c.subcommand() == "build")
        .count();
    assert_eq!(builds, 1, "the start ran once");
}

#[tokio::test]
async fn a_worker_killed_during_a_build_finishes_the_start_once_after_it_restarts() {
    // Arrange: a slow build, and other writes queued behind and beside it.
    let mut worker = spawn_worker_with(WorkerOptions {
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=3000".into())],
        ..WorkerOptions::default()
    })
    .await;
    let start = worker
        .send(start_request("crash"), Publish::default())
        .await;
    let behind = worker
        .send(named("stop", "crash"), Publish::default())
        .await;
    let beside = worker
        .send(start_request("bystander"), Publish::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !worker.fake_calls_begun().iter().any(|argv| {
        argv.first().is_some_and(|a| a == "build") && argv.iter().any(|a| a.ends_with("/crash"))
    }) {
        assert!(Instant::now() < deadline, "the build never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Act: kill it mid-build, then start it again.
    worker.kill();
    worker.restart().await;

    // Assert: every request answered once, in order, and the container started exactly once.
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}\n{}", worker.log());
    assert_eq!(behind.wait(REPLY_TIMEOUT).await.unwrap().status, 200);
    assert_eq!(beside.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
    // A read asked after the restart sees the stop that was queued behind the start. (Reads
    // queued at a crash are not redelivered: they are acknowledged once queued; RELIABILITY.md.)
    let read = worker.call(named("getcont", "crash")).await;
    assert_eq!(read.status, 200, "{read:?}");
    let Some(schemas::ReplyResult::Container(record)) = read.result else {
        panic!("getcont returns the record")
    };
    assert!(
        !record.container_active,
        "the stop queued behind the start ran after it"
    );
    let starts = worker
        .fake_calls()
        .iter()
        .filter(|c| c.subcommand() == "instance start" && c.concerns("crash") && c.exit == 0)
        .count();
    assert_eq!(starts, 1, "the instance was started once");
    assert_eq!(worker.running_instances(), ["bystander"]);
}
