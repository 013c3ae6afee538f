//! The fleet's admin plane: leases, the fleet-wide `getallcont`, `orchestrator fleet hosts` and
//! `orchestrator fleet forget`, with several workers on one broker.

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use orchestrator_worker::fleet::lease::{lease, Lease};

use crate::helpers::AMQP_URL;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_lease_held_by_another_connection_is_seen_held_and_a_missing_one_gone() {
    // Arrange: one connection holds an exclusive queue, as a worker holds its lease.
    let holder = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let alive = unique("lease-test.alive");
    let channel = holder.create_channel().await.unwrap();
    channel
        .queue_declare(
            alive.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let asker = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();

    // Act / Assert: RabbitMQ answers 405 RESOURCE_LOCKED (held) and 404 (missing).
    let refused = asker
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            alive.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    match refused.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => assert_eq!(amqp.get_id(), 405, "{amqp:?}"),
        other => panic!("not a protocol error: {other:?}"),
    }
    assert_eq!(lease(&asker, &alive).await, Lease::Held);
    assert_eq!(
        lease(&asker, &unique("lease-test.alive")).await,
        Lease::Gone
    );
    holder.close(200, "done".into()).await.unwrap();
    assert_eq!(lease(&asker, &alive).await, Lease::Gone);
}
