//! `orchestrator-worker --check`: one line per check, exit 0 when everything passes, 1 with the
//! failing check named (and what to do) otherwise.

use std::process::{Command, Output};

use crate::helpers::{delete_fleet, fake_bin, free_loopback_port, worker_bin, AMQP_URL};

/// Runs `--check` with its own queues and data directory, then deletes the queues it declared.
async fn run_check(amqp_url: &str, apptainer: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let exchange = format!("test.check.{}", uuid::Uuid::new_v4().simple());
    let reply_queue = format!("{exchange}.replies");
    let output = Command::new(worker_bin())
        .arg("--check")
        .args(["--amqp-url", amqp_url])
        .args(["--exchange", &exchange, "--node", "check-node"])
        .args(["--reply-queue", &reply_queue])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("APPTAINER_BIN", apptainer)
        .env("APPTAINER_CONFIGDIR", dir.path().join("apptainer"))
        .output()
        .expect("the worker binary runs");
    delete_fleet(&exchange, &["check-node"], &[&reply_queue]).await;
    (output, dir)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn check_passes_with_a_reachable_broker_and_a_working_apptainer() {
    let (output, dir) = run_check(AMQP_URL, fake_bin()).await;

    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for check in ["settings", "data directory", "broker", "apptainer"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("ok      {check}:"))),
            "no passing {check} line in:\n{text}"
        );
    }
    assert!(
        text.contains("apptainer version "),
        "reports the version: {text}"
    );
    assert!(text.contains("all 4 checks passed"), "{text}");
    assert!(
        dir.path().join("data/state.sqlite").exists(),
        "the state database was opened"
    );
}

#[tokio::test]
async fn check_fails_and_names_the_broker_when_nothing_listens_on_its_port() {
    let port = free_loopback_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");

    let (output, _dir) = run_check(&url, fake_bin()).await;

    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("FAILED  broker:"), "{text}");
    assert!(text.contains("fix: start RabbitMQ"), "{text}");
    assert!(
        text.contains("ok      apptainer:"),
        "the other checks still run: {text}"
    );
    assert!(text.contains("1 of 4 checks FAILED"), "{text}");
}

#[tokio::test]
async fn check_fails_and_names_apptainer_when_its_binary_is_missing() {
    let (output, _dir) = run_check(AMQP_URL, "/nonexistent/apptainer").await;

    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("FAILED  apptainer:"), "{text}");
    assert!(text.contains("/nonexistent/apptainer"), "{text}");
    assert!(text.contains("fix: install Apptainer"), "{text}");
    assert!(text.contains("ok      broker:"), "{text}");
}
