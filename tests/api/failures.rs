//! Apptainer failing: a clear error reply with apptainer's own words, nothing left behind, and
//! the container's lane goes on.

use crate::helpers::{named, spawn_worker, spawn_worker_with, start_request, WorkerOptions};

#[tokio::test]
async fn a_failed_build_answers_runtime_failed_with_the_fatal_text_and_leaves_no_image() {
    let worker = spawn_worker().await;
    worker.control_fake(&["FAIL=build"]);

    let reply = worker.call(start_request("broken")).await;

    assert_eq!(reply.status, 500, "{reply:?}");
    let error = reply.error.unwrap();
    assert_eq!(error.code, schemas::ErrorCode::RuntimeFailed);
    assert!(
        error.message.contains("injected failure of build"),
        "{}",
        error.message
    );
    assert!(!worker.data_dir().join("images/broken").exists());
    assert_eq!(worker.call(named("getcont", "broken")).await.status, 404);

    // The lane goes on: the same start succeeds once apptainer works again.
    worker.control_fake(&[]);
    assert_eq!(worker.call(start_request("broken")).await.status, 201);
}

#[tokio::test]
async fn a_failed_instance_start_leaves_the_container_unregistered_and_cleans_its_image() {
    let worker = spawn_worker().await;
    worker.control_fake(&["FAIL=instance-start"]);

    let reply = worker.call(start_request("nostart")).await;

    assert_eq!(reply.status, 500, "{reply:?}");
    assert!(reply
        .error
        .unwrap()
        .message
        .contains("injected failure of instance-start"));
    assert!(!worker.data_dir().join("images/nostart").exists());
    assert!(worker.running_instances().is_empty());
}

#[tokio::test]
async fn a_failed_stop_keeps_the_container_running_in_the_records() {
    let worker = spawn_worker().await;
    assert_eq!(worker.call(start_request("stubborn")).await.status, 201);
    worker.control_fake(&["FAIL=instance-stop"]);

    let reply = worker.call(named("stop", "stubborn")).await;

    assert_eq!(reply.status, 500, "{reply:?}");
    let get = worker.call(named("getcont", "stubborn")).await;
    let Some(schemas::ReplyResult::Container(record)) = get.result else {
        panic!("getcont returns the record")
    };
    assert!(
        record.container_active,
        "the state is as it was before the request"
    );
}

#[tokio::test]
async fn an_instance_start_that_times_out_leaves_no_instance_and_the_name_can_be_started_again() {
    // Arrange: apptainer starts the instance, then never returns.
    let worker = spawn_worker_with(WorkerOptions {
        args: vec!["--command-timeout-secs".into(), "3".into()],
        ..WorkerOptions::default()
    })
    .await;
    worker.control_fake(&["HANG_AFTER=instance-start"]);

    // Act
    let reply = worker.call(start_request("orphan")).await;

    // Assert: a timeout, no instance nobody could stop, and the name is free again.
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.error.unwrap().code, schemas::ErrorCode::Timeout);
    assert!(
        worker.running_instances().is_empty(),
        "the instance the timed-out start left running was stopped"
    );
    worker.control_fake(&[]);
    let again = worker.call(start_request("orphan")).await;
    assert_eq!(again.status, 201, "{again:?}");
    assert_eq!(worker.running_instances(), ["orphan"]);
}
