//! Intake: one delivery at a time, in delivery order — decode, validate, deduplicate, write to
//! the inbox, then acknowledge, and hand the request to its container's lane.
//!
//! The ack policy, which is what makes "nothing lost" true:
//! - a write request is acknowledged only after it (or the fact that it is a duplicate) is
//!   committed to the inbox; if that commit fails, the delivery is returned to the broker;
//! - a read is not written anywhere: it is acknowledged only after its reply is confirmed by the
//!   broker, so a crash before that makes the broker redeliver it;
//! - an invalid request is answered (400/413) and acknowledged, never requeued.
//!
//! Deliveries are handled one at a time so that lanes receive requests in delivery order.

mod decode;
pub mod validate;

pub use decode::{decode, Refused};

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use schemas::Request;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::outbox::Publisher;
use crate::reply::{to_body, ReplyHeader};
use crate::scheduler::{Job, JobKind, Scheduler, GLOBAL_LANE};
use crate::store::{Accepted, ReplyTarget, Store};

pub struct Intake {
    pub store: Store,
    pub scheduler: Scheduler,
    pub publisher: Arc<Publisher>,
    pub outbox_wake: Arc<Notify>,
    /// Permits for requests accepted but not finished.
    pub pending: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub node: String,
    pub default_reply_queue: String,
    pub max_body_bytes: usize,
}

impl Intake {
    /// Handles one delivery. Errors are logged here; the delivery is then either acknowledged
    /// (its outcome is safe) or returned to the broker.
    pub async fn handle(&self, delivery: Delivery) {
        let received = Instant::now();
        let properties = &delivery.properties;
        let target = ReplyTarget {
            reply_to: properties
                .reply_to()
                .as_ref()
                .map(|q| q.as_str().to_owned())
                .filter(|q| !q.is_empty())
                .unwrap_or_else(|| self.default_reply_queue.clone()),
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
        };
        let idempotency_key = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .or_else(|| target.correlation_id.clone());

        match decode(&delivery.data, self.max_body_bytes) {
            Err(Refused {
                code,
                message,
                op,
                container_name,
            }) => {
                tracing::info!(correlation_id = ?target.correlation_id, %message, "invalid request refused");
                let header = ReplyHeader {
                    node: self.node.clone(),
                    op,
                    container_name,
                    duration_ms: received.elapsed().as_millis() as u64,
                };
                let reply = header.error(target.correlation_id.as_deref(), code, &message);
                self.reply_then_ack(delivery, target, to_body(&reply)).await;
            }
            Ok(request) if request.op().is_read() => {
                self.accept_read(delivery, request, target, received).await
            }
            Ok(request) => {
                self.accept_write(delivery, request, target, idempotency_key)
                    .await
            }
        }
    }

    async fn accept_read(
        &self,
        delivery: Delivery,
        request: Request,
        target: ReplyTarget,
        received: Instant,
    ) {
        let permit = Arc::clone(&self.pending)
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed");
        let (reply_tx, reply_rx) = oneshot::channel();
        let lane = lane_of(&request);
        let job = Job {
            request,
            kind: JobKind::Read {
                received,
                correlation_id: target.correlation_id.clone(),
                reply: reply_tx,
            },
            permit: Some(permit),
        };
        self.scheduler.submit(&lane, job);
        let publisher = Arc::clone(&self.publisher);
        self.tracker.spawn(async move {
            // No reply means shutdown dropped the job; the broker redelivers it once the
            // channel closes.
            if let Ok(reply) = reply_rx.await {
                publish_then_ack(&publisher, delivery, target, to_body(&reply)).await
            }
        });
    }

    async fn accept_write(
        &self,
        delivery: Delivery,
        request: Request,
        target: ReplyTarget,
        idempotency_key: Option<String>,
    ) {
        let permit = Arc::clone(&self.pending)
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed");
        let lane = lane_of(&request);
        let body = serde_json::to_string(&request).expect("a request always serialises");
        let key = idempotency_key.unwrap_or_else(|| format!("anonymous-{}", uuid::Uuid::new_v4()));
        let accepted = self
            .store
            .accept(key.clone(), lane.clone(), body, target)
            .await;
        let seq = match accepted {
            Ok(Accepted::New { seq }) => seq,
            Ok(Accepted::AlreadyQueued { seq }) => {
                tracing::info!(
                    seq,
                    key,
                    "duplicate of a queued request; it will get the same reply"
                );
                ack(delivery).await;
                return;
            }
            Ok(Accepted::AlreadyAnswered { seq }) => {
                tracing::info!(
                    seq,
                    key,
                    "duplicate of a finished request; its reply is sent again"
                );
                ack(delivery).await;
                self.outbox_wake.notify_one();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record a request; it goes back to the broker");
                requeue(delivery).await;
                // Give the store a moment before the broker hands it back.
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                return;
            }
        };
        ack(delivery).await;
        let received_ms = crate::store::now_ms();
        let job = Job {
            request,
            kind: JobKind::Write { seq, received_ms },
            permit: Some(permit),
        };
        self.scheduler.submit(&lane, job);
    }

    async fn reply_then_ack(&self, delivery: Delivery, target: ReplyTarget, body: String) {
        publish_then_ack(&self.publisher, delivery, target, body).await
    }
}

/// The lane a request runs in: its container's, or the global one.
pub fn lane_of(request: &Request) -> String {
    request
        .container_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|| GLOBAL_LANE.to_owned())
}

async fn publish_then_ack(
    publisher: &Publisher,
    delivery: Delivery,
    target: ReplyTarget,
    body: String,
) {
    match publisher.publish_all(&[(target, body)]).await {
        Ok(_) => ack(delivery).await,
        Err(e) => {
            tracing::warn!(error = %e, "could not publish a reply; the request goes back to the broker");
            requeue(delivery).await;
        }
    }
}

async fn ack(delivery: Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel is gone; the broker redelivers, and deduplication answers it.
        tracing::warn!(error = %e, "could not acknowledge a delivery");
    }
}

async fn requeue(delivery: Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.nack(options).await {
        tracing::warn!(error = %e, "could not return a delivery to the broker");
    }
}
