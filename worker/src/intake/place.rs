//! Placement (DESIGN.md, "Fleet"): the consumers of `<exchange>.place` (names nobody owns,
//! taken by every host), `<exchange>.place.start` (starts to place, taken only by hosts with
//! room) and `<exchange>.expired` (requests whose deadline passed in a queue). The one place
//! where a name nobody owns is given to a host: lock the name, probe `<exchange>.owners`,
//! forward the start to this host's queue, bind the name to it.
//!
//! A placed delivery is acknowledged only once its outcome is safe (forwarded and confirmed,
//! or answered): a host that dies while placing leaves the delivery to the broker, and the next
//! placement finds the name bound (the probe reaches the owner) or not (placed again).

use std::sync::Arc;
use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use schemas::{ContainerName, ErrorCode, Op, PageRequest, Request, Stage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::consume::next_request;
use super::envelope::Envelope;
use super::{decode, requeue, Intake, Refused};
use crate::broker::{BrokerError, NameLock, Routed};
use crate::progress::Watcher;
use crate::reply::{to_body, ReplyHeader};

/// How long placement pauses after a failure before the delivery goes back to the broker.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The test hook that aborts the worker at a step of placement (RELIABILITY.md).
const ABORT_AT: &str = "ORCHESTRATOR_TEST_ABORT_AT";

/// What placement works with on one consuming connection: the connection (for name locks) and
/// a channel in confirm mode (probes, forwards, bindings).
pub struct Placer<'a> {
    pub intake: &'a Intake,
    pub connection: &'a Connection,
    pub channel: &'a Channel,
}

/// Which queue a placement consumer takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceQueue {
    /// `<exchange>.place`: everything for names nobody owns.
    Names,
    /// `<exchange>.place.start`: starts, taken only while this host has room.
    Starts,
}

impl Placer<'_> {
    /// Takes deliveries from `consumer` one at a time until the stream ends or `stop` is
    /// cancelled; `true` when the stream ended (the connection or channel is gone).
    pub async fn run(
        &self,
        mut consumer: Consumer,
        which: PlaceQueue,
        stop: &CancellationToken,
    ) -> bool {
        loop {
            let delivery = match next_request(&mut consumer, stop, Some(self.intake)).await {
                Ok(delivery) => delivery,
                Err(ended) => return ended,
            };
            self.take_one(delivery, which, stop).await;
        }
    }

    /// Places one delivery; a failure returns it to the broker after a pause.
    async fn take_one(&self, delivery: Delivery, which: PlaceQueue, stop: &CancellationToken) {
        let span = self.intake.request_span(&delivery);
        let outcome = match which {
            PlaceQueue::Names => self.take_place(delivery).instrument(span).await,
            PlaceQueue::Starts => self.take_start(delivery).instrument(span).await,
        };
        if let Err((delivery, e)) = outcome {
            tracing::warn!(error = %e, retry_in = ?RETRY_PAUSE,
                "placement failed; the delivery goes back to the broker");
            // Not at once: what failed (a binding being declared again, a lock held long)
            // needs a moment, and this consumer must not spin on it.
            tokio::select! {
                () = tokio::time::sleep(RETRY_PAUSE) => {}
                () = stop.cancelled() => {}
            }
            requeue(delivery).await;
        }
    }

    /// Takes starts from `<exchange>.place.start` while this host has room: subscribes with a
    /// prefetch of one when there is room, and closes the subscription's channel (the broker
    /// takes back the delivery in hand) as soon as a delivery comes while there is none.
    /// `true` when the connection is gone, `false` when `stop` was cancelled.
    pub async fn run_starts(&self, stop: &CancellationToken) -> bool {
        let intake = self.intake;
        let queue = intake.broker.topology.place_start();
        loop {
            tokio::select! {
                () = intake.room.wait_for_room(&intake.store) => {}
                () = stop.cancelled() => return false,
            }
            let (channel, mut consumer) = match intake
                .broker
                .subscribe(self.connection, &queue, 1)
                .await
            {
                Ok(subscribed) => subscribed,
                Err(e) => {
                    tracing::warn!(error = %e, "could not subscribe to the starts waiting for room");
                    return true;
                }
            };
            tracing::debug!("this host has room: taking starts");
            loop {
                let delivery = match next_request(&mut consumer, stop, Some(intake)).await {
                    Ok(delivery) => delivery,
                    Err(ended) => return ended,
                };
                if !intake.room.has_room(&intake.store).await {
                    tracing::info!(
                        "this host is full (--max-containers): no more starts until room frees"
                    );
                    break;
                }
                self.take_one(delivery, PlaceQueue::Starts, stop).await;
            }
            let _ = channel.close(200, "full".into()).await;
        }
    }

    /// A delivery from `<exchange>.place`: refused when invalid, a `start` handed on to
    /// `<exchange>.place.start`, a `getallcont` to the fleet, anything else answered `404`
    /// unless some host owns the name by now (the probe then delivered it there).
    async fn take_place(&self, delivery: Delivery) -> Result<(), (Delivery, BrokerError)> {
        let received = Instant::now();
        let intake = self.intake;
        let envelope = Envelope::read(&delivery, &intake.default_reply_queue);
        let request = match decode(&delivery.data, intake.max_body_bytes) {
            Ok(request) => request,
            Err(refused) => {
                refuse_invalid(intake, delivery, envelope, refused, received);
                return Ok(());
            }
        };
        let span = tracing::Span::current();
        span.record("op", tracing::field::display(request.op()));
        if let Some(name) = request.container_name() {
            span.record("container", tracing::field::display(name));
        }
        let Request::Getallcont(page) = &request else {
            return self.take_named(delivery, request, envelope, received).await;
        };
        intake
            .gather_getallcont(page.clone(), envelope, received)
            .await;
        ack(delivery).await
    }

    /// A request for a name from `<exchange>.place`: a `start` handed on to
    /// `<exchange>.place.start`, anything else answered `404` unless some host owns the name by
    /// now (the probe then delivered it there).
    async fn take_named(
        &self,
        delivery: Delivery,
        request: Request,
        envelope: Envelope,
        received: Instant,
    ) -> Result<(), (Delivery, BrokerError)> {
        let intake = self.intake;
        let name = request
            .container_name()
            .cloned()
            .expect("every request but getallcont names a container");
        if request.op() == Op::Start {
            return self.hand_on(delivery, &request, envelope).await;
        }
        let lock = match intake.broker.lock_name(self.connection, &name).await {
            Ok(lock) => lock,
            Err(e) => return Err((delivery, e)),
        };
        let probed = self.probe(&lock, &name, &delivery).await;
        lock.release().await;
        match probed {
            Ok(Routed::Yes) => ack(delivery).await,
            Ok(Routed::Returned) => {
                crate::metrics::request_received(Some(request.op()));
                tracing::info!(op = %request.op(), status = 404, "request answered");
                let refused = Refused {
                    refusal: crate::rules::Refusal::new(
                        ErrorCode::NotFound,
                        format!(
                            "container {name} is not registered on any host of the fleet; start it first"
                        ),
                    ),
                    op: Some(request.op()),
                    container_name: Some(name.to_string()),
                };
                intake.refuse(delivery, envelope.target, refused, received);
                Ok(())
            }
            Err(e) => Err((delivery, e)),
        }
    }

    /// Hands a `start` on to `<exchange>.place.start` (every property kept), then acknowledges
    /// it; a requester that asked for progress hears `queued`.
    async fn hand_on(
        &self,
        delivery: Delivery,
        request: &Request,
        envelope: Envelope,
    ) -> Result<(), (Delivery, BrokerError)> {
        let intake = self.intake;
        let queue = intake.broker.topology.place_start();
        let handed = intake
            .broker
            .publish_routed(
                self.channel,
                "",
                &queue,
                &delivery.data,
                delivery.properties.clone(),
            )
            .await;
        match handed {
            Ok(Routed::Yes) => {}
            Ok(Routed::Returned) => {
                let _ = intake.publisher.declare_topology().await;
                return Err((delivery, intake.broker.missing(&queue)));
            }
            Err(e) => return Err((delivery, e)),
        }
        if envelope.progress {
            let watcher = Watcher {
                target: envelope.target,
                header: ReplyHeader {
                    node: intake.node.clone(),
                    op: Some(request.op()),
                    container_name: request.container_name().map(|n| n.to_string()),
                    duration_ms: 0,
                },
                received_ms: crate::store::now_ms(),
            };
            intake.progress.send(&watcher, Stage::Queued, Some(0)).await;
        }
        ack(delivery).await
    }

    /// A delivery from `<exchange>.place.start`: lock the name; if some host owns it, the probe
    /// delivered the request there; otherwise bind the name to this host and forward the start
    /// to this host's queue.
    async fn take_start(&self, delivery: Delivery) -> Result<(), (Delivery, BrokerError)> {
        let received = Instant::now();
        let intake = self.intake;
        let request = match decode(&delivery.data, intake.max_body_bytes) {
            Ok(request) => request,
            Err(refused) => {
                let envelope = Envelope::read(&delivery, &intake.default_reply_queue);
                refuse_invalid(intake, delivery, envelope, refused, received);
                return Ok(());
            }
        };
        let Some(name) = request
            .container_name()
            .filter(|_| request.op() == Op::Start)
        else {
            // Not published here by placement: handled as `<exchange>.place` handles it.
            return self.take_place(delivery).await;
        };
        let lock = match intake.broker.lock_name(self.connection, name).await {
            Ok(lock) => lock,
            Err(e) => return Err((delivery, e)),
        };
        let placed = self.place(&lock, name, &delivery).await;
        lock.release().await;
        match placed {
            Ok(()) => ack(delivery).await,
            Err(e) => Err((delivery, e)),
        }
    }

    /// Under the name's lock: probe, and if nobody owns the name, forward the start to this
    /// host's queue, then bind the name here. Forwarding first puts the start ahead of every
    /// request the binding will route to this host; the lock keeps every other placement of
    /// the name waiting until both are done. A crash between the two leaves the start in this
    /// host's queue and the delivery to be placed again: the next placement binds the name.
    async fn place(
        &self,
        lock: &NameLock,
        name: &ContainerName,
        delivery: &Delivery,
    ) -> Result<(), BrokerError> {
        let broker = &self.intake.broker;
        if self.probe(lock, name, delivery).await? == Routed::Yes {
            tracing::debug!(container = %name, "the name is owned by a host; the start went there");
            return Ok(());
        }
        // Counted, and known to be bound here, before the forward: the start may run here
        // before the confirm comes.
        let room = &self.intake.room;
        room.placed(name.as_str());
        self.intake.ownership.bound(name.as_str());
        let forwarded = broker
            .forward_to_self(lock.channel(), &delivery.data, placed(delivery))
            .await;
        match forwarded {
            Ok(Routed::Yes) => {}
            Ok(Routed::Returned) => {
                room.finished(name.as_str(), true);
                return Err(broker.missing(&broker.host_queue()));
            }
            Err(e) => {
                room.finished(name.as_str(), true);
                return Err(e);
            }
        }
        abort_if_asked("placement-forwarded");
        broker.bind_name(self.channel, name.as_str()).await?;
        abort_if_asked("placement-bound");
        tracing::info!(container = %name, "placed a new container on this host");
        crate::metrics::placement_taken(&self.intake.node);
        Ok(())
    }

    /// Publishes the request itself to `<exchange>.owners`: delivered to the owner's queue if
    /// some host owns the name, returned otherwise.
    async fn probe(
        &self,
        lock: &NameLock,
        name: &ContainerName,
        delivery: &Delivery,
    ) -> Result<Routed, BrokerError> {
        self.intake
            .broker
            .probe(lock, name, &delivery.data, placed(delivery))
            .await
    }
}

impl Intake {
    /// A `getallcont` taken from `<exchange>.place`: gathered from every host on a task of its
    /// own, holding a pending permit as a read does, and answered directly. Like a read, it is
    /// acknowledged once it is handed over: it changes nothing, so a lost one is asked again.
    async fn gather_getallcont(&self, page: PageRequest, envelope: Envelope, received: Instant) {
        crate::metrics::request_received(Some(Op::Getallcont));
        let permit = Arc::clone(&self.pending)
            .acquire_owned()
            .await
            .expect("the pending semaphore is never closed");
        let fleet = Arc::clone(&self.fleet);
        let answerer = self.answerer();
        let target = envelope.target;
        let answering = async move {
            let correlation_id = target.correlation_id.clone();
            let reply = fleet
                .getallcont(&page, correlation_id.as_deref(), received)
                .await;
            tracing::info!(op = %Op::Getallcont, status = reply.status, warnings = reply.warnings.len(),
                "request answered from the fleet");
            crate::metrics::replied(Some(Op::Getallcont), reply.status, Some(received.elapsed()));
            answerer.publish(target, to_body(&reply)).await;
            drop(permit);
        };
        self.tracker.spawn(answering.in_current_span());
    }
}

/// Refuses an invalid request taken from a placement queue, counted as the intake counts one.
fn refuse_invalid(
    intake: &Intake,
    delivery: Delivery,
    envelope: Envelope,
    refused: Refused,
    received: Instant,
) {
    crate::metrics::request_received(refused.op);
    tracing::info!(message = %refused.refusal.message, "invalid request refused");
    intake.refuse(delivery, envelope.target, refused, received);
}

/// The delivery's properties, every one kept, with the placement headers added.
fn placed(delivery: &Delivery) -> BasicProperties {
    let mut headers: FieldTable = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(schemas::PLACED_HEADER.into(), AMQPValue::Boolean(true));
    if delivery.redelivered {
        headers.insert(schemas::REPLACED_HEADER.into(), AMQPValue::Boolean(true));
    }
    delivery.properties.clone().with_headers(headers)
}

async fn ack(delivery: Delivery) -> Result<(), (Delivery, BrokerError)> {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "could not acknowledge a placed delivery; it will be placed again");
    }
    Ok(())
}

/// Aborts the process at `step` when the test hook asks for it.
fn abort_if_asked(step: &str) {
    if std::env::var(ABORT_AT).is_ok_and(|at| at == step) {
        eprintln!("{ABORT_AT}={step}: aborting");
        std::process::abort();
    }
}
