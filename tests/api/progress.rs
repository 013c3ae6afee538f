//! Progress envelopes, as a backend that asks for them (AMQP header `x-progress: true`) sees
//! them: in order, not final, with the request's correlation id, before its final reply.

use orchestrator_producer::{Envelope, Publish};
use schemas::Reply;

use crate::helpers::{
    assert_valid_reply, named, spawn_worker, start_request, TestWorker, REPLY_TIMEOUT,
};

/// Sends `request` and returns its progress envelopes and its final reply, all validated
/// against the reply schema.
async fn call_with_progress(
    worker: &TestWorker,
    request: serde_json::Value,
    progress: bool,
) -> (Vec<Reply>, Reply) {
    let pending = worker
        .send(
            request,
            Publish {
                progress,
                ..Publish::default()
            },
        )
        .await;
    let correlation_id = pending.correlation_id().to_owned();
    let mut events = Vec::new();
    let Envelope { reply, .. } = pending
        .wait_with_progress(REPLY_TIMEOUT, |event| events.push(event.clone()))
        .await
        .unwrap_or_else(|e| panic!("no final reply: {e}; log:\n{}", worker.log()));
    for envelope in events.iter().chain([&reply]) {
        assert_valid_reply(envelope);
        assert_eq!(
            envelope.correlation_id.as_deref(),
            Some(correlation_id.as_str())
        );
    }
    (events, reply)
}

fn stages(events: &[Reply]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.stage.as_deref().unwrap_or("?"))
        .collect()
}

#[tokio::test]
async fn a_start_that_asks_for_progress_hears_each_stage_before_its_final_reply() {
    let worker = spawn_worker().await;
    worker.control_fake(&["DELAY_MS=build=300"]);

    let (events, reply) = call_with_progress(&worker, start_request("nb1"), true).await;

    assert_eq!(
        stages(&events),
        ["queued", "building_image", "starting_instance"]
    );
    assert!(events
        .iter()
        .all(|e| !e.is_final && e.status == 202 && e.result.is_none()));
    assert_eq!(events[0].position, Some(0));
    assert!(events
        .iter()
        .all(|e| e.container_name.as_deref() == Some("nb1")));
    assert!(reply.is_final);
    assert_eq!(reply.status, 201);
    assert_eq!(reply.stage, None, "final replies carry no stage");
}

#[tokio::test]
async fn a_request_without_the_header_gets_only_its_final_reply() {
    let worker = spawn_worker().await;

    let (events, reply) = call_with_progress(&worker, start_request("nb1"), false).await;

    assert!(events.is_empty(), "{events:?}");
    assert_eq!(reply.status, 201);
}

#[tokio::test]
async fn queued_tells_how_many_requests_are_ahead_in_the_lane() {
    // Arrange: a slow start occupies nb1's lane.
    let worker = spawn_worker().await;
    worker.control_fake(&["DELAY_MS=build=1500"]);
    let first = worker.send(start_request("nb1"), Publish::default()).await;
    // Placed on the host (its name bound) once its build begins; clients wait for that, or
    // for the start's reply, before sending more for the name (DESIGN.md, "Fleet").
    worker.wait_for_builds_begun(1, REPLY_TIMEOUT).await;

    // Act: a stop queued behind it, asking for progress.
    let (events, reply) = call_with_progress(&worker, named("stop", "nb1"), true).await;

    // Assert
    assert_eq!(stages(&events), ["queued", "stopping_instance"]);
    assert_eq!(events[0].position, Some(1));
    assert_eq!(reply.status, 200);
    assert_eq!(first.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
}

#[tokio::test]
async fn a_read_that_asks_for_progress_hears_queued_then_its_reply() {
    let worker = spawn_worker().await;
    assert_eq!(worker.call(start_request("nb1")).await.status, 201);

    let (events, reply) = call_with_progress(&worker, named("getcont", "nb1"), true).await;

    assert_eq!(stages(&events), ["queued"]);
    assert_eq!(reply.status, 200);
}
