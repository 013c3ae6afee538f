//! The consume loop: the lapin consumer, from subscribing to cancelling. Deliveries go to the
//! intake in the batches the broker has ready; a lost connection or consumer means
//! "re-subscribe" (with backoff), not "shut down". The start of the request path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::BasicCancelOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Intake;
use crate::broker::{reconnect_backoff, Broker};

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
/// connection or the consumer is lost.
pub async fn consume_until_cancelled(
    broker: &Broker,
    intake: &Intake,
    readiness: &Readiness,
    stop: CancellationToken,
    drain: Drain<'_>,
) {
    let mut delays = backon::BackoffBuilder::build(reconnect_backoff());
    let mut subscribed_before = false;
    while !stop.is_cancelled() {
        let (connection, channel, mut consumer) = match broker.consume().await {
            Ok(parts) => parts,
            Err(e) => {
                readiness.not_consuming(e.to_string());
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?delay, "could not subscribe to the request queue");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        delays = backon::BackoffBuilder::build(reconnect_backoff());
        if subscribed_before {
            metrics::counter!(crate::metrics::BROKER_RECONNECTS).increment(1);
        }
        subscribed_before = true;
        readiness.consuming();
        tracing::info!(queue = %broker.request_queue, "consuming requests");
        if let Some(end) = hand_over(&mut consumer, intake, &stop).await {
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
