//! Every operation, its success status and its documented errors, as a backend sees them.

use serde_json::json;

use crate::helpers::{named, spawn_worker, start_request};

fn status_and_code(reply: &schemas::Reply) -> (u16, Option<String>) {
    let code = reply.error.as_ref().map(|e| {
        serde_json::to_value(e.code)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    });
    (reply.status, code)
}

#[tokio::test]
async fn a_container_goes_through_its_whole_life_with_the_statuses_of_the_earlier_server() {
    // Arrange
    let worker = spawn_worker().await;
    let home = worker.volume("home-nb1");
    let extra = worker.volume("extra");
    let mut start = start_request("nb1");
    start["volume_name"] = json!(home);
    let volume = |op: &str, host: &str, container: &str| json!({"op": op, "container_name": "nb1", "host_location": host, "container_location": container});

    // Act and assert, step by step.
    let started = worker.call(start.clone()).await;
    assert_eq!(started.status, 201, "{started:?}");
    let Some(schemas::ReplyResult::Container(record)) = &started.result else {
        panic!("start returns the container record: {started:?}")
    };
    assert!(record.container_active);
    assert!(record.container_ip.starts_with("10.22."), "{record:?}");
    assert_eq!(worker.running_instances(), ["nb1"]);

    let expectations: Vec<(serde_json::Value, u16, Option<&str>)> = vec![
        (start, 409, Some("conflict")),
        (named("getcont", "nb1"), 200, None),
        (named("getcont", "nobody"), 404, Some("not_found")),
        (volume("createvolume", &extra, "/mnt"), 200, None),
        (
            volume("createvolume", &extra, "/srv"),
            409,
            Some("conflict"),
        ),
        (
            volume("createvolume", &worker.volume("other"), "/no/such/dir"),
            400,
            Some("bad_request"),
        ),
        (
            volume("createvolume", "/tmp/definitely-missing-dir", "/mnt"),
            400,
            Some("bad_request"),
        ),
        (
            volume("createvolume", "/etc", "/mnt"),
            403,
            Some("forbidden"),
        ),
        (
            volume("deletevolume", &extra, "/mnt"),
            422,
            Some("unprocessable"),
        ),
        (named("deletecont", "nb1"), 422, Some("unprocessable")),
        (named("restart", "nb1"), 409, Some("conflict")),
        (named("stop", "nb1"), 200, None),
        (named("stop", "nb1"), 409, Some("conflict")),
        (volume("removevolume", &extra, "/mnt"), 200, None),
        (
            volume("deletevolume", &extra, "/mnt"),
            404,
            Some("not_found"),
        ),
        (named("restart", "nb1"), 200, None),
        (named("stop", "nb1"), 200, None),
        (named("deletecontdata", "nb1"), 422, Some("unprocessable")),
        (named("deletecont", "nb1"), 204, None),
        (named("getcont", "nb1"), 404, Some("not_found")),
        (named("stop", "nb1"), 404, Some("not_found")),
        (named("deletecontdata", "nb1"), 204, None),
        (named("deletecontdata", "nb1"), 404, Some("not_found")),
    ];
    for (request, status, code) in expectations {
        let reply = worker.call(request.clone()).await;
        assert_eq!(
            status_and_code(&reply),
            (status, code.map(str::to_owned)),
            "request {request} got {reply:?}"
        );
        assert_eq!(reply.ok, status < 400);
        assert!(reply.is_final);
    }
    assert!(worker.running_instances().is_empty());
    assert!(
        !worker.data_dir().join("images/nb1").exists(),
        "deletecontdata removes the image"
    );
}

#[tokio::test]
async fn createvolume_on_a_running_container_warns_that_the_bind_waits_for_a_restart() {
    let worker = spawn_worker().await;
    assert_eq!(worker.call(start_request("nb2")).await.status, 201);
    let host = worker.volume("data");

    let reply = worker
        .call(json!({"op": "createvolume", "container_name": "nb2", "host_location": host, "container_location": "/mnt"}))
        .await;

    assert_eq!(reply.status, 200);
    assert_eq!(reply.warnings.len(), 1, "{reply:?}");
    assert!(reply.warnings[0].contains("next restart"), "{reply:?}");
    let Some(schemas::ReplyResult::Binds(binds)) = reply.result else {
        panic!("createvolume returns the binds")
    };
    assert_eq!(binds.binds.get(&host).map(String::as_str), Some("/mnt"));
}

#[tokio::test]
async fn the_binds_are_passed_to_apptainer_at_the_next_restart() {
    let worker = spawn_worker().await;
    let home = worker.volume("home");
    let data = worker.volume("data");
    let mut start = start_request("nb3");
    start["volume_name"] = json!(home);
    assert_eq!(worker.call(start).await.status, 201);
    worker
        .call(json!({"op": "createvolume", "container_name": "nb3", "host_location": data, "container_location": "/mnt"}))
        .await;

    assert_eq!(worker.call(named("stop", "nb3")).await.status, 200);
    assert_eq!(worker.call(named("restart", "nb3")).await.status, 200);

    let starts: Vec<_> = worker
        .fake_calls()
        .into_iter()
        .filter(|c| c.subcommand() == "instance start")
        .collect();
    assert_eq!(starts.len(), 2);
    let restart_args = starts[1].argv.join(" ");
    assert!(
        restart_args.contains(&format!("--bind {home}:/home/nextpyter")),
        "{restart_args}"
    );
    assert!(
        restart_args.contains(&format!("--bind {data}:/mnt")),
        "{restart_args}"
    );
}

#[tokio::test]
async fn getallcont_pages_containers_by_name_and_lists_data_left_by_deleted_ones() {
    let worker = spawn_worker().await;
    for name in ["c3", "c1", "c2", "gone"] {
        assert_eq!(worker.call(start_request(name)).await.status, 201);
    }
    worker.call(named("stop", "gone")).await;
    assert_eq!(worker.call(named("deletecont", "gone")).await.status, 204);

    let reply = worker
        .call(json!({"op": "getallcont", "page": 2, "page_size": 2}))
        .await;

    assert_eq!(reply.status, 200);
    let Some(schemas::ReplyResult::Page(page)) = reply.result else {
        panic!("getallcont returns a page: {reply:?}")
    };
    let names: Vec<_> = page
        .containers
        .iter()
        .map(|c| c.container_name.as_str())
        .collect();
    assert_eq!(names, ["c3"]);
    assert_eq!(page.total, 3);
    let left: Vec<_> = page
        .data
        .iter()
        .map(|d| d.container_name.as_str())
        .collect();
    assert_eq!(left, ["gone"]);
}

#[tokio::test]
async fn a_name_whose_data_is_still_on_disk_cannot_be_started_over_it() {
    let worker = spawn_worker().await;
    worker.call(start_request("reuse")).await;
    worker.call(named("stop", "reuse")).await;
    worker.call(named("deletecont", "reuse")).await;

    let reply = worker.call(start_request("reuse")).await;

    assert_eq!(reply.status, 409, "{reply:?}");
    assert!(reply.error.unwrap().message.contains("deletecontdata"));
    assert!(
        worker.data_dir().join("images/reuse").exists(),
        "the data is kept"
    );
}
