//! Bad input gets a clear 400 naming the problem, changes nothing, and the worker keeps serving.

use orchestrator_producer::Publish;
use serde_json::json;

use crate::helpers::{assert_valid_reply, named, spawn_worker, start_request, REPLY_TIMEOUT};

#[tokio::test]
async fn malformed_unknown_missing_and_mistyped_requests_get_a_400_naming_the_problem() {
    let worker = spawn_worker().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not valid JSON"),
        (
            json!({"op": "launch", "container_name": "x"})
                .to_string()
                .into_bytes(),
            "launch",
        ),
        (
            json!({"op": "stop"}).to_string().into_bytes(),
            "container_name",
        ),
        (
            json!({"op": "stop", "container_name": 7})
                .to_string()
                .into_bytes(),
            "container_name: invalid type",
        ),
        (
            json!({"op": "stop", "container_name": "x", "force": true})
                .to_string()
                .into_bytes(),
            "force",
        ),
        (
            json!({"op": "stop", "container_name": "../../etc"})
                .to_string()
                .into_bytes(),
            "invalid container name",
        ),
        (
            json!({"op": "stop", "container_name": "x", "v": 2})
                .to_string()
                .into_bytes(),
            "version 2",
        ),
    ];
    for (body, mentions) in cases {
        let reply = worker
            .client
            .call_raw(&body, Publish::default(), REPLY_TIMEOUT)
            .await
            .unwrap();
        assert_valid_reply(&reply);
        let error = reply.error.clone().expect("an error reply");
        assert_eq!(
            (reply.status, error.code),
            (400, schemas::ErrorCode::BadRequest)
        );
        assert!(
            error.message.contains(mentions),
            "the message for {} should mention {mentions:?}: {}",
            String::from_utf8_lossy(&body),
            error.message
        );
    }

    let still_serving = worker.call(json!({"op": "getallcont"})).await;
    assert_eq!(still_serving.status, 200);
    assert!(
        worker.fake_actions().is_empty(),
        "nothing reached apptainer"
    );
}

#[tokio::test]
async fn a_definition_file_injection_is_refused_before_anything_runs() {
    let worker = spawn_worker().await;
    let mut start = start_request("inj");
    start["container_command"] = json!(["jupyter lab", "%post", "touch /pwned"]);

    let reply = worker.call(start).await;

    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        worker.fake_actions().is_empty(),
        "nothing reached apptainer"
    );
    assert_eq!(worker.call(named("getcont", "inj")).await.status, 404);
}

#[tokio::test]
async fn a_request_without_reply_to_is_answered_on_the_default_reply_queue() {
    use futures_lite::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let worker = spawn_worker().await;
    let connection = lapin::Connection::connect(crate::helpers::AMQP_URL, Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            worker.reply_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            worker.reply_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();

    worker
        .client
        .publish(
            named("getcont", "nobody").to_string().as_bytes(),
            Publish {
                correlation_id: Some("no-reply-to".into()),
                reply_to: Some(String::new()),
                ..Publish::default()
            },
        )
        .await
        .unwrap();

    let delivery = tokio::time::timeout(REPLY_TIMEOUT, consumer.next())
        .await
        .expect("a reply on the default queue")
        .unwrap()
        .unwrap();
    let reply: schemas::Reply = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(reply.correlation_id.as_deref(), Some("no-reply-to"));
    assert_eq!(reply.status, 404);
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("no-reply-to")
    );
}
