//! The store's tests: the inbox's deduplication, the containers' pages, recovery's order.

use std::collections::BTreeMap;

use super::*;

fn target(correlation: &str) -> ReplyTarget {
    ReplyTarget {
        reply_to: "replies".into(),
        correlation_id: Some(correlation.into()),
    }
}

async fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.sqlite")).unwrap();
    (dir, store)
}

/// Offers request `body` under `key` in lane nb1, replies to correlation id `correlation`.
async fn offer(store: &Store, key: &str, body: &str, correlation: &str) -> Accepted {
    store
        .accept(
            key.into(),
            "nb1".into(),
            body.into(),
            None,
            target(correlation),
        )
        .await
        .unwrap()
}

async fn outbox_bodies(store: &Store) -> Vec<String> {
    let rows = store.outbox_batch(10).await.unwrap();
    rows.into_iter().map(|row| row.body).collect()
}

#[tokio::test]
async fn a_duplicate_waits_for_the_same_reply_and_a_late_one_gets_it_again() {
    let (_dir, store) = open().await;
    let first = offer(&store, "k", "{}", "c1").await;
    let Accepted::New { seq } = first else {
        panic!("first delivery must be new, got {first:?}")
    };
    let second = offer(&store, "k", "{}", "c2").await;
    assert_eq!(second, Accepted::AlreadyQueued { seq });

    store
        .finish(seq, Change::Nothing, |c| {
            serde_json::json!({ "correlation_id": c, "status": 201 }).to_string()
        })
        .await
        .unwrap();
    let third = offer(&store, "k", "{}", "c3").await;
    assert_eq!(third, Accepted::AlreadyAnswered { seq });

    let bodies = outbox_bodies(&store).await;
    let reply = |c: &str| serde_json::json!({ "correlation_id": c, "status": 201 }).to_string();
    assert_eq!(bodies, [reply("c1"), reply("c2"), reply("c3")]);
    assert!(store.unfinished().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_refused_even_on_rows_without_a_digest() {
    let (_dir, store) = open().await;
    let Accepted::New { seq } = offer(&store, "k", "start", "c1").await else {
        panic!("first offer is new")
    };
    // A row accepted before digests were stored.
    store
        .writer
        .call(|conn| Ok(conn.execute("UPDATE requests SET digest = NULL", [])?))
        .await
        .unwrap();

    let reused = offer(&store, "k", "stop", "c2").await;
    let repeated = offer(&store, "k", "start", "c3").await;

    assert_eq!(reused, Accepted::KeyReused { seq });
    assert_eq!(repeated, Accepted::AlreadyQueued { seq });
    let unfinished = store.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1, "the reused key added no request");
    let bodies = outbox_bodies(&store).await;
    assert_eq!(bodies, ["refused k"]);
}

fn stopped(name: &str) -> ContainerRow {
    ContainerRow {
        name: name.into(),
        image: "jupyter/base-notebook".into(),
        distributor: "docker".into(),
        os: "jupyter/base-notebook".into(),
        version: "latest".into(),
        command: vec!["jupyter lab".into()],
        environment: BTreeMap::new(),
        volume_name: None,
        binds: BTreeMap::new(),
        image_path: format!("/images/{name}"),
        active: false,
        ip: String::new(),
    }
}

#[tokio::test]
async fn bulk_seeded_containers_read_back_like_started_ones() {
    let (_dir, store) = open().await;
    let rows: Vec<ContainerRow> = (0..1000).map(|i| stopped(&format!("nb{i}"))).collect();
    assert_eq!(store.put_containers_blocking(rows).unwrap(), 1000);

    assert_eq!(
        store.container("nb999").await.unwrap(),
        Some(stopped("nb999"))
    );
    let (page, total) = store.containers_page(1, 2).await.unwrap();
    assert_eq!(total, 1000);
    assert_eq!(page, [stopped("nb0"), stopped("nb1")]);
}

#[tokio::test]
async fn the_total_of_a_page_follows_registrations_updates_and_deletions() {
    let (dir, store) = open().await;
    store
        .put_containers_blocking([stopped("a"), stopped("b")])
        .unwrap();
    let mut running = stopped("a");
    running.active = true;
    store.put_container(running.clone()).await.unwrap();
    store
        .finish(
            0,
            Change::Unregister(LeftoverRow {
                name: "b".into(),
                image: "jupyter/base-notebook".into(),
                image_path: "/images/b".into(),
            }),
            |_| "r".into(),
        )
        .await
        .unwrap();

    let (page, total) = store.containers_page(1, 10).await.unwrap();
    assert_eq!((page, total), (vec![running], 1));
    // The count is stored, not cached: a store opened again agrees.
    drop(store);
    let again = Store::open(&dir.path().join("state.sqlite")).unwrap();
    assert_eq!(again.containers_page(1, 10).await.unwrap().1, 1);
}

#[tokio::test]
async fn unfinished_requests_come_back_in_arrival_order_with_their_attempts() {
    let (_dir, store) = open().await;
    for key in ["a", "b", "c"] {
        store
            .accept(key.into(), "nb1".into(), key.into(), None, target(key))
            .await
            .unwrap();
    }
    assert_eq!(store.begin_attempt(2).await.unwrap(), 1);
    store.record_intent(2, "starting_instance").await.unwrap();
    store
        .finish(1, Change::Nothing, |_| "r".into())
        .await
        .unwrap();

    let unfinished = store.unfinished().await.unwrap();
    let summary: Vec<_> = unfinished
        .iter()
        .map(|r| (r.body.as_str(), r.attempts, r.intent.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [("b", 1, Some("starting_instance")), ("c", 0, None)]
    );
}
