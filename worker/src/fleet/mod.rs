//! The fleet's admin messages and fleet-wide requests: what a host does with a delivery that is
//! not a request for one of its containers. For now a fleet of one: an admin message
//! (AMQP `type` starting with [`schemas::ADMIN_TYPE_PREFIX`]) is acknowledged and ignored, and a
//! `getallcont` taken from `<exchange>.place` is forwarded to this host itself, which answers it
//! as a single host does. Below the intake (which hands deliveries here), above the scheduler.

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::Channel;

use crate::broker::{Broker, Routed};

/// Whether a delivery is an admin message between workers rather than a request.
pub fn is_admin(delivery: &Delivery) -> bool {
    delivery
        .properties
        .kind()
        .as_ref()
        .is_some_and(|kind| kind.as_str().starts_with(schemas::ADMIN_TYPE_PREFIX))
}

/// Handles an admin message taken from this host's queue or from `<exchange>.place`:
/// acknowledged and dropped (probes, and messages this version does not know).
pub async fn on_admin(delivery: Delivery) {
    let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
    tracing::debug!(kind = ?kind, "admin message acknowledged and dropped");
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "could not acknowledge an admin message");
    }
}

/// Handles a `getallcont` taken from `<exchange>.place`: forwards it, every property and header
/// kept, to this host's own queue, which answers it. `Err` leaves the delivery to the caller,
/// which returns it to the broker.
pub async fn on_getallcont(
    broker: &Broker,
    channel: &Channel,
    delivery: &Delivery,
) -> Result<(), crate::broker::BrokerError> {
    let routed = broker
        .forward_to_self(channel, &delivery.data, delivery.properties.clone())
        .await?;
    match routed {
        Routed::Yes => Ok(()),
        // Its queue is being declared again (it was deleted): the caller returns the delivery.
        Routed::Returned => Err(broker.missing(&broker.host_queue())),
    }
}
