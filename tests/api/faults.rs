//! Faults injected for real: dead instances, hung and garbled apptainer, expired and poison
//! requests, SIGTERM, broker connections closed under the worker, a full disk.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orchestrator_producer::Publish;
use serde_json::{json, Value};

use crate::helpers::{
    assert_valid_reply, eventually, named, raw_client, spawn_worker, spawn_worker_with,
    start_request, wait_until_owned, TestWorker, WorkerOptions, AMQP_URL, REPLY_TIMEOUT,
};

/// Publishes `body` with raw AMQP properties and awaits its reply on a queue of its own.
async fn call_with_properties(
    worker: &TestWorker,
    body: Value,
    properties: BasicProperties,
) -> schemas::Reply {
    let mut raw = raw_client().await;
    let properties = properties.with_correlation_id(uuid::Uuid::new_v4().to_string().into());
    raw.publish(&worker.exchange, &body, properties).await;
    let reply = raw.next_reply().await;
    assert_valid_reply(&reply);
    let _ = raw.connection.close(200, "done".into()).await;
    reply
}

fn code(reply: &schemas::Reply) -> String {
    reply
        .error
        .as_ref()
        .map(|e| {
            serde_json::to_value(e.code)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .unwrap_or_default()
}

fn record(reply: &schemas::Reply) -> schemas::ContainerRecord {
    match &reply.result {
        Some(schemas::ReplyResult::Container(record)) => record.clone(),
        other => panic!("expected a container record, got {other:?}"),
    }
}

/// Kills an instance's monitor process with SIGKILL: the instance dies outside the orchestrator.
pub(crate) fn kill_instance(worker: &TestWorker, name: &str) {
    let pattern = worker
        .dir
        .path()
        .join(format!("apptainer/instances/app/*/*/{name}/{name}.json"));
    let state = glob_one(&pattern);
    let state: Value = serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    for pid in [&state["ppid"], &state["pid"]] {
        Command::new("kill")
            .args(["-KILL", &pid.as_i64().unwrap().to_string()])
            .status()
            .unwrap();
    }
}

/// The one file a `dir/*/*/name/name.json` pattern matches.
fn glob_one(pattern: &std::path::Path) -> PathBuf {
    let text = pattern.display().to_string();
    let output = Command::new("sh")
        .args(["-c", &format!("ls {text}")])
        .output()
        .unwrap();
    let found = String::from_utf8(output.stdout).unwrap();
    PathBuf::from(
        found
            .lines()
            .next()
            .unwrap_or_else(|| panic!("nothing matches {text}")),
    )
}

#[tokio::test]
async fn a_dead_instance_is_recorded_as_stopped_when_the_restore_policy_is_none() {
    let worker = spawn_worker_with(WorkerOptions {
        args: vec![
            "--reconcile-interval-secs".into(),
            "1".into(),
            "--restore-policy".into(),
            "none".into(),
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(worker.call(start_request("reco-none")).await.status, 201);

    kill_instance(&worker, "reco-none");

    eventually(
        "the reconciler recording the dead instance",
        Duration::from_secs(20),
        async || !record(&worker.call(named("getcont", "reco-none")).await).container_active,
    )
    .await;
    assert!(
        worker.running_instances().is_empty(),
        "nothing was restarted"
    );
    // It can be restarted by request, as any stopped container.
    assert_eq!(worker.call(named("restart", "reco-none")).await.status, 200);
}

#[tokio::test]
async fn a_dead_instance_is_restarted_by_the_default_restore_policy_and_strangers_are_left_alone() {
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--reconcile-interval-secs".into(), "1".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(worker.call(start_request("reco-back")).await.status, 201);
    // An instance the worker does not know, started by someone else on the host.
    let image = worker.data_dir().join("images/reco-back");
    let stranger = Command::new(crate::helpers::fake_bin())
        .args(["instance", "start", image.to_str().unwrap(), "stranger"])
        .env("APPTAINER_CONFIGDIR", worker.dir.path().join("apptainer"))
        .output()
        .unwrap();
    assert!(stranger.status.success(), "{stranger:?}");

    kill_instance(&worker, "reco-back");

    eventually(
        "the dead instance being started again",
        Duration::from_secs(20),
        async || {
            worker
                .fake_calls()
                .iter()
                .filter(|c| {
                    c.subcommand() == "instance start" && c.concerns("reco-back") && c.exit == 0
                })
                .count()
                == 2
        },
    )
    .await;
    eventually(
        "the instance running again",
        Duration::from_secs(10),
        async || worker.running_instances().contains(&"reco-back".to_owned()),
    )
    .await;
    assert!(record(&worker.call(named("getcont", "reco-back")).await).container_active);
    assert!(
        worker.running_instances().contains(&"stranger".to_owned()),
        "the stranger is untouched"
    );
    assert!(
        worker.log().contains("stranger"),
        "the stranger is reported in the log"
    );
    assert!(!worker
        .fake_calls()
        .iter()
        .any(|c| c.subcommand() == "instance stop"));
}

#[tokio::test]
async fn a_request_whose_deadline_passed_is_answered_504_and_not_run() {
    let worker = spawn_worker().await;
    let past = humantime_rfc3339(SystemTime::now() - Duration::from_secs(60));
    let mut headers = FieldTable::default();
    headers.insert("x-deadline".into(), AMQPValue::LongString(past.into()));

    let by_header = call_with_properties(
        &worker,
        start_request("late"),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    // `expiration` counts from the message's timestamp: sent a minute ago with 10 s to live.
    let sent = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 60;
    let by_expiration = call_with_properties(
        &worker,
        start_request("late2"),
        BasicProperties::default()
            .with_expiration("10000".into())
            .with_timestamp(sent),
    )
    .await;

    for reply in [&by_header, &by_expiration] {
        assert_eq!(
            (reply.status, code(reply)),
            (504, "deadline_exceeded".to_owned()),
            "{reply:?}"
        );
    }
    assert!(
        worker
            .fake_calls()
            .iter()
            .all(|c| c.subcommand() != "build"),
        "nothing was built"
    );
    assert_eq!(worker.call(named("getcont", "late")).await.status, 404);

    // A deadline in the future does not get in the way.
    let mut headers = FieldTable::default();
    let future = humantime_rfc3339(SystemTime::now() + Duration::from_secs(600));
    headers.insert("x-deadline".into(), AMQPValue::LongString(future.into()));
    let in_time = call_with_properties(
        &worker,
        start_request("on-time"),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    assert_eq!(in_time.status, 201, "{in_time:?}");
}

fn humantime_rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let output = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_hung_build_times_out_its_whole_process_group_is_killed_and_the_lane_goes_on() {
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--build-timeout-secs".into(), "2".into()],
        ..Default::default()
    })
    .await;
    worker.control_fake(&["HANG=build"]);

    let reply = worker.call(start_request("hung")).await;

    assert_eq!(
        (reply.status, code(&reply)),
        (504, "timeout".to_owned()),
        "{reply:?}"
    );
    assert!(reply.error.unwrap().message.contains("build"));
    let builds_alive = Command::new("pgrep")
        .args([
            "-f",
            &format!(
                "build --force --sandbox {}",
                worker.data_dir().join("images/hung").display()
            ),
        ])
        .output()
        .unwrap();
    assert!(builds_alive.stdout.is_empty(), "the hung build was killed");
    assert!(!worker.data_dir().join("images/hung").exists());
    worker.control_fake(&[]);
    assert_eq!(
        worker.call(start_request("hung")).await.status,
        201,
        "the lane goes on"
    );
}

#[tokio::test]
async fn unreadable_instance_list_output_is_a_runtime_failure_that_changes_nothing() {
    let worker = spawn_worker().await;
    worker.control_fake(&["GARBAGE_LIST=1"]);

    let reply = worker.call(start_request("garbled")).await;

    assert_eq!(
        (reply.status, code(&reply)),
        (500, "runtime_failed".to_owned()),
        "{reply:?}"
    );
    assert!(reply.error.unwrap().message.contains("instance list"));
    worker.control_fake(&[]);
    assert_eq!(worker.call(named("getcont", "garbled")).await.status, 404);
}

#[tokio::test]
async fn sigterm_lets_the_running_build_finish_the_queued_write_resume_and_the_queued_read_be_asked_again(
) {
    let mut worker = spawn_worker_with(WorkerOptions {
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=2000".into())],
        ..Default::default()
    })
    .await;
    let running = worker
        .send(start_request("drain"), Publish::default())
        .await;
    // Sent once the start is placed (the name routes to this host): queued behind it here,
    // asking for progress so that the test knows when both are in the lane.
    wait_until_owned(&worker.exchange, "drain", Duration::from_secs(20)).await;
    let (in_lane, mut queued_events) = tokio::sync::mpsc::unbounded_channel();
    let mut waiting = Vec::new();
    for request in [named("stop", "drain"), named("getcont", "drain")] {
        let with_progress = Publish {
            progress: true,
            ..Publish::default()
        };
        let pending = worker.send(request, with_progress).await;
        let in_lane = in_lane.clone();
        waiting.push(tokio::spawn(async move {
            pending
                .wait_with_progress(REPLY_TIMEOUT * 2, move |event| {
                    let _ = in_lane.send(event.stage.clone());
                })
                .await
                .map(|envelope| envelope.reply)
        }));
    }
    for _ in 0..2 {
        let event = tokio::time::timeout(REPLY_TIMEOUT, queued_events.recv()).await;
        assert_eq!(event.unwrap().flatten().as_deref(), Some("queued"));
    }
    let read = waiting.pop().unwrap();
    let queued = waiting.pop().unwrap();
    worker
        .wait_for_builds_begun(1, Duration::from_secs(20))
        .await;

    let status = worker.terminate(Duration::from_secs(30)).await;

    assert!(
        status.success(),
        "the worker exits 0 on SIGTERM: {status:?}\n{}",
        worker.log()
    );
    assert_eq!(
        running.wait(REPLY_TIMEOUT).await.unwrap().status,
        201,
        "the running build finished and was answered"
    );
    // The read queued behind the stop was acknowledged when queued: it is answered, asking the
    // client to send it again, rather than left to a broker that would not redeliver it.
    let read = read.await.unwrap().unwrap();
    assert_eq!(
        (read.status, code(&read)),
        (500, "internal".to_owned()),
        "{read:?}"
    );
    assert!(read.error.unwrap().message.contains("send it again"));
    assert!(worker.running_instances().contains(&"drain".to_owned()));
    worker.restart().await;
    assert_eq!(
        queued.await.unwrap().unwrap().status,
        200,
        "the queued stop ran after the restart"
    );
    assert!(worker.running_instances().is_empty());
}

/// Closes the worker's broker connections from the broker's side.
pub(crate) fn close_worker_connections(worker: &TestWorker) -> usize {
    let output = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(&worker.node)) {
        let pid = line.split_whitespace().next().unwrap();
        let status = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test: broker outage"])
            .status()
            .unwrap();
        assert!(status.success());
        closed += 1;
    }
    closed
}

#[tokio::test]
async fn closed_broker_connections_are_reopened_and_no_request_is_lost() {
    let worker = spawn_worker_with(WorkerOptions {
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=300".into())],
        ..Default::default()
    })
    .await;
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(
            worker
                .send(start_request(&format!("outage{i}")), Publish::default())
                .await,
        );
        if i == 8 {
            assert_eq!(
                close_worker_connections(&worker),
                3,
                "a consumer, a publisher and a fleet admin connection"
            );
        }
    }
    for reply in pending {
        assert_eq!(reply.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
    }
    assert_eq!(worker.running_instances().len(), 20);
}

#[tokio::test]
async fn a_deleted_host_queue_is_declared_again_with_its_bindings_and_consumed() {
    let worker = spawn_worker().await;
    assert_eq!(worker.call(start_request("kept")).await.status, 201);
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();

    // The broker cancels the worker's consumer; the queue's bindings go with it.
    channel
        .queue_delete(
            worker.host_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    let reply = worker.call(json!({"op": "getallcont"})).await;
    assert_eq!(reply.status, 200);
    let reply = worker.call(named("getcont", "kept")).await;
    assert_eq!(
        reply.status, 200,
        "the container's name routes to its host again"
    );
}

#[tokio::test]
async fn a_request_interrupted_too_often_is_given_up_with_500() {
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec!["--max-attempts".into(), "2".into()],
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=30000".into())],
        ..Default::default()
    })
    .await;
    let start = worker
        .send(start_request("poison"), Publish::default())
        .await;
    for round in 1..=2 {
        worker
            .wait_for_builds_begun(round, Duration::from_secs(30))
            .await;
        worker.kill();
        worker.restart().await;
    }

    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(
        (start.status, code(&start)),
        (500, "internal".to_owned()),
        "{start:?}"
    );
    assert!(start.error.unwrap().message.contains("gave it up"));
}

#[tokio::test]
async fn a_full_disk_stops_acknowledging_and_the_worker_recovers_when_space_returns() {
    // Arrange: the data directory on a small file system of its own.
    let mount = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mount.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs (needs root)");
    let _unmount = Unmount(mount.path().to_owned());
    let worker = spawn_worker_with(WorkerOptions {
        data_dir: Some(mount.path().join("data")),
        ..Default::default()
    })
    .await;
    assert_eq!(worker.call(start_request("full")).await.status, 201);
    let filler = mount.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();

    // Act: requests while the disk is full.
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(worker.send(json!({"op": "createvolume", "container_name": "full", "host_location": worker.volume(&format!("v{i}")), "container_location": "/mnt"}), Publish::default()).await);
    }
    // Give the worker time to (wrongly) acknowledge them: nothing to poll for when the
    // expected outcome is that nothing happens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = worker.log();

    // Assert: nothing acknowledged (the broker still holds all five), and the log says why.
    // The broker's counts of a quorum queue lag a little: poll them. The fleet's admin
    // messages (this host's hello when its counts changed) that arrived while the intake
    // waits are held too: at least five, and the five are answered below.
    let mut depth = (0, 0);
    for _ in 0..50 {
        depth = queue_depth(&worker.host_queue());
        if depth.0 + depth.1 >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ready, unacknowledged) = depth;
    assert!(
        ready + unacknowledged >= 5,
        "ready {ready}, unacknowledged {unacknowledged}"
    );
    assert!(log.contains("refuses writes"), "the log says why: {log}");

    std::fs::remove_file(&filler).unwrap();
    let mut statuses = Vec::new();
    for reply in pending {
        statuses.push(reply.wait(REPLY_TIMEOUT).await.unwrap().status);
    }
    assert_eq!(
        statuses, [200; 5],
        "every request ran once the disk had room again"
    );
}

/// Messages ready and unacknowledged in a queue, as the broker counts them.
fn queue_depth(queue: &str) -> (u64, u64) {
    let output = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&output.stdout);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not listed"));
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    (fields[0], fields[1])
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
