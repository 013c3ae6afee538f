//! The consume loop: the lapin consumer, from subscribing to cancelling. Deliveries go to the
//! intake in the batches the broker has ready; a lost connection or consumer means
//! "re-subscribe" (with backoff), not "shut down". The start of the request path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::BasicCancelOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::place::{PlaceQueue, Placer};
use super::Intake;
use crate::broker::{reconnect_backoff, Broker, BrokerError, Session};

/// Whether the consumer is registered on the broker, and if not, why. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    consumer: Arc<Mutex<Result<(), String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            consumer: Arc::new(Mutex::new(Err(
                "not yet subscribed to the request queue".into()
            ))),
        }
    }
}

impl Readiness {
    /// The consumer is registered.
    pub fn consuming(&self) {
        *self.consumer.lock().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    /// The consumer is gone, for `reason`.
    pub fn not_consuming(&self, reason: impl Into<String>) {
        *self.consumer.lock().unwrap_or_else(|p| p.into_inner()) = Err(reason.into());
    }

    /// `Ok` while the consumer is registered, else why not (what `/readyz` answers).
    pub fn consumer(&self) -> Result<(), String> {
        self.consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the consumer waits for once it stops taking deliveries: the work in flight (`tracker`),
/// until the drain deadline (`deadline`, cancelled when it passes).
pub struct Drain<'a> {
    pub tracker: &'a TaskTracker,
    pub deadline: &'a CancellationToken,
}

/// Consumes deliveries until `stop` is cancelled, re-subscribing (with backoff) whenever the
/// connection or a consumer is lost. `Err` when the worker must not go on (another worker holds
/// this node's lease): the caller drains and exits non-zero.
pub async fn consume_until_cancelled(
    broker: &Broker,
    intake: &Intake,
    readiness: &Readiness,
    stop: CancellationToken,
    drain: Drain<'_>,
) -> Result<(), Fatal> {
    let mut delays = backon::BackoffBuilder::build(reconnect_backoff());
    let mut subscribed_before = false;
    while !stop.is_cancelled() {
        let session = match subscribe_all(broker, intake).await {
            Ok(session) => session,
            Err(Subscribe::Fatal(fatal)) => {
                readiness.not_consuming(fatal.to_string());
                return Err(fatal);
            }
            Err(Subscribe::Broker(e)) => {
                readiness.not_consuming(e.to_string());
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?delay, "could not subscribe to this host's queue");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        };
        delays = backon::BackoffBuilder::build(reconnect_backoff());
        if subscribed_before {
            metrics::counter!(crate::metrics::BROKER_RECONNECTS).increment(1);
        }
        subscribed_before = true;
        readiness.consuming();
        tracing::info!(queue = %broker.host_queue(), "consuming requests");
        let Sessions { host, fleet } = session;
        let Session {
            connection,
            channel,
            mut consumer,
        } = host;
        if let Some(end) = consume_session(intake, &connection, &mut consumer, fleet, &stop).await {
            end.report(readiness);
        }
        if stop.is_cancelled() {
            readiness.not_consuming("the worker is shutting down");
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            // Wait for the work in flight (lanes, and the acknowledgements, refusals and dead
            // letters that settle deliveries on this channel), but not past the drain deadline.
            // No delivery is taken any more, so the tracker can close.
            drain.tracker.close();
            tokio::select! {
                () = drain.tracker.wait() => {}
                () = drain.deadline.cancelled() => {}
            }
        }
        let _ = connection
            .close(200, "worker stopping or re-subscribing".into())
            .await;
    }
    Ok(())
}

/// Why the worker stops consuming for good.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

enum Subscribe {
    Fatal(Fatal),
    Broker(BrokerError),
}

impl From<BrokerError> for Subscribe {
    fn from(e: BrokerError) -> Self {
        Subscribe::Broker(e)
    }
}

/// The consumers of one consuming connection: this host's queue, and the fleet's shared queues.
struct Sessions {
    host: Session,
    fleet: FleetConsumers,
}

struct FleetConsumers {
    confirm: lapin::Channel,
    place: lapin::Consumer,
    place_start: lapin::Consumer,
    expired: lapin::Consumer,
}

/// Connects, declares the topology, binds every name this host holds, and subscribes to this
/// host's queue and the fleet's shared queues, in that order: nothing is taken before this
/// host's names route to it.
async fn subscribe_all(broker: &Broker, intake: &Intake) -> Result<Sessions, Subscribe> {
    let (connection, channel) = broker.consuming_connection().await?;
    let held = intake.store.held_names().await.map_err(|e| {
        Subscribe::Fatal(Fatal(format!(
            "could not read the containers this host holds: {e}"
        )))
    })?;
    let began = std::time::Instant::now();
    broker
        .bind_names(&channel, held.iter().map(String::as_str))
        .await?;
    tracing::info!(names = held.len(), took = ?began.elapsed(), "bound this host's container names");
    let confirm = broker.confirm_channel(&connection).await?;
    let t = &broker.topology;
    let (_, place) = broker
        .subscribe(&connection, &t.place(), FLEET_PREFETCH)
        .await?;
    let (_, place_start) = broker.subscribe(&connection, &t.place_start(), 1).await?;
    let (_, expired) = broker
        .subscribe(&connection, &t.expired(), FLEET_PREFETCH)
        .await?;
    let host = broker.subscribe_host(connection).await?;
    Ok(Sessions {
        host,
        fleet: FleetConsumers {
            confirm,
            place,
            place_start,
            expired,
        },
    })
}

/// How many deliveries of a shared fleet queue the broker may send ahead to this host.
const FLEET_PREFETCH: u16 = 16;

/// Runs this host's consumer and the fleet's until a stream ends (how is returned) or `stop`
/// is cancelled (`None`).
async fn consume_session(
    intake: &Intake,
    connection: &lapin::Connection,
    consumer: &mut lapin::Consumer,
    fleet: FleetConsumers,
    stop: &CancellationToken,
) -> Option<StreamEnd> {
    let placer = Placer {
        intake,
        connection,
        channel: &fleet.confirm,
    };
    let sides = async {
        tokio::select! {
            _ = placer.run(fleet.place, PlaceQueue::Names, stop) => {}
            _ = placer.run(fleet.place_start, PlaceQueue::Starts, stop) => {}
            _ = intake.answer_expired(fleet.expired, stop) => {}
        }
    };
    let end = tokio::select! {
        end = hand_over(consumer, intake, stop) => end,
        () = sides => Some(StreamEnd::Cancelled),
    };
    if stop.is_cancelled() {
        None
    } else {
        end
    }
}

/// Hands deliveries to the intake, batch by batch, until the stream ends (how is returned) or
/// `stop` is cancelled (`None`).
async fn hand_over(
    consumer: &mut lapin::Consumer,
    intake: &Intake,
    stop: &CancellationToken,
) -> Option<StreamEnd> {
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = stop.cancelled() => return None,
        };
        match next {
            Some(Ok(delivery)) => {
                let (batch, end) = with_ready_deliveries(consumer, delivery).await;
                intake.handle_batch(batch).await;
                if end.is_some() {
                    return end;
                }
            }
            Some(Err(e)) => return Some(StreamEnd::Failed(e)),
            None => return Some(StreamEnd::Cancelled),
        }
    }
}

/// Waits for the next delivery of a fleet queue that is a request; admin messages are handed
/// to the fleet on the way. `Err(true)` when the stream ended (the channel or the connection is
/// gone), `Err(false)` when `stop` was cancelled.
pub(super) async fn next_request(
    consumer: &mut lapin::Consumer,
    stop: &CancellationToken,
) -> Result<lapin::message::Delivery, bool> {
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            () = stop.cancelled() => return Err(false),
        };
        let Some(Ok(delivery)) = next else {
            return Err(true);
        };
        if !crate::fleet::is_admin(&delivery) {
            return Ok(delivery);
        }
        crate::fleet::on_admin(delivery).await;
    }
}

/// Why the request consumer's stream ended.
enum StreamEnd {
    Failed(lapin::Error),
    Cancelled,
}

impl StreamEnd {
    /// Logs why the consumer is gone and tells `/readyz`; the loop then re-subscribes.
    fn report(self, readiness: &Readiness) {
        match self {
            StreamEnd::Failed(e) => {
                tracing::warn!(error = %e, "the request consumer failed; re-subscribing");
                readiness.not_consuming(format!("the request consumer failed: {e}"));
            }
            StreamEnd::Cancelled => {
                tracing::warn!("the broker cancelled the request consumer; re-subscribing");
                readiness.not_consuming("the broker cancelled the request consumer");
            }
        }
    }
}

/// The delivery in hand and those the broker has already sent behind it (at most the prefetch,
/// since none of them is acknowledged yet), so the intake can commit their writes together;
/// and how the stream ended, if it did meanwhile.
async fn with_ready_deliveries(
    consumer: &mut lapin::Consumer,
    first: lapin::message::Delivery,
) -> (Vec<lapin::message::Delivery>, Option<StreamEnd>) {
    let mut batch = vec![first];
    loop {
        match futures_lite::future::poll_once(consumer.next()).await {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(e))) => return (batch, Some(StreamEnd::Failed(e))),
            Some(None) => return (batch, Some(StreamEnd::Cancelled)),
            None => return (batch, None),
        }
    }
}
