//! The worker process's own start and end: a worker that cannot work exits at once saying why
//! (instead of consuming requests it can never answer), and a SIGTERM is over within the drain
//! timeout, whatever is still running.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use orchestrator_producer::Publish;

use crate::helpers::{
    delete_fleet, fake_bin, spawn_worker_with, start_request, worker_bin, WorkerOptions, AMQP_URL,
};

/// How long a worker that cannot work may take to say so and exit.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// Runs the worker on queues of its own with `args` (after `prefix`, e.g. `setpriv ...`) and
/// waits at most [`EXIT_LIMIT`] for it to exit; a worker still running then is killed and the
/// test fails with its log. Deletes the queues it may have declared.
async fn run_worker_expecting_exit(prefix: &[&str], data_dir: &Path, args: &[&str]) -> Output {
    let exchange = format!("test.startup.{}", uuid::Uuid::new_v4().simple());
    let reply_queue = format!("{exchange}.replies");
    let (program, before) = match prefix.split_first() {
        Some((program, rest)) => (*program, [rest, &[worker_bin()]].concat()),
        None => (worker_bin(), vec![]),
    };
    let mut child = Command::new(program)
        .args(before)
        .args(["--exchange", &exchange, "--node", "startup-node"])
        .args(["--reply-queue", &reply_queue])
        .args(["--amqp-url", AMQP_URL])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,lapin=warn")
        .env("APPTAINER_CONFIGDIR", data_dir.with_file_name("apptainer"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let deadline = Instant::now() + EXIT_LIMIT;
    let exited = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    delete_fleet(&exchange, &["startup-node"], &[&reply_queue]).await;
    assert!(
        exited,
        "the worker was still running {EXIT_LIMIT:?} after its start; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_worker_without_apptainer_exits_at_once_naming_it_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();

    let output = run_worker_expecting_exit(
        &[],
        &dir.path().join("data"),
        &["--apptainer", "/nonexistent/apptainer"],
    )
    .await;

    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("/nonexistent/apptainer"), "{log}");
    assert!(log.contains("fix: install Apptainer"), "{log}");
    assert!(!log.contains("consuming requests"), "{log}");
}

#[tokio::test]
async fn a_worker_that_cannot_write_its_data_directory_exits_at_once_saying_why() {
    // Arrange: a data directory prepared by root (as a first run would), then handed to a user
    // who can read it but not write it.
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let data = dir.path().join("data");
    for sub in ["images", "definitions", "volumes", "run/apptainer-calls"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
    }
    let prepared = Command::new(worker_bin())
        .args(["--check", "--amqp-url", "amqp://127.0.0.1:1/"])
        .arg("--data-dir")
        .arg(&data)
        .env("APPTAINER_BIN", fake_bin())
        .output()
        .unwrap();
    assert!(data.join("state.sqlite").exists(), "{prepared:?}");
    chmod(&data, 0o755);

    // Act
    let output = run_worker_expecting_exit(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &data,
        &["--apptainer", fake_bin()],
    )
    .await;

    // Assert
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains(&data.display().to_string()), "{log}");
    assert!(log.contains("fix: "), "{log}");
    assert!(!log.contains("consuming requests"), "{log}");
}

#[tokio::test]
async fn sigterm_ends_the_worker_within_the_drain_timeout_even_with_a_build_running() {
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec!["--drain-timeout-secs".into(), "2".into()],
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=40000".into())],
        ..Default::default()
    })
    .await;
    let _running = worker.send(start_request("long"), Publish::default()).await;
    worker
        .wait_for_builds_begun(1, Duration::from_secs(30))
        .await;

    // 2 s of drain and the final flush, with a wide margin for a loaded machine; before the
    // fix the worker waited up to 30 s more for the build.
    let status = worker.terminate(Duration::from_secs(20)).await;

    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert!(
        worker.log().contains("still running at the drain deadline"),
        "{}",
        worker.log()
    );
}
