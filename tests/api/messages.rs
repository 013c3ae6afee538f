//! What a new user reads: help texts, usage lines and the first errors of the command line and
//! the worker, each saying what to do.

use std::process::Command;

use crate::cli::{assert_exit, assert_stderr_contains, orchestrator, stderr, stdout};
use crate::helpers::{free_loopback_port, spawn_worker, worker_bin};

#[tokio::test]
async fn a_password_containing_at_signs_never_reaches_the_command_lines_messages() {
    let port = free_loopback_port();
    let url = format!("amqp://guest:p@ss:w@rd@127.0.0.1:{port}/%2f");

    let output = orchestrator("unused", &["--amqp-url", &url, "getcont", "nb1"]).await;

    assert_exit(&output, 3, "an unreachable broker");
    assert_stderr_contains(&output, &format!("amqp://guest:***@127.0.0.1:{port}"));
    let text = stderr(&output);
    for part in ["p@ss", "ss:w", "w@rd", "rd@"] {
        assert!(!text.contains(part), "{part:?} of the password in:\n{text}");
    }
}

#[tokio::test]
async fn an_empty_exchange_name_is_refused_before_anything_is_sent() {
    let output = orchestrator("", &["getcont", "nb1"]).await;

    assert_exit(&output, 2, "an empty ORCHESTRATOR_EXCHANGE");
    assert_stderr_contains(&output, "the exchange's name is empty");
    assert_stderr_contains(&output, "ORCHESTRATOR_EXCHANGE");
}

#[test]
fn the_worker_refuses_an_empty_exchange_or_queue_name_at_once() {
    for (flag, env, said) in [
        (
            "--exchange",
            "ORCHESTRATOR_EXCHANGE",
            "the exchange's name is empty",
        ),
        (
            "--reply-queue",
            "ORCHESTRATOR_REPLY_QUEUE",
            "the queue's name is empty",
        ),
    ] {
        let output = Command::new(worker_bin())
            .args(["--check", flag, ""])
            .output()
            .unwrap();

        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} '': {text}");
        assert!(text.contains(said), "{text}");
        assert!(text.contains(env), "{text}");
    }
}

#[test]
fn the_worker_refuses_an_invalid_node_id_and_the_removed_queue_flag() {
    let output = Command::new(worker_bin())
        .args(["--check", "--node", "host a"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("the node id \"host a\" is not valid"),
        "{text}"
    );

    let output = Command::new(worker_bin())
        .args(["--check", "--queue", "apptainer.requests"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("--queue"), "{text}");
}

#[tokio::test]
async fn usage_lines_do_not_claim_that_settings_from_the_environment_are_required() {
    let output = orchestrator("try.requests", &["stop"]).await;

    assert_exit(&output, 2, "stop without a name");
    let text = stderr(&output);
    let usage = text
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_else(|| panic!("no usage line in:\n{text}"));
    assert!(!usage.contains("--exchange"), "{usage}");
    assert!(!usage.contains("--amqp-url"), "{usage}");
}

#[tokio::test]
async fn start_help_says_plainly_which_flags_decide_the_image_that_is_pulled() {
    let output = orchestrator("unused", &["start", "--help"]).await;

    assert_exit(&output, 0, "start --help");
    let text = stdout(&output);
    for expected in [
        "is pulled",
        "docker://jupyter/base-notebook:latest",
        "library://",
        "oras://",
        "only recorded",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
}

#[test]
fn the_workers_help_shows_the_default_broker_url() {
    let output = Command::new(worker_bin())
        .arg("--help")
        .env_remove("AMQP_URL")
        .output()
        .unwrap();

    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("[default: amqp://guest:guest@127.0.0.1:5672/%2f]"),
        "{text}"
    );
}

#[tokio::test]
async fn replies_prints_what_no_wait_sent_to_the_default_reply_queue() {
    // Arrange: the test worker's default reply queue stands for apptainer.replies.
    let worker = spawn_worker().await;
    let sent = orchestrator(&worker.exchange, &["--no-wait", "getcont", "nb1"]).await;
    assert_exit(&sent, 0, "--no-wait");
    let correlation_id = stdout(&sent).trim().to_owned();

    // Act
    let output = orchestrator(
        &worker.exchange,
        &[
            "replies",
            "--reply-queue",
            &worker.reply_queue,
            "--timeout",
            "60s",
        ],
    )
    .await;

    // Assert
    assert_exit(&output, 0, "replies");
    let text = stdout(&output);
    let line = text
        .lines()
        .find(|l| l.contains(&correlation_id))
        .unwrap_or_else(|| panic!("no reply for {correlation_id} in:\n{text}"));
    let reply: schemas::Reply = serde_json::from_str(line).unwrap();
    assert_eq!(reply.status, 404);
    let again = orchestrator(
        &worker.exchange,
        &["replies", "--reply-queue", &worker.reply_queue],
    )
    .await;
    assert_exit(&again, 0, "replies on an empty queue");
    assert!(
        !stdout(&again).contains(&correlation_id),
        "a reply is printed once"
    );
    assert_stderr_contains(&again, "no replies waiting");
}
