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

pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use schemas::{ErrorCode, Op, Request, Stage, PROGRESS_HEADER};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::task::TaskTracker;

use crate::outbox::Publisher;
use crate::progress::{Progress, Watcher};
use crate::reply::{to_body, ReplyHeader};
use crate::scheduler::{Job, JobKind, Scheduler, GLOBAL_LANE};
use crate::store::{now_ms, Accepted, ReplyTarget, Store};

pub struct Intake {
    pub store: Store,
    pub scheduler: Scheduler,
    pub publisher: Arc<Publisher>,
    pub progress: Arc<Progress>,
    pub outbox_wake: Arc<Notify>,
    /// Permits for requests accepted but not finished.
    pub pending: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub node: String,
    pub default_reply_queue: String,
    pub max_body_bytes: usize,
}

/// A delivery, decoded and checked.
enum Decoded {
    Valid(Request),
    Invalid {
        code: ErrorCode,
        message: String,
        op: Option<Op>,
        container_name: Option<String>,
    },
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
        let progress = wants_progress(properties.headers().as_ref()).then(|| target.clone());
        let idempotency_key = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .or_else(|| target.correlation_id.clone());

        match self.decode(&delivery.data) {
            Decoded::Invalid {
                code,
                message,
                op,
                container_name,
            } => {
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
            Decoded::Valid(request) if request.op().is_read() => {
                self.accept_read(delivery, request, target, received, progress.is_some())
                    .await
            }
            Decoded::Valid(request) => {
                self.accept_write(delivery, request, target, idempotency_key, progress)
                    .await
            }
        }
    }

    fn decode(&self, body: &[u8]) -> Decoded {
        if body.len() > self.max_body_bytes {
            return Decoded::Invalid {
                code: ErrorCode::TooLarge,
                message: format!(
                    "the request body has {} bytes; at most {} are accepted",
                    body.len(),
                    self.max_body_bytes
                ),
                op: None,
                container_name: None,
            };
        }
        // What the body says of itself, for the error reply, even when it is not a valid request.
        let loose: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |name: &str| {
            loose
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let invalid = |message: String| Decoded::Invalid {
            code: ErrorCode::BadRequest,
            message,
            op: field("op").and_then(|op| {
                let op = if op == "removevolume" {
                    "deletevolume".into()
                } else {
                    op
                };
                serde_json::from_value(serde_json::Value::String(op)).ok()
            }),
            container_name: field("container_name")
                .filter(|n| schemas::ContainerName::parse(n).is_ok()),
        };
        let request: Request = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) if loose.is_none() => {
                return invalid(format!("the request body is not valid JSON: {e}"))
            }
            Err(e) => {
                let detail = loose
                    .as_ref()
                    .and_then(explain_field_error)
                    .unwrap_or_else(|| e.to_string());
                return invalid(format!("invalid request: {detail}"));
            }
        };
        match validate::check(&request) {
            Ok(()) => Decoded::Valid(request),
            Err(message) => invalid(message),
        }
    }

    async fn accept_read(
        &self,
        delivery: Delivery,
        request: Request,
        target: ReplyTarget,
        received: Instant,
        wants_progress: bool,
    ) {
        let permit = Arc::clone(&self.pending)
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed");
        let (reply_tx, reply_rx) = oneshot::channel();
        let lane = lane_of(&request);
        if wants_progress {
            let received_ms = now_ms() - received.elapsed().as_millis() as i64;
            self.report_queued(&request, &lane, target.clone(), received_ms)
                .await;
        }
        let job = Job {
            request,
            kind: JobKind::Read {
                received,
                correlation_id: target.correlation_id.clone(),
                reply: reply_tx,
            },
            permit: Some(permit),
            progress: None,
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
        progress: Option<ReplyTarget>,
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
        let received_ms = now_ms();
        if let Some(target) = &progress {
            self.report_queued(&request, &lane, target.clone(), received_ms)
                .await;
        }
        let job = Job {
            request,
            kind: JobKind::Write { seq, received_ms },
            permit: Some(permit),
            progress,
        };
        self.scheduler.submit(&lane, job);
    }

    /// Tells a requester that asked for progress where its request waits. Sent (and confirmed)
    /// before the job is submitted, so it precedes every later envelope of the request.
    async fn report_queued(
        &self,
        request: &Request,
        lane: &str,
        target: ReplyTarget,
        received_ms: i64,
    ) {
        let watcher = Watcher {
            target,
            header: ReplyHeader {
                node: self.node.clone(),
                op: Some(request.op()),
                container_name: request.container_name().map(|n| n.to_string()),
                duration_ms: 0,
            },
            received_ms,
        };
        let position = self.scheduler.position(lane);
        self.progress
            .send(&watcher, Stage::Queued, Some(position))
            .await;
    }

    async fn reply_then_ack(&self, delivery: Delivery, target: ReplyTarget, body: String) {
        publish_then_ack(&self.publisher, delivery, target, body).await
    }
}

/// Serde reports errors inside an internally tagged enum without the field's name; decoding the
/// operation's own fields again names it ("container_name: invalid type: integer `7`...").
fn explain_field_error(body: &serde_json::Value) -> Option<String> {
    fn first_error<T: serde::de::DeserializeOwned>(fields: serde_json::Value) -> Option<String> {
        serde_path_to_error::deserialize::<_, T>(fields)
            .err()
            .map(|e| match e.path().to_string().as_str() {
                "." => e.inner().to_string(),
                path => format!("{path}: {}", e.inner()),
            })
    }
    let mut fields = body.as_object()?.clone();
    let op = fields.remove("op")?;
    let fields = serde_json::Value::Object(fields);
    match op.as_str()? {
        "start" => first_error::<schemas::StartRequest>(fields),
        "stop" | "restart" | "getcont" | "deletecont" | "deletecontdata" => {
            first_error::<schemas::ContainerRequest>(fields)
        }
        "getallcont" => first_error::<schemas::PageRequest>(fields),
        "createvolume" | "deletevolume" | "removevolume" => {
            first_error::<schemas::VolumeRequest>(fields)
        }
        _ => None,
    }
}

/// Whether the delivery asked for progress envelopes: header `x-progress` set to boolean
/// `true` (or, for clients that can only send strings, `"true"`).
fn wants_progress(headers: Option<&FieldTable>) -> bool {
    let Some(value) = headers.and_then(|h| h.inner().get(PROGRESS_HEADER)) else {
        return false;
    };
    match value {
        AMQPValue::Boolean(flag) => *flag,
        AMQPValue::LongString(text) => text.as_bytes().eq_ignore_ascii_case(b"true"),
        AMQPValue::ShortString(text) => text.as_str().eq_ignore_ascii_case("true"),
        _ => false,
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

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use super::wants_progress;

    fn headers(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(schemas::PROGRESS_HEADER.into(), value);
        table
    }

    #[test]
    fn progress_is_sent_only_to_requests_that_ask_for_it() {
        assert!(wants_progress(Some(&headers(AMQPValue::Boolean(true)))));
        assert!(wants_progress(Some(&headers(AMQPValue::LongString(
            LongString::from("true")
        )))));
        assert!(!wants_progress(Some(&headers(AMQPValue::Boolean(false)))));
        assert!(!wants_progress(Some(&headers(AMQPValue::LongString(
            LongString::from("yes")
        )))));
        assert!(!wants_progress(Some(&FieldTable::default())));
        assert!(!wants_progress(None));
    }
}
