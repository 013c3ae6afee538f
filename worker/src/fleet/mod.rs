//! The fleet's admin messages and fleet-wide requests: what a host does with a delivery that is
//! not a request for one of its containers. An admin message (AMQP `type` starting with
//! [`schemas::ADMIN_TYPE_PREFIX`]) is acknowledged and handed to the [`Admin`] plane, which
//! handles it on a task of its own; a `getallcont` taken from `<exchange>.place` is gathered
//! from every host ([`Admin::getallcont`]). Below the intake (which hands deliveries here),
//! above the scheduler.
//!
//! The admin plane: [`roster`] (the hosts heard of), [`lease`] (is a host alive, how deep is
//! its queue), [`gather`] (ask every host, collect the answers), [`hosts`] (the table of
//! `orchestrator fleet hosts`) and [`admin`] (the handlers, the hello).

pub mod admin;
pub mod gather;
pub mod hosts;
pub mod lease;
pub mod roster;

pub use admin::{Admin, AdminConfig, AdminMessage};

use std::sync::Arc;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Whether a delivery is an admin message between workers rather than a request.
pub fn is_admin(delivery: &Delivery) -> bool {
    schemas::fleet::is_admin(delivery.properties.kind().as_ref().map(|k| k.as_str()))
}

/// Handles an admin message taken from this host's queue or from `<exchange>.place`:
/// acknowledged (it is not work to keep: a lost one is asked again or said again), then handed
/// to the admin plane on a task of its own. Messages it does not know (probes, a newer
/// worker's) are dropped there.
pub async fn on_admin(admin: &Arc<Admin>, tracker: &TaskTracker, delivery: Delivery) {
    let message = AdminMessage {
        kind: delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_default(),
        body: delivery.data.clone(),
        reply_to: delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|q| q.to_string()),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string()),
    };
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "could not acknowledge an admin message");
    }
    let admin = Arc::clone(admin);
    tracker.spawn(async move { admin.on_admin(message).await }.in_current_span());
}
