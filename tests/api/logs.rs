//! Logs: `--log-format json` writes one JSON object per line, and what is logged about a request
//! carries its span (correlation id, op, container, node), never its body.

use orchestrator_producer::Publish;
use serde_json::Value;

use crate::helpers::{
    named, spawn_worker, spawn_worker_with, start_request, TestWorker, WorkerOptions, REPLY_TIMEOUT,
};

/// Sends `request` with `correlation_id` and waits for its reply.
async fn call_as(worker: &TestWorker, request: Value, correlation_id: &str) -> schemas::Reply {
    let options = Publish {
        correlation_id: Some(correlation_id.to_owned()),
        ..Publish::default()
    };
    worker
        .send(request, options)
        .await
        .wait(REPLY_TIMEOUT)
        .await
        .unwrap()
}

#[tokio::test]
async fn json_logs_are_json_lines_and_carry_the_request_span() {
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--log-format".into(), "json".into()],
        ..WorkerOptions::default()
    })
    .await;
    let correlation_id = format!("logs-{}", uuid::Uuid::new_v4().simple());

    let reply = call_as(&worker, start_request("logged"), &correlation_id).await;

    assert_eq!(reply.status, 201, "{reply:?}");
    let log = worker.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "worker started"));
    let answered = lines
        .iter()
        .find(|l| {
            l["span"]["correlation_id"] == correlation_id.as_str()
                && l["fields"]["message"] == "request answered"
        })
        .unwrap_or_else(|| panic!("no line carries {correlation_id} in its span:\n{log}"));
    assert_eq!(answered["span"]["op"], "start");
    assert_eq!(answered["span"]["container"], "logged");
    assert_eq!(answered["span"]["node"], worker.node.as_str());
    assert_eq!(answered["fields"]["status"], 201);
    assert!(
        !log.contains("jupyter lab --no-browser"),
        "request bodies stay out of info-level logs:\n{log}"
    );
}

#[tokio::test]
async fn text_logs_off_a_terminal_have_no_colour_codes_and_name_the_request() {
    let worker = spawn_worker().await;
    let correlation_id = format!("text-{}", uuid::Uuid::new_v4().simple());

    let reply = call_as(&worker, named("getcont", "nobody"), &correlation_id).await;

    assert_eq!(reply.status, 404, "{reply:?}");
    let log = worker.log();
    assert!(
        !log.contains('\u{1b}'),
        "stderr is a file, not a terminal: no ANSI codes\n{log}"
    );
    let answered = log
        .lines()
        .find(|l| l.contains("request answered") && l.contains(&correlation_id))
        .unwrap_or_else(|| panic!("no 'request answered' line names {correlation_id}:\n{log}"));
    assert!(answered.contains("op=getcont"), "{answered}");
    assert!(answered.contains("container=nobody"), "{answered}");
    assert!(answered.contains("status=404"), "{answered}");
}

#[tokio::test]
async fn rust_log_chooses_what_is_logged() {
    let worker = spawn_worker_with(WorkerOptions {
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..WorkerOptions::default()
    })
    .await;

    assert_eq!(worker.call(named("getcont", "quiet")).await.status, 404);

    let log = worker.log();
    assert!(
        !log.contains("worker started") && !log.contains("request answered"),
        "info lines are filtered out at RUST_LOG=warn:\n{log}"
    );
}
