//! The HTTP listener: `/healthz`, `/readyz` and `/metrics` against a running worker, and the
//! counters moving with the requests it handles.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use orchestrator_producer::Publish;

use crate::faults::{close_worker_connections, kill_instance};
use crate::helpers::{
    free_loopback_port, named, spawn_worker_with, start_request, TestWorker, WorkerOptions,
    REPLY_TIMEOUT,
};

const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET path` over HTTP/1.1 on loopback: (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("nothing listens on 127.0.0.1:{port}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    (status, body.to_owned())
}

/// The value of the sample `name{labels}` (labels as rendered, in order), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

async fn worker_with_listener() -> (TestWorker, u16) {
    let port = free_loopback_port();
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--http-addr".into(), format!("127.0.0.1:{port}")],
        ..WorkerOptions::default()
    })
    .await;
    (worker, port)
}

/// Polls `/readyz` until it answers 200 (the consumer registration and the readiness flag are
/// set a moment apart).
async fn wait_until_ready(worker: &TestWorker, port: u16) {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    loop {
        let (status, body) = get(port, "/readyz").await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}: {body}\nlog:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_once_the_worker_consumes() {
    let (worker, port) = worker_with_listener().await;

    let (status, body) = get(port, "/healthz").await;

    assert_eq!(status, 200, "{body}");
    wait_until_ready(&worker, port).await;
    assert_eq!(get(port, "/nothing-here").await.0, 404);
}

#[tokio::test]
async fn readyz_answers_503_with_the_reason_when_the_store_refuses_writes() {
    let (worker, port) = worker_with_listener().await;
    wait_until_ready(&worker, port).await;
    // A trigger that aborts every write to the probe table: to the worker, the store refuses
    // writes as it would on a full disk.
    let db = rusqlite::Connection::open(worker.data_dir().join("state.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_probe BEFORE INSERT ON write_probe
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();

    let (status, body) = get(port, "/readyz").await;

    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store: refuses writes"), "{body}");
}

#[tokio::test]
async fn metrics_count_requests_replies_and_apptainer_calls() {
    let (worker, port) = worker_with_listener().await;
    let (status, before) = get(port, "/metrics").await;
    assert_eq!(status, 200, "{before}");

    assert_eq!(worker.call(start_request("counted")).await.status, 201);
    assert_eq!(worker.call(named("getcont", "counted")).await.status, 200);
    assert_eq!(worker.call(named("getcont", "missing")).await.status, 404);
    assert_eq!(
        worker
            .call(serde_json::json!({"op": "start", "container_name": "Bad Name!"}))
            .await
            .status,
        400
    );

    let (_, after) = get(port, "/metrics").await;
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved(r#"orchestrator_requests_received_total{op="start"}"#),
        2.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"orchestrator_requests_received_total{op="getcont"}"#),
        2.0
    );
    assert_eq!(
        moved(r#"orchestrator_replies_total{op="start",status="201"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"orchestrator_replies_total{op="start",status="400"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"orchestrator_replies_total{op="getcont",status="404"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"orchestrator_operation_duration_seconds_count{op="start"}"#),
        1.0
    );
    assert!(moved(r#"orchestrator_apptainer_invocations_total{subcommand="build"}"#) >= 1.0);
    assert!(
        moved(r#"orchestrator_apptainer_invocations_total{subcommand="instance start"}"#) >= 1.0
    );
    for gauge in [
        "orchestrator_inbox_depth",
        "orchestrator_outbox_depth",
        "orchestrator_lanes",
        "orchestrator_longest_lane",
    ] {
        assert!(
            after.lines().any(|l| l.starts_with(&format!("{gauge} "))),
            "{gauge} is missing:\n{after}"
        );
    }
}

/// Polls `/metrics` until `series` reaches at least `at_least`; returns the last scrape.
pub(crate) async fn wait_for_sample(
    worker: &TestWorker,
    port: u16,
    series: &str,
    at_least: f64,
) -> String {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    loop {
        let (_, metrics) = get(port, "/metrics").await;
        if sample(&metrics, series) >= at_least {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed below {at_least}:\n{metrics}\nlog:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_duplicates_and_broker_reconnects_and_readyz_recovers() {
    let (worker, port) = worker_with_listener().await;
    wait_until_ready(&worker, port).await;
    let key = format!("dup-{}", uuid::Uuid::new_v4().simple());
    let publish = || Publish {
        message_id: Some(key.clone()),
        ..Publish::default()
    };

    let first = worker.send(start_request("twice"), publish()).await;
    let second = worker.send(start_request("twice"), publish()).await;
    let first = first.wait(REPLY_TIMEOUT).await.unwrap();
    let second = second.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!((first.status, second.status), (201, 201));
    let (_, metrics) = get(port, "/metrics").await;
    assert_eq!(
        sample(&metrics, "orchestrator_duplicates_suppressed_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"orchestrator_requests_received_total{op="start"}"#
        ),
        2.0
    );

    assert!(close_worker_connections(&worker) >= 1);

    wait_for_sample(&worker, port, "orchestrator_broker_reconnects_total", 1.0).await;
    wait_until_ready(&worker, port).await;
}

#[tokio::test]
async fn metrics_count_apptainer_failures_and_reconciler_findings() {
    let port = free_loopback_port();
    let worker = spawn_worker_with(WorkerOptions {
        args: vec![
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--reconcile-interval-secs".into(),
            "1".into(),
            "--restore-policy".into(),
            "none".into(),
        ],
        ..WorkerOptions::default()
    })
    .await;
    worker.control_fake(&["FAIL=build"]);
    assert_eq!(worker.call(start_request("fails")).await.status, 500);
    worker.control_fake(&[]);
    assert_eq!(worker.call(start_request("dies")).await.status, 201);

    kill_instance(&worker, "dies");

    let metrics = wait_for_sample(
        &worker,
        port,
        r#"orchestrator_reconciler_findings_total{kind="dead"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &metrics,
            r#"orchestrator_apptainer_failures_total{subcommand="build"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"orchestrator_replies_total{op="start",status="500"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_non_loopback_http_address_stops_the_worker_without_http_allow_remote() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_loopback_port();

    let output = std::process::Command::new(crate::helpers::worker_bin())
        .args(["--http-addr", &format!("0.0.0.0:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("APPTAINER_BIN", crate::helpers::fake_bin())
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--http-allow-remote"), "{stderr}");
}

#[tokio::test]
async fn metrics_show_this_hosts_share_of_the_fleet_labelled_by_its_node() {
    // Arrange: capacity 3, two containers placed here, one of them stopped.
    let port = free_loopback_port();
    let worker = spawn_worker_with(WorkerOptions {
        args: vec![
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--max-containers".into(),
            "3".into(),
        ],
        ..WorkerOptions::default()
    })
    .await;
    assert_eq!(worker.call(start_request("shared1")).await.status, 201);
    assert_eq!(worker.call(start_request("shared2")).await.status, 201);
    assert_eq!(worker.call(named("stop", "shared2")).await.status, 200);
    assert_eq!(
        worker
            .call(serde_json::json!({"op": "getallcont"}))
            .await
            .status,
        200
    );

    // Act
    let (_, metrics) = get(port, "/metrics").await;

    // Assert: every series carries the node, so a dashboard sums them over the fleet.
    let node = &worker.node;
    let value = |name: &str| sample(&metrics, &format!("{name}{{node=\"{node}\"}}"));
    assert_eq!(
        value("orchestrator_fleet_containers_held"),
        2.0,
        "{metrics}"
    );
    assert_eq!(value("orchestrator_fleet_containers_running"), 1.0);
    assert_eq!(value("orchestrator_fleet_capacity"), 3.0);
    assert_eq!(value("orchestrator_fleet_placements_total"), 2.0);
    assert!(value("orchestrator_fleet_gathers_answered_total") >= 1.0);
}
