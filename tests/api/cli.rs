//! The `orchestrator` command line, run as a person or a script would run it, against a real
//! worker: its output, its progress lines and its exit codes (0 success, 1 error reply,
//! 2 invalid command line, 3 broker or worker unavailable).

use std::process::Output;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use crate::helpers::{assert_valid_reply, spawn_worker, TestWorker, AMQP_URL};

pub(crate) fn cli_bin() -> &'static str {
    env!("CARGO_BIN_EXE_orchestrator-cli-under-test")
}

/// Runs the command line with `args`, talking to the fleet `exchange` on the test broker.
pub(crate) async fn orchestrator(exchange: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(cli_bin())
        .args(args)
        .env("AMQP_URL", AMQP_URL)
        .env("ORCHESTRATOR_EXCHANGE", exchange)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("the orchestrator binary runs")
}

/// Runs a command against the worker's fleet.
async fn run(worker: &TestWorker, args: &[&str]) -> Output {
    orchestrator(&worker.exchange, args).await
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails with the command's output when it did not exit with `code`.
pub(crate) fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

pub(crate) fn assert_stderr_contains(output: &Output, expected: &str) {
    let text = stderr(output);
    assert!(
        text.contains(expected),
        "stderr lacks {expected:?}:\n{text}"
    );
}

/// A durable queue of the test's own on the broker; `delete` removes it.
struct ScratchQueue {
    name: String,
    channel: lapin::Channel,
    _connection: lapin::Connection,
}

impl ScratchQueue {
    async fn declare(name: String) -> Self {
        let connection = lapin::Connection::connect(AMQP_URL, Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            name,
            channel,
            _connection: connection,
        }
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

#[tokio::test]
async fn a_person_takes_a_container_through_its_whole_life_with_the_command_line() {
    // Arrange
    let worker = spawn_worker().await;
    let home = worker.volume("home");
    let extra = worker.volume("extra");

    // Act and assert, command by command.
    let started = run(
        &worker,
        &[
            "start",
            "nb1",
            "--image",
            "jupyter/base-notebook",
            "--command",
            "jupyter lab --no-browser",
            "--volume",
            &home,
            "--env",
            "TZ=UTC",
        ],
    )
    .await;
    assert_exit(&started, 0, "start");
    assert!(
        stdout(&started).starts_with("nb1: running at 10.22."),
        "{}",
        stdout(&started)
    );
    let progress = stderr(&started);
    let stages: Vec<&str> = [
        "nb1: queued (position 0)",
        "nb1: building_image",
        "nb1: starting_instance",
    ]
    .into_iter()
    .filter(|stage| progress.contains(stage))
    .collect();
    assert_eq!(stages.len(), 3, "progress lines on stderr:\n{progress}");
    let positions: Vec<usize> = stages.iter().map(|s| progress.find(s).unwrap()).collect();
    assert!(positions.is_sorted(), "stages out of order:\n{progress}");

    let got = run(&worker, &["get", "nb1"]).await;
    assert_exit(&got, 0, "getcont");
    assert!(
        stdout(&got).contains(&format!("home {home}")),
        "{}",
        stdout(&got)
    );

    let listed = run(&worker, &["getallcont", "--page", "1", "--page-size", "10"]).await;
    assert_exit(&listed, 0, "getallcont");
    let table = stdout(&listed);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("nb1") && lines[1].contains("running"),
        "{table}"
    );
    assert!(table.contains("1 container in all"), "{table}");

    let bound = run(
        &worker,
        &["bind", "nb1", "--host", &extra, "--container", "/mnt"],
    )
    .await;
    assert_exit(&bound, 0, "createvolume");
    assert_eq!(stdout(&bound), format!("nb1: binds {extra}:/mnt\n"));
    assert!(
        stderr(&bound).contains("warning:"),
        "a bind on a running container warns: {}",
        stderr(&bound)
    );

    let steps: [(&[&str], &str); 8] = [
        (&["stop", "nb1"], "nb1: stopped"),
        (
            &["unbind", "nb1", "--host", &extra, "--container", "/mnt"],
            "nb1: binds none",
        ),
        (&["restart", "nb1"], "nb1: running"),
        (&["stop", "nb1"], "nb1: stopped"),
        (&["delete", "nb1"], "nb1: deleted"),
        (
            &["getallcont"],
            "data left by deleted container nb1 (image jupyter/base-notebook)",
        ),
        (
            &["getallcont"],
            "0 containers in all, and data of 1 deleted container after them",
        ),
        (&["delete-data", "nb1"], "nb1: data deleted"),
    ];
    for (args, expected) in steps {
        let output = run(&worker, args).await;
        assert_exit(&output, 0, &args.join(" "));
        assert!(
            stdout(&output).contains(expected),
            "{args:?} printed {:?}",
            stdout(&output)
        );
    }
    assert!(worker.running_instances().is_empty());
}

#[tokio::test]
async fn an_error_reply_exits_1_with_its_message_and_status_on_stderr() {
    let worker = spawn_worker().await;

    let output = run(&worker, &["getcont", "nobody"]).await;

    assert_exit(&output, 1, "getcont of an unknown container");
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        "error: container nobody is not registered on any host of the fleet; start it first (404 not_found)\n"
    );
}

#[tokio::test]
async fn an_invalid_command_line_exits_2_and_sends_nothing() {
    let worker = spawn_worker().await;
    let invalid: [&[&str]; 5] = [
        &["start", "nb1"],
        &["stop", "not a name"],
        &["getallcont", "--page", "0"],
        &["start", "nb1", "--image", "i", "--env", "NOEQUALS"],
        &["frobnicate"],
    ];

    for args in invalid {
        let output = run(&worker, args).await;
        assert_exit(&output, 2, &args.join(" "));
        assert!(!stderr(&output).is_empty(), "{args:?} explains itself");
    }

    let file = worker.dir.path().join("not-json.txt");
    std::fs::write(&file, "op=start").unwrap();
    let output = run(&worker, &["send", file.to_str().unwrap()]).await;
    assert_exit(&output, 2, "send of a file that is not JSON");
    assert_stderr_contains(&output, "is not valid JSON");

    assert!(worker.fake_actions().is_empty());
    let listed = run(&worker, &["getallcont"]).await;
    assert!(stdout(&listed).contains("0 containers in all"));
}

#[tokio::test]
async fn send_passes_a_raw_request_through_and_the_worker_judges_it() {
    let worker = spawn_worker().await;
    let file = worker.dir.path().join("request.json");
    std::fs::write(
        &file,
        r#"{"op":"getcont","container_name":"nb1","colour":"red"}"#,
    )
    .unwrap();

    let output = run(&worker, &["send", file.to_str().unwrap()]).await;

    assert_exit(&output, 1, "send of a request with an unknown field");
    assert_stderr_contains(&output, "colour");
    assert_stderr_contains(&output, "(400 bad_request)");
}

#[tokio::test]
async fn json_prints_the_final_envelope_only() {
    let worker = spawn_worker().await;

    let output = run(
        &worker,
        &["--json", "start", "nb1", "--image", "jupyter/base-notebook"],
    )
    .await;

    assert_exit(&output, 0, "start --json");
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let reply: schemas::Reply = serde_json::from_str(&text).unwrap();
    assert_valid_reply(&reply);
    assert!(reply.is_final);
    assert_eq!(reply.status, 201);
    assert_eq!(stderr(&output), "");
}

#[tokio::test]
async fn an_unreachable_broker_exits_3_and_names_the_likely_cause() {
    let output = tokio::process::Command::new(cli_bin())
        .args([
            "getcont",
            "nb1",
            "--amqp-url",
            "amqp://guest:secret@127.0.0.1:1/%2f",
        ])
        .output()
        .await
        .unwrap();

    assert_exit(&output, 3, "an unreachable broker");
    let message = stderr(&output);
    assert!(message.contains("is RabbitMQ running"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password is not shown: {message}"
    );
}

#[tokio::test]
async fn a_missing_exchange_exits_3_saying_no_worker_has_started_with_it() {
    let exchange = format!("test.absent.{}", uuid::Uuid::new_v4().simple());

    let output = orchestrator(&exchange, &["getcont", "nb1"]).await;

    assert_exit(&output, 3, "a missing exchange");
    assert_stderr_contains(
        &output,
        &format!("the exchange {exchange} does not exist; no worker has started on this broker with this --exchange"),
    );
}

#[tokio::test]
async fn a_missing_reply_queue_exits_3_saying_to_declare_it_or_leave_out_reply_to() {
    let worker = spawn_worker().await;
    let absent = format!("test.absent.{}", uuid::Uuid::new_v4().simple());

    let output = run(&worker, &["--reply-to", &absent, "getcont", "nb1"]).await;

    assert_exit(&output, 3, "a missing reply queue");
    assert_stderr_contains(
        &output,
        &format!(
            "the reply queue {absent} does not exist; declare it first, or leave out --reply-to"
        ),
    );
}

#[tokio::test]
async fn with_the_worker_stopped_a_command_exits_3_at_once_and_sends_nothing() {
    // Arrange: the fleet's exchange and queues exist (as a worker left them) but nobody
    // consumes them.
    let mut worker = spawn_worker().await;
    worker.terminate(std::time::Duration::from_secs(30)).await;

    // Act: a start, whose own timeout is an hour.
    let started = std::time::Instant::now();
    let output = run(
        &worker,
        &[
            "start",
            "nb1",
            "--image",
            "i",
            "--distributor",
            "docker",
            "--os",
            "o",
            "--version",
            "v",
        ],
    )
    .await;

    // Assert
    assert_exit(&output, 3, "no worker on the fleet");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_stderr_contains(
        &output,
        &format!("no worker of the fleet {} consumes", worker.exchange),
    );
    assert_stderr_contains(&output, "nothing was sent");
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .unwrap();
    for queue in [worker.topology().place(), worker.host_queue()] {
        // The worker's own hello (TTL 2 s) may still wait in its queue: a request would not
        // go away.
        crate::helpers::eventually(
            &format!("{queue} is empty (the request was not left there)"),
            std::time::Duration::from_secs(10),
            async || {
                orchestrator_producer::declared(&connection, &queue)
                    .await
                    .unwrap()
                    .expect("the queue exists")
                    .message_count()
                    == 0
            },
        )
        .await;
    }
}

#[tokio::test]
async fn no_wait_publishes_and_the_reply_arrives_on_the_named_queue() {
    use futures_lite::StreamExt;
    use lapin::options::BasicConsumeOptions;
    // Arrange: a durable queue of the backend's.
    let worker = spawn_worker().await;
    let replies = ScratchQueue::declare(format!("{}.mine", worker.reply_queue)).await;

    // Act
    let output = run(
        &worker,
        &["--no-wait", "--reply-to", &replies.name, "getcont", "nb1"],
    )
    .await;

    // Assert
    assert_exit(&output, 0, "--no-wait");
    let correlation_id = stdout(&output).trim().to_owned();
    let mut consumer = replies
        .channel
        .basic_consume(
            replies.name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(crate::helpers::REPLY_TIMEOUT, consumer.next())
        .await
        .expect("the reply arrives on the named queue")
        .unwrap()
        .unwrap();
    let reply: schemas::Reply = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(
        reply.correlation_id.as_deref(),
        Some(correlation_id.as_str())
    );
    assert_eq!(reply.status, 404);
    replies.delete().await;
}

#[tokio::test]
async fn waiting_on_a_named_reply_queue_takes_only_this_commands_reply() {
    let worker = spawn_worker().await;
    let replies = ScratchQueue::declare(format!("{}.shared", worker.reply_queue)).await;

    let output = run(&worker, &["--reply-to", &replies.name, "getcont", "nb1"]).await;

    assert_exit(&output, 1, "getcont through a named reply queue");
    assert_stderr_contains(&output, "(404 not_found)");
    replies.delete().await;
}

#[tokio::test]
async fn completions_are_printed_for_a_shell() {
    let output = orchestrator("unused", &["completions", "bash"]).await;

    assert_exit(&output, 0, "completions bash");
    assert!(stdout(&output).contains("getallcont"));
}
