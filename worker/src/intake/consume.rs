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
use crate::broker::{reconnect_backoff, Broker, BrokerError, LeaseError, Session};

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
    let mut lease = LeaseWait::new(intake.lease_wait, intake.unclean_start);
    while !stop.is_cancelled() {
        // Binding many names takes a while: a shutdown does not wait for it.
        let subscribed = tokio::select! {
            subscribed = subscribe_all(broker, intake) => subscribed,
            () = stop.cancelled() => return Ok(()),
        };
        let session = match subscribed {
            Ok(session) => session,
            Err(Subscribe::Fatal(fatal)) => {
                readiness.not_consuming(fatal.to_string());
                return Err(fatal);
            }
            Err(Subscribe::LeaseHeld(held)) => {
                readiness.not_consuming(held.to_string());
                let fatal = lease.held(&held)?;
                tracing::warn!(error = %held, retry_in = ?LEASE_RETRY, "{fatal}");
                tokio::select! {
                    _ = tokio::time::sleep(LEASE_RETRY) => continue,
                    _ = stop.cancelled() => return Ok(()),
                }
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
        lease = LeaseWait::new(intake.lease_wait, true);
        if subscribed_before {
            metrics::counter!(crate::metrics::BROKER_RECONNECTS).increment(1);
        }
        subscribed_before = true;
        readiness.consuming();
        tracing::info!(queue = %broker.host_queue(), "consuming requests");
        let fleet = Arc::clone(&intake.fleet);
        intake.tracker.spawn(async move { fleet.say_hello().await });
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
            stop_taking(&channel, &consumer, &drain).await;
        }
        let _ = connection
            .close(200, "worker stopping or re-subscribing".into())
            .await;
    }
    Ok(())
}

/// Cancels this host's consumer, then waits for the work in flight (lanes, and the
/// acknowledgements, refusals and dead letters that settle deliveries on this channel), but not
/// past the drain deadline. No delivery is taken any more, so the tracker can close.
async fn stop_taking(channel: &lapin::Channel, consumer: &lapin::Consumer, drain: &Drain<'_>) {
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    drain.tracker.close();
    tokio::select! {
        () = drain.tracker.wait() => {}
        () = drain.deadline.cancelled() => {}
    }
}

/// Why the worker stops consuming for good.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

enum Subscribe {
    Fatal(Fatal),
    /// Another connection holds this node's lease.
    LeaseHeld(LeaseError),
    Broker(BrokerError),
}

/// How often a held lease is tried again.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// Whether a held lease is waited for, and until when: after an unclean end of the previous
/// run, or at a re-subscription, the holder is presumably this node's own dead connection,
/// which the broker drops after missed heartbeats; otherwise another worker runs with this
/// node id, and the worker must not go on.
struct LeaseWait {
    wait: Duration,
    allowed: bool,
    until: Option<std::time::Instant>,
}

impl LeaseWait {
    fn new(wait: Duration, allowed: bool) -> Self {
        Self {
            wait,
            allowed,
            until: None,
        }
    }

    /// `Ok` with what to log while waiting on; `Err` when the worker must stop.
    fn held(&mut self, held: &LeaseError) -> Result<String, Fatal> {
        let what_to_do = "another worker runs with this node id on this broker: stop it, or \
             give this worker another --node (node ids are unique in a fleet)";
        if !self.allowed {
            return Err(Fatal(format!("{held}; {what_to_do}")));
        }
        let until = *self
            .until
            .get_or_insert_with(|| std::time::Instant::now() + self.wait);
        if std::time::Instant::now() >= until {
            return Err(Fatal(format!(
                "{held}, still after {}s (--lease-wait-secs) of waiting for the broker to drop \
                 the previous run's connection; {what_to_do}",
                self.wait.as_secs()
            )));
        }
        Ok(
            "the node's lease is held, presumably by the previous run's connection, which the \
            broker drops after missed heartbeats; waiting"
                .to_owned(),
        )
    }
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
    expired: lapin::Consumer,
}

/// Connects, declares the topology, binds every name this host holds, and subscribes to this
/// host's queue and the fleet's shared queues, in that order: nothing is taken before this
/// host's names route to it.
async fn subscribe_all(broker: &Broker, intake: &Intake) -> Result<Sessions, Subscribe> {
    let (connection, confirm, existed) = broker.consuming_connection().await?;
    match broker.claim_lease(&connection).await {
        Ok(()) => {}
        Err(LeaseError::Held { queue, node }) => {
            let _ = connection.close(200, "lease held".into()).await;
            return Err(Subscribe::LeaseHeld(LeaseError::Held { queue, node }));
        }
        Err(LeaseError::Broker(e)) => return Err(Subscribe::Broker(e)),
    }
    let connection = std::sync::Arc::new(connection);
    let held = intake.store.held_names().await.map_err(|e| {
        Subscribe::Fatal(Fatal(format!(
            "could not read the containers this host holds: {e}"
        )))
    })?;
    let began = std::time::Instant::now();
    if existed {
        broker.bind_all_names(&connection, &held).await?;
    } else {
        bind_unowned(broker, &connection, &confirm, &held).await?;
    }
    tracing::info!(names = held.len(), took = ?began.elapsed(), "bound this host's container names");
    intake
        .ownership
        .connected(std::sync::Arc::clone(&connection), confirm.clone());
    let t = &broker.topology;
    let (_, place) = broker
        .subscribe(&connection, &t.place(), FLEET_PREFETCH)
        .await?;
    let (_, expired) = broker
        .subscribe(&connection, &t.expired(), FLEET_PREFETCH)
        .await?;
    let host = broker.subscribe_host(connection).await?;
    Ok(Sessions {
        host,
        fleet: FleetConsumers {
            confirm,
            place,
            expired,
        },
    })
}

/// Binds the names this host holds when its queue did not exist before (it was forgotten with
/// `fleet forget`, or the broker lost its state): each under its lock and only if no other host
/// owns it by now. A name owned elsewhere is logged and left alone: its requests go to the
/// other host, and this host runs nothing for it.
async fn bind_unowned(
    broker: &Broker,
    connection: &lapin::Connection,
    confirm: &lapin::Channel,
    held: &[String],
) -> Result<(), BrokerError> {
    if !held.is_empty() {
        tracing::warn!(queue = %broker.host_queue(), names = held.len(),
            "this host's queue did not exist (forgotten, or the broker lost its state): binding only the names no other host owns");
    }
    for name in held {
        let Ok(name) = schemas::ContainerName::parse(name) else {
            continue;
        };
        let lock = broker.lock_name(connection, &name).await?;
        let probe = lapin::BasicProperties::default().with_type(schemas::PROBE_TYPE.into());
        let routed = broker.probe(&lock, &name, b"{}", probe).await;
        let bound = match routed {
            Ok(crate::broker::Routed::Returned) => broker.bind_name(confirm, name.as_str()).await,
            Ok(crate::broker::Routed::Yes) => {
                tracing::warn!(container = %name, "another host of the fleet owns this name now; this host leaves its container alone");
                Ok(())
            }
            Err(e) => Err(e),
        };
        lock.release().await;
        bound?;
    }
    Ok(())
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
            _ = placer.run_starts(stop) => {}
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
/// to the fleet on the way (`admin`), or, without it, acknowledged and dropped (an admin
/// message that expired is stale). `Err(true)` when the stream ended (the channel or the
/// connection is gone), `Err(false)` when `stop` was cancelled.
pub(super) async fn next_request(
    consumer: &mut lapin::Consumer,
    stop: &CancellationToken,
    admin: Option<&Intake>,
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
        match admin {
            Some(intake) => crate::fleet::on_admin(&intake.fleet, &intake.tracker, delivery).await,
            None => super::ack(delivery).await,
        }
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
