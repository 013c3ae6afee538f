//! Nothing lost, nothing run twice: duplicates and a worker killed mid-operation.

use std::time::{Duration, Instant};

use orchestrator_producer::{PendingReply, Publish};

use crate::helpers::{
    named, spawn_worker, spawn_worker_with, start_request, TestWorker, WorkerOptions, REPLY_TIMEOUT,
};

#[tokio::test]
async fn the_same_request_published_twice_runs_once_and_both_get_the_same_reply() {
    let worker = spawn_worker().await;
    let once = |correlation: &str| Publish {
        correlation_id: Some(correlation.into()),
        message_id: Some("start-dup-1".into()),
        ..Publish::default()
    };

    let first = worker.send(start_request("dup"), once("first")).await;
    let second = worker.send(start_request("dup"), once("second")).await;
    let (first, second) = (
        first.wait(REPLY_TIMEOUT).await.unwrap(),
        second.wait(REPLY_TIMEOUT).await.unwrap(),
    );
    // A late duplicate, after the first finished, is answered from the stored reply.
    let third = worker
        .client
        .call_raw(
            start_request("dup").to_string().as_bytes(),
            once("third"),
            REPLY_TIMEOUT,
        )
        .await
        .unwrap();

    assert_eq!(first.status, 201);
    for duplicate in [&second, &third] {
        assert_eq!(
            (duplicate.status, &duplicate.result),
            (first.status, &first.result)
        );
    }
    assert_eq!(second.correlation_id.as_deref(), Some("second"));
    assert_eq!(third.correlation_id.as_deref(), Some("third"));
    let builds = worker
        .fake_calls()
        .iter()
        .filter(|c| c.subcommand() == "build")
        .count();
    assert_eq!(builds, 1, "the start ran once");
}

#[tokio::test]
async fn a_worker_killed_during_a_build_finishes_the_start_once_after_it_restarts() {
    // Arrange: a slow build, and other writes queued behind and beside it.
    let mut worker = spawn_worker_with(WorkerOptions {
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=3000".into())],
        ..WorkerOptions::default()
    })
    .await;
    let start = worker
        .send(start_request("crash"), Publish::default())
        .await;
    let beside = worker
        .send(start_request("bystander"), Publish::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !worker.fake_calls_begun().iter().any(|argv| {
        argv.first().is_some_and(|a| a == "build") && argv.iter().any(|a| a.ends_with("/crash"))
    }) {
        assert!(Instant::now() < deadline, "the build never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sent once the start is placed (its build began): queued behind it on this host.
    let behind = worker
        .send(named("stop", "crash"), Publish::default())
        .await;

    // Act: kill it mid-build, then start it again.
    worker.kill();
    worker.restart().await;

    // Assert: every request answered once, in order, and the container started exactly once.
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}\n{}", worker.log());
    assert_eq!(behind.wait(REPLY_TIMEOUT).await.unwrap().status, 200);
    assert_eq!(beside.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
    // A read asked after the restart sees the stop that was queued behind the start. (Reads
    // queued at a crash are not redelivered: they are acknowledged once queued; RELIABILITY.md.)
    let read = worker.call(named("getcont", "crash")).await;
    assert_eq!(read.status, 200, "{read:?}");
    let Some(schemas::ReplyResult::Container(record)) = read.result else {
        panic!("getcont returns the record")
    };
    assert!(
        !record.container_active,
        "the stop queued behind the start ran after it"
    );
    let starts = worker
        .fake_calls()
        .iter()
        .filter(|c| c.subcommand() == "instance start" && c.concerns("crash") && c.exit == 0)
        .count();
    assert_eq!(starts, 1, "the instance was started once");
    assert_eq!(worker.running_instances(), ["bystander"]);
}

#[tokio::test]
async fn a_start_given_up_after_its_worker_died_leaves_no_instance_behind() {
    // Arrange: a start whose instance is running when the worker dies, and one attempt allowed.
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec!["--max-attempts".into(), "1".into()],
        ..WorkerOptions::default()
    })
    .await;

    // Act: kill the worker, then start it again: the start is given up.
    let start = restart_while_the_instance_start_hangs(&mut worker, "abandoned").await;

    // Assert: an error reply, nothing running under the name, and the name free again.
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 500, "{start:?}");
    assert!(
        worker.running_instances().is_empty(),
        "the given-up start's instance was stopped"
    );
    let again = worker.call(start_request("abandoned")).await;
    assert_eq!(again.status, 201, "{again:?}\n{}", worker.log());
}

#[tokio::test]
async fn a_worker_with_a_relative_data_dir_adopts_the_instance_its_interrupted_start_left_running()
{
    // Arrange: `--data-dir data`, and a start whose instance is up when the worker dies.
    let mut worker = spawn_worker_with(WorkerOptions {
        relative_data_dir: true,
        ..WorkerOptions::default()
    })
    .await;

    // Act
    let start = restart_while_the_instance_start_hangs(&mut worker, "relative").await;

    // Assert: the resumed start adopts the running instance instead of refusing its own.
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}\n{}", worker.log());
    let starts = worker
        .fake_calls_begun()
        .iter()
        .filter(|argv| argv.get(1).is_some_and(|a| a == "start"))
        .count();
    assert_eq!(starts, 1, "the instance was started once");
    assert_eq!(worker.running_instances(), ["relative"]);
}

/// Sends a start of `name` whose `instance start` starts the instance and then hangs, kills the
/// worker once the instance is up, and starts the worker again with apptainer behaving.
async fn restart_while_the_instance_start_hangs(
    worker: &mut TestWorker,
    name: &str,
) -> PendingReply {
    worker.control_fake(&["HANG_AFTER=instance-start"]);
    let start = worker.send(start_request(name), Publish::default()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.running_instances().is_empty() {
        assert!(Instant::now() < deadline, "the instance never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill();
    worker.control_fake(&[]);
    worker.restart().await;
    start
}

#[tokio::test]
async fn a_worker_killed_during_a_build_leaves_a_temporary_bundle_that_the_next_start_up_sweeps() {
    // Arrange: a slow build, killed with its worker while its bundle exists.
    let mut worker = spawn_worker().await;
    worker.control_fake(&["DELAY_MS=build=60000"]);
    let start = worker
        .send(start_request("swept"), Publish::default())
        .await;
    let build_tmp = worker.data_dir().join("build-tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let bundles = loop {
        let found = entries(&build_tmp);
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no build bundle appeared in {}; log:\n{}",
            build_tmp.display(),
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    worker.kill();

    // Act
    worker.control_fake(&[]);
    worker.restart().await;

    // Assert: the dead build's bundle is gone and the start finishes.
    let left: Vec<_> = bundles.iter().filter(|b| b.exists()).collect();
    assert!(left.is_empty(), "bundles left behind: {left:?}");
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}");
}

#[tokio::test]
async fn a_build_cut_off_at_the_drain_deadline_leaves_no_process_of_its_group_after_the_next_start()
{
    // Arrange: a build that outlasts a 1 s drain; its helper process stands for apptainer's.
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec!["--drain-timeout-secs".into(), "1".into()],
        ..WorkerOptions::default()
    })
    .await;
    worker.control_fake(&["DELAY_MS=build=60000"]);
    let start = worker
        .send(start_request("cutoff"), Publish::default())
        .await;
    let marker = worker
        .data_dir()
        .join("images/cutoff")
        .display()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let helpers = loop {
        let found = build_helpers(&marker);
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "the build's helper never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Act: SIGTERM; the build is cut off at the drain deadline. Then start again.
    // (The worker waits up to 30 s for in-flight work before the drain deadline starts; allow for it.)
    let status = worker.terminate(Duration::from_secs(90)).await;
    worker.control_fake(&[]);
    worker.restart().await;

    // Assert
    assert!(status.success(), "{status}");
    let alive: Vec<_> = helpers
        .iter()
        .filter(|pid| build_helpers(&marker).contains(pid))
        .collect();
    assert!(
        alive.is_empty(),
        "helpers of the cut-off build still run: {alive:?}"
    );
    let start = start.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.status, 201, "{start:?}");
}

/// The entries of a directory (none when it does not exist).
fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|found| found.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The pids of fake-apptainer build helpers working on `target`.
fn build_helpers(target: &str) -> Vec<u32> {
    entries(std::path::Path::new("/proc"))
        .iter()
        .filter_map(|path| {
            let pid = path.file_name()?.to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(path.join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_helper = args.first() == Some(&b"fake-apptainer-build-helper".as_slice())
                && args.get(1) == Some(&target.as_bytes());
            is_helper.then_some(pid)
        })
        .collect()
}
