//! Intake: deliveries in delivery order — decode, validate, deduplicate, write to the inbox,
//! then acknowledge, and hand each request to its container's lane.
//!
//! The ack policy, which is what makes "nothing lost" true for writes:
//! - a write request is acknowledged only after it (or the fact that it is a duplicate) is
//!   committed to the inbox; if that commit fails, the delivery is returned to the broker;
//! - a read is not written anywhere: it is acknowledged once it is queued in its lane, so that
//!   reads waiting behind a long build never hold the prefetch (which would stop every other
//!   container's requests) nor outlive the broker's delivery timeout. It changes nothing, so a
//!   crash before its reply costs the client one re-ask; a read still queued at shutdown is
//!   answered `500` asking to send it again;
//! - an invalid request is answered (400/413) and acknowledged once its reply is safe, never
//!   requeued; a delivery that keeps coming back is moved to the dead-letter queue, answered and
//!   acknowledged. Both replies are published on tasks of their own ([`answer`]): a requester
//!   whose reply queue refuses publishes delays nobody else.
//!
//! Deliveries are handled in order so that lanes receive requests in delivery order; the
//! deliveries the broker has already sent are taken together, and their write requests are
//! committed to the inbox in one transaction.

mod answer;
mod consume;
mod decode;
mod envelope;
mod expired;
mod place;

pub use consume::{consume_until_cancelled, Drain, Fatal, Readiness};
pub use decode::{decode, Refused};

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use schemas::{ErrorCode, Request, Stage};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{Broker, Publisher};
use crate::progress::{Progress, Watcher};
use crate::reply::{to_body, ReplyHeader};
use crate::rules::Refusal;
use crate::scheduler::{lane_of, Job, JobKind, Ownership, Room, Scheduler};
use crate::store::{now_ms, request_digest, Accepted, Offer, ReplyTarget, Store};
use answer::Answerer;
use envelope::{idempotency_key, Envelope};

pub struct Intake {
    pub broker: Broker,
    /// Keeps the name bindings true to the store; told of every (re)connect and placement.
    pub ownership: Arc<Ownership>,
    /// Whether this host may take another start: gates `<exchange>.place.start`.
    pub room: Arc<Room>,
    /// How long a held lease is waited for (`--lease-wait-secs`) when that is allowed.
    pub lease_wait: std::time::Duration,
    /// The previous run in this data directory did not end cleanly: a held lease at start-up
    /// is presumably its connection, and is waited for.
    pub unclean_start: bool,
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
    /// Where deliveries that keep coming back unprocessed are moved.
    pub dead_letter_queue: String,
    pub max_body_bytes: usize,
    /// A delivery redelivered more often than this goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Cancelled at shutdown: a wait for the store gives up, leaving the delivery to the broker.
    pub stop: CancellationToken,
    /// Cancelled when the drain deadline passes: replies still waiting for the broker are given
    /// up (their deliveries are redelivered to the next run).
    pub abort: CancellationToken,
    /// The fleet's admin plane: admin messages and fleet-wide `getallcont`s go there.
    pub fleet: Arc<crate::fleet::Admin>,
}

/// A delivery taken apart by [`Intake::take`].
enum Taken {
    /// Answered (refused, dead-lettered) or left to the broker: nothing more to do.
    Handled,
    Read(TakenRead),
    Write(TakenWrite),
}

struct TakenRead {
    delivery: Delivery,
    request: Request,
    envelope: Envelope,
    received: Instant,
}

/// A write request waiting for its batch's inbox commit: what the inbox is offered, and the rest.
struct TakenWrite {
    offer: Offer,
    pending: PendingWrite,
}

struct PendingWrite {
    delivery: Delivery,
    request: Request,
    /// Whether the requester asked for progress envelopes.
    progress: bool,
    /// Forwarded by placement, which already sent `queued`.
    placed: bool,
    span: tracing::Span,
}

impl TakenWrite {
    fn new(delivery: Delivery, request: Request, envelope: Envelope, span: &tracing::Span) -> Self {
        let body = serde_json::to_string(&request).expect("a request always serialises");
        let digest = request_digest(&body);
        let key = idempotency_key(&envelope, &digest);
        let offer = Offer {
            lane: lane_of(&request),
            body,
            digest,
            key,
            deadline_ms: envelope.deadline_ms.ok().flatten(),
            target: envelope.target,
            replaced: envelope.replaced,
        };
        Self {
            offer,
            pending: PendingWrite {
                delivery,
                request,
                progress: envelope.progress,
                placed: envelope.placed,
                span: span.clone(),
            },
        }
    }
}

impl Intake {
    /// Handles deliveries taken from the consumer together, in delivery order. Errors are
    /// logged here; each delivery is then either acknowledged (its outcome is safe) or left to
    /// the broker.
    ///
    /// Consecutive write requests share one inbox transaction (a group commit); a read waits for
    /// the writes delivered before it to be accepted, so no request overtakes an earlier one.
    ///
    /// Everything logged about a request, here and in its lane, carries one `request` span:
    /// correlation id, op, container name and node. The body itself is never logged.
    pub async fn handle_batch(&self, deliveries: Vec<Delivery>) {
        let mut writes = Vec::new();
        for delivery in deliveries {
            if crate::fleet::is_admin(&delivery) {
                crate::fleet::on_admin(&self.fleet, &self.tracker, delivery).await;
                continue;
            }
            let span = self.request_span(&delivery);
            match self.take(delivery, &span).instrument(span.clone()).await {
                Taken::Handled => {}
                Taken::Write(write) => writes.push(write),
                Taken::Read(read) => {
                    if !self.accept_writes(std::mem::take(&mut writes)).await {
                        return;
                    }
                    self.accept_read(read).instrument(span).await;
                }
            }
        }
        self.accept_writes(writes).await;
    }

    /// The span everything logged about one delivery carries: correlation id, op, container
    /// name (the last two recorded once decoded) and node.
    fn request_span(&self, delivery: &Delivery) -> tracing::Span {
        let span = tracing::info_span!(
            "request",
            correlation_id = tracing::field::Empty,
            op = tracing::field::Empty,
            container = tracing::field::Empty,
            node = %self.node,
            redelivered = delivery.redelivered,
        );
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            span.record("correlation_id", correlation_id.as_str());
        }
        span
    }

    /// Takes a delivery apart: refusals and dead letters are answered here; reads and writes
    /// are returned, to be accepted in delivery order.
    async fn take(&self, delivery: Delivery, span: &tracing::Span) -> Taken {
        if crate::fleet::is_admin(&delivery) {
            crate::fleet::on_admin(&self.fleet, &self.tracker, delivery).await;
            return Taken::Handled;
        }
        let received = Instant::now();
        let envelope = Envelope::read(&delivery, &self.default_reply_queue);
        if delivery.redelivered {
            metrics::counter!(crate::metrics::REDELIVERIES).increment(1);
            let identity = envelope.identity(&delivery);
            let Some(count) = self
                .until_stored(|| self.store.count_redelivery(identity.clone()))
                .await
            else {
                return Taken::Handled;
            };
            // `count` redeliveries: this is delivery number count + 1.
            if count >= self.max_attempts {
                self.dead_letter(delivery, envelope, &identity, count, received);
                return Taken::Handled;
            }
        }
        let decoded = match &envelope.deadline_ms {
            Err(message) => Err(Refused {
                refusal: Refusal::bad_request(message.clone()),
                op: None,
                container_name: None,
            }),
            Ok(_) => decode(&delivery.data, self.max_body_bytes),
        };
        crate::metrics::request_received(match &decoded {
            Ok(request) => Some(request.op()),
            Err(Refused { op, .. }) => *op,
        });
        match &decoded {
            Ok(request) => {
                span.record("op", tracing::field::display(request.op()));
                if let Some(name) = request.container_name() {
                    span.record("container", tracing::field::display(name));
                }
            }
            Err(Refused {
                op, container_name, ..
            }) => {
                if let Some(op) = op {
                    span.record("op", tracing::field::display(op));
                }
                if let Some(name) = container_name {
                    span.record("container", name.as_str());
                }
            }
        }
        tracing::debug!(body = %String::from_utf8_lossy(&delivery.data), "request received");
        match decoded {
            Err(refused) => {
                tracing::info!(message = %refused.refusal.message, "invalid request refused");
                self.refuse(delivery, envelope.target, refused, received);
                Taken::Handled
            }
            Ok(request) if request.op().is_read() => Taken::Read(TakenRead {
                delivery,
                request,
                envelope,
                received,
            }),
            Ok(request) => Taken::Write(TakenWrite::new(delivery, request, envelope, span)),
        }
    }

    /// Answers an invalid request (400, 413, or the refusal given) and acknowledges it once
    /// the reply is safe, on a task of its own.
    pub(crate) fn refuse(
        &self,
        delivery: Delivery,
        target: ReplyTarget,
        refused: Refused,
        received: Instant,
    ) {
        let Refused {
            refusal: Refusal { code, message },
            op,
            container_name,
        } = refused;
        crate::metrics::replied(op, code.status(), None);
        let header = ReplyHeader {
            node: self.node.clone(),
            op,
            container_name,
            duration_ms: received.elapsed().as_millis() as u64,
        };
        let reply = header.error(target.correlation_id.as_deref(), code, &message);
        self.answerer()
            .answer_then_ack(delivery, target, to_body(&reply));
    }

    /// Runs a store call until it succeeds. While the store refuses writes (disk full, read-only
    /// file), the delivery in hand stays unacknowledged and no further delivery is taken: the
    /// broker keeps them. `None` when shutdown came first.
    async fn until_stored<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = crate::store::StoreResult<T>>,
    {
        crate::store::until_written(&self.stop, "deliveries stay in RabbitMQ", call).await
    }

    /// Moves a delivery that keeps coming back to the dead-letter queue, answers its requester,
    /// and acknowledges it, on a task of its own.
    fn dead_letter(
        &self,
        delivery: Delivery,
        envelope: Envelope,
        identity: &str,
        count: u32,
        received: Instant,
    ) {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-orchestrator-deliveries".into(),
            AMQPValue::LongUInt(count),
        );
        headers.insert(
            "x-orchestrator-reason".into(),
            AMQPValue::LongString(
                format!("delivered {count} times without being processed").into(),
            ),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        tracing::warn!(identity = %identity, count, queue = %self.dead_letter_queue,
            "a delivery keeps coming back unprocessed; moving it to the dead-letter queue");
        let (op, container_name) = decode::claimed(&delivery.data);
        let header = ReplyHeader {
            node: self.node.clone(),
            op,
            container_name,
            duration_ms: received.elapsed().as_millis() as u64,
        };
        crate::metrics::replied(header.op, ErrorCode::Internal.status(), None);
        let reply = header.error(
            envelope.target.correlation_id.as_deref(),
            ErrorCode::Internal,
            &format!(
                "the request was delivered {count} times without being processed and was moved to the dead-letter queue {}; check the worker's log",
                self.dead_letter_queue
            ),
        );
        self.answerer().dead_letter_then_ack(
            delivery,
            self.dead_letter_queue.clone(),
            properties,
            envelope.target,
            to_body(&reply),
        );
    }

    /// Publishes replies outside the outbox, each on a task of its own.
    fn answerer(&self) -> Answerer {
        Answerer {
            publisher: Arc::clone(&self.publisher),
            store: self.store.clone(),
            outbox_wake: Arc::clone(&self.outbox_wake),
            tracker: self.tracker.clone(),
            abort: self.abort.clone(),
        }
    }

    async fn accept_read(&self, read: TakenRead) {
        let TakenRead {
            delivery,
            request,
            envelope,
            received,
        } = read;
        let wants_progress = envelope.progress;
        let target = envelope.target;
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
        let header = ReplyHeader {
            node: self.node.clone(),
            op: Some(request.op()),
            container_name: request.container_name().map(|n| n.to_string()),
            duration_ms: 0,
        };
        let job = Job {
            kind: JobKind::Read {
                request,
                received,
                deadline_ms: envelope.deadline_ms.ok().flatten(),
                correlation_id: target.correlation_id.clone(),
                reply: reply_tx,
            },
            // The permit stays with the answer below: it bounds the reads queued and the
            // replies waiting for the broker.
            permit: None,
            progress: None,
            span: tracing::Span::current(),
        };
        self.scheduler.submit(&lane, job);
        // Queued in its lane, the read no longer needs its delivery (see the ack policy).
        self.acknowledge(delivery);
        let answerer = self.answerer();
        let answering = async move {
            let reply = reply_rx.await.unwrap_or_else(|_| {
                // Shutdown came before the read's turn in its lane.
                let header = ReplyHeader {
                    duration_ms: received.elapsed().as_millis() as u64,
                    ..header
                };
                crate::metrics::replied(header.op, ErrorCode::Internal.status(), None);
                header.error(
                    target.correlation_id.as_deref(),
                    ErrorCode::Internal,
                    "the worker shut down before this read had its turn; send it again (a read changes nothing)",
                )
            });
            answerer.publish(target, to_body(&reply)).await;
            drop(permit);
        };
        self.tracker
            .spawn(answering.instrument(tracing::Span::current()));
    }

    /// Accepts write requests into the inbox in one transaction, then acknowledges their
    /// deliveries and hands them to their lanes, in order. `false` when shutdown came first:
    /// the deliveries are left to the broker.
    async fn accept_writes(&self, writes: Vec<TakenWrite>) -> bool {
        if writes.is_empty() {
            return true;
        }
        let (offers, pending): (Vec<Offer>, Vec<PendingWrite>) =
            writes.into_iter().map(|w| (w.offer, w.pending)).unzip();
        let offers = Arc::new(offers);
        let Some(accepted) = self
            .until_stored(|| {
                let node = self.node.clone();
                let refusal = move |offer: &Offer| key_reused_reply(&node, offer);
                self.store.accept_all(Arc::clone(&offers), refusal)
            })
            .await
        else {
            return false;
        };
        for ((write, offer), accepted) in pending.into_iter().zip(offers.iter()).zip(accepted) {
            let span = write.span.clone();
            self.submit_write(write, offer, accepted)
                .instrument(span)
                .await;
        }
        true
    }

    async fn submit_write(&self, write: PendingWrite, offer: &Offer, accepted: Accepted) {
        let PendingWrite {
            delivery,
            request,
            progress,
            placed,
            span,
        } = write;
        let key = &offer.key;
        let seq = match accepted {
            Accepted::New { seq } => seq,
            Accepted::AlreadyQueued { seq } => {
                metrics::counter!(crate::metrics::DUPLICATES_SUPPRESSED).increment(1);
                tracing::info!(
                    seq,
                    key,
                    "duplicate of a queued request; it will get the same reply"
                );
                self.acknowledge(delivery);
                return;
            }
            Accepted::KeyReused { seq } => {
                tracing::info!(
                    seq,
                    key,
                    "refused: the message_id belongs to a different request (409)"
                );
                crate::metrics::replied(Some(request.op()), ErrorCode::Conflict.status(), None);
                self.acknowledge(delivery);
                self.outbox_wake.notify_one();
                return;
            }
            Accepted::AlreadyAnswered { seq } if offer.replaced => {
                tracing::info!(
                    seq,
                    key,
                    "a start placed again after a crash was already answered; no second reply"
                );
                self.room.finished(&offer.lane, true);
                self.acknowledge(delivery);
                return;
            }
            Accepted::AlreadyAnswered { seq } => {
                metrics::counter!(crate::metrics::DUPLICATES_SUPPRESSED).increment(1);
                tracing::info!(
                    seq,
                    key,
                    "duplicate of a finished request; its reply is sent again"
                );
                self.acknowledge(delivery);
                self.outbox_wake.notify_one();
                return;
            }
        };
        self.acknowledge(delivery);
        let permit = Arc::clone(&self.pending)
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed");
        let received_ms = now_ms();
        let progress = progress.then(|| offer.target.clone());
        if let (Some(target), false) = (&progress, placed) {
            self.report_queued(&request, &offer.lane, target.clone(), received_ms)
                .await;
        }
        let job = Job {
            kind: JobKind::Write {
                request,
                seq,
                received_ms,
                deadline_ms: offer.deadline_ms,
            },
            permit: Some(permit),
            progress,
            span,
        };
        self.scheduler.submit(&offer.lane, job);
    }

    /// Acknowledges a delivery whose outcome is safe, without holding up the next one.
    fn acknowledge(&self, delivery: Delivery) {
        self.tracker
            .spawn(ack(delivery).instrument(tracing::Span::current()));
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
}

/// The `409 conflict` of a request whose `message_id` was first used for a different request.
fn key_reused_reply(node: &str, offer: &Offer) -> String {
    let (op, container_name) = decode::claimed(offer.body.as_bytes());
    let header = ReplyHeader {
        node: node.to_owned(),
        op,
        container_name,
        duration_ms: 0,
    };
    let message = format!(
        "the message_id {:?} was already used for a different request, so this one was not run; give every new request a new message_id and reuse one only to retry the same request",
        offer.key
    );
    let reply = header.error(
        offer.target.correlation_id.as_deref(),
        ErrorCode::Conflict,
        &message,
    );
    to_body(&reply)
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
