//! One key, one request: a `message_id` reused for a different request is refused, and
//! correlation ids that collide across clients never hand one request another's reply.

use orchestrator_producer::Publish;
use schemas::{ErrorCode, Reply};

use crate::helpers::{named, spawn_worker, start_request, TestWorker, REPLY_TIMEOUT};

/// Publishes `request` with the given properties and awaits its final reply.
async fn call_with(
    worker: &TestWorker,
    request: serde_json::Value,
    correlation_id: &str,
    message_id: Option<&str>,
) -> Reply {
    let options = Publish {
        correlation_id: Some(correlation_id.into()),
        message_id: message_id.map(str::to_owned),
        ..Publish::default()
    };
    worker
        .client
        .call_raw(request.to_string().as_bytes(), options, REPLY_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no reply to {request}: {e}; log:\n{}", worker.log()))
}

#[tokio::test]
async fn a_message_id_reused_for_a_different_request_is_refused_and_changes_nothing() {
    // Arrange: nb2 running under a key of its own; nb1 started under key K.
    let worker = spawn_worker().await;
    let key = "key-reused-by-another-client";
    let nb2 = call_with(&worker, start_request("nb2"), "c-nb2", Some("other-key")).await;
    assert_eq!(nb2.status, 201, "{nb2:?}");
    let first = call_with(&worker, start_request("nb1"), "c-1", Some(key)).await;
    assert_eq!(first.status, 201, "{first:?}");

    // Act: a different request under the same key.
    let reused = call_with(&worker, named("stop", "nb2"), "c-2", Some(key)).await;

    // Assert: refused, naming the key, and nb2 still running.
    assert_eq!(reused.status, 409, "{reused:?}");
    assert_eq!(reused.op, Some(schemas::Op::Stop));
    let error = reused.error.expect("a 409 carries an error");
    assert_eq!(error.code, ErrorCode::Conflict);
    assert!(error.message.contains(key), "{}", error.message);
    assert_eq!(reused.correlation_id.as_deref(), Some("c-2"));
    assert!(worker.running_instances().contains(&"nb2".to_owned()));
    let read = worker.call(named("getcont", "nb2")).await;
    let Some(schemas::ReplyResult::Container(record)) = read.result else {
        panic!("getcont returns the record: {read:?}")
    };
    assert!(record.container_active, "nb2 was not stopped");
    // The same request under K is still answered from K's stored reply.
    let again = call_with(&worker, start_request("nb1"), "c-3", Some(key)).await;
    assert_eq!((again.status, &again.result), (first.status, &first.result));
}

#[tokio::test]
async fn different_requests_sharing_a_counter_style_correlation_id_both_run() {
    // Arrange: a client that numbers its requests from 1 and sets no message_id, started
    // twice (its counter starts over).
    let worker = spawn_worker().await;
    let started = call_with(&worker, start_request("nb1"), "1", None).await;
    assert_eq!(started.status, 201, "{started:?}");

    // Act: another request with the same correlation id.
    let stopped = call_with(&worker, named("stop", "nb1"), "1", None).await;

    // Assert: the stop ran; it was not answered with the start's reply.
    assert_eq!(stopped.op, Some(schemas::Op::Stop), "{stopped:?}");
    assert_eq!(stopped.status, 200, "{stopped:?}");
    assert!(worker.running_instances().is_empty());
}
