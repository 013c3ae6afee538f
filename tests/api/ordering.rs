//! Order within a container, parallelism across containers.

use orchestrator_producer::Publish;

use crate::helpers::{
    named, spawn_worker, spawn_worker_with, start_request, FakeCall, WorkerOptions, REPLY_TIMEOUT,
};

/// The largest number of calls running at the same moment.
fn max_overlap(calls: &[FakeCall]) -> usize {
    let mut edges: Vec<(i64, i32)> = calls
        .iter()
        .flat_map(|c| [(c.start_ms, 1), (c.end_ms, -1)])
        .collect();
    // Ends sort before starts at the same millisecond: touching is not overlapping.
    edges.sort();
    let (mut running, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        running += delta;
        most = most.max(running);
    }
    most as usize
}

#[tokio::test]
async fn requests_for_one_container_run_one_at_a_time_in_publish_order() {
    let worker = spawn_worker().await;
    // The start first, answered: a client sends more for a name only after its start's reply
    // (the name is bound to its host by then; DESIGN.md, "Fleet").
    let mut statuses = vec![worker.call(start_request("ordered")).await.status];
    let mut requests = Vec::new();
    for i in 0..29 {
        requests.push(named(
            if i % 2 == 0 { "stop" } else { "restart" },
            "ordered",
        ));
    }

    // Publish the other 29 back to back, then collect the replies.
    let mut pending = Vec::new();
    for request in &requests {
        pending.push(worker.send(request.clone(), Publish::default()).await);
    }
    for reply in pending {
        statuses.push(reply.wait(REPLY_TIMEOUT).await.unwrap().status);
    }

    let mut expected = vec![201];
    expected.extend(std::iter::repeat_n(200, 29));
    assert_eq!(
        statuses, expected,
        "each request found the state its predecessor left"
    );
    let mut calls: Vec<FakeCall> = worker
        .fake_calls()
        .into_iter()
        .filter(|c| c.concerns("ordered"))
        .collect();
    calls.sort_by_key(|c| c.start_ms);
    assert_eq!(
        max_overlap(&calls),
        1,
        "no two apptainer calls for one container overlap: {calls:#?}"
    );
    let lifecycle: Vec<String> = calls
        .iter()
        .map(FakeCall::subcommand)
        .filter(|s| s == "instance start" || s == "instance stop")
        .collect();
    let expected: Vec<&str> = (0..30)
        .map(|i| {
            if i % 2 == 0 {
                "instance start"
            } else {
                "instance stop"
            }
        })
        .collect();
    assert_eq!(
        lifecycle, expected,
        "apptainer ran the requests in publish order"
    );
}

#[tokio::test]
async fn starts_of_different_containers_overlap_up_to_the_concurrency_limit() {
    let worker = spawn_worker_with(WorkerOptions {
        concurrency: Some(4),
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=1500".into())],
        ..WorkerOptions::default()
    })
    .await;

    let mut pending = Vec::new();
    for i in 0..8 {
        pending.push(
            worker
                .send(start_request(&format!("par{i}")), Publish::default())
                .await,
        );
    }
    let mut replies = Vec::new();
    for reply in pending {
        replies.push(reply.wait(REPLY_TIMEOUT).await.unwrap().status);
    }

    assert_eq!(replies, [201; 8]);
    let builds: Vec<FakeCall> = worker
        .fake_calls()
        .into_iter()
        .filter(|c| c.subcommand() == "build")
        .collect();
    assert_eq!(builds.len(), 8);
    assert_eq!(
        max_overlap(&builds),
        4,
        "builds ran four at a time: {builds:#?}"
    );
}

#[tokio::test]
async fn a_stop_does_not_wait_for_builds_that_fill_every_build_slot() {
    // Arrange: nb1 running, then the only build slot taken by a long build of nb2.
    let worker = spawn_worker_with(WorkerOptions {
        concurrency: Some(1),
        ..WorkerOptions::default()
    })
    .await;
    assert_eq!(worker.call(start_request("nb1")).await.status, 201);
    worker.control_fake(&["DELAY_MS=build=4000"]);
    let slow_start = worker.send(start_request("nb2"), Publish::default()).await;
    // nb2's build is the second.
    worker.wait_for_builds_begun(2, REPLY_TIMEOUT).await;

    // Act
    let stop = worker.call(named("stop", "nb1")).await;

    // Assert: answered while nb2's build still holds the slot.
    assert_eq!(stop.status, 200, "{stop:?}");
    let builds_finished = worker
        .fake_calls()
        .iter()
        .filter(|c| c.subcommand() == "build")
        .count();
    assert_eq!(builds_finished, 1, "the stop waited for nb2's build");
    assert_eq!(slow_start.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
}

#[tokio::test]
async fn a_getcont_published_while_its_containers_start_runs_sees_the_started_container() {
    let worker = spawn_worker_with(WorkerOptions {
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=500".into())],
        ..WorkerOptions::default()
    })
    .await;

    let start = worker.send(start_request("seen"), Publish::default()).await;
    // Placed (its name bound to the host) once its build begins.
    worker.wait_for_builds_begun(1, REPLY_TIMEOUT).await;
    let get = worker
        .send(named("getcont", "seen"), Publish::default())
        .await;

    let get = get.wait(REPLY_TIMEOUT).await.unwrap();
    assert_eq!(start.wait(REPLY_TIMEOUT).await.unwrap().status, 201);
    assert_eq!(get.status, 200, "{get:?}");
}
