//! Publishing replies: the [`Publisher`] (persistent, `mandatory`, confirmed) and the outbox
//! loop that drains committed replies through it, retrying with backoff while the broker is
//! away. A reply leaves the outbox only once the broker has confirmed it. A reply the broker
//! refuses (nacks) is retried on its own schedule, then set aside; it never holds up the others.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError};
use crate::store::{now_ms, NextAttempt, ReplyTarget, Store};

/// How many replies one round of the outbox publishes before awaiting their confirms.
const OUTBOX_BATCH: u32 = 256;
/// The outbox is checked this often even without a wake-up (replies left by a crash).
const OUTBOX_POLL: Duration = Duration::from_secs(5);

/// How a published reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The broker confirmed it into the reply queue.
    Confirmed,
    /// The reply queue does not exist (the requester is gone); the broker returned it.
    NoSuchQueue,
    /// The broker refused (nacked) this message, e.g. its queue is full and rejects publishes.
    /// Only this message: the connection is fine.
    Refused,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Connect(#[from] BrokerError),
    #[error("publishing a reply failed: {0}")]
    Publish(#[from] lapin::Error),
}

/// Publishes replies on its own connection, reconnecting on demand.
pub struct Publisher {
    broker: Broker,
    current: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            current: Mutex::new(None),
        }
    }

    /// Opens the connection now, so start-up fails early when the broker is unreachable.
    pub async fn connect(&self) -> Result<(), PublishError> {
        self.channel().await.map(drop)
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut current = self.current.lock().await;
        if let Some((connection, channel)) = current.as_ref() {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let (connection, channel) = self.broker.publishing_channel().await?;
        self.broker.declare_topology(&channel).await?;
        *current = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Forgets a channel that failed, so the next publish reconnects.
    async fn reset(&self) {
        if let Some((connection, _)) = self.current.lock().await.take() {
            let _ = connection.close(200, "reconnecting".into()).await;
        }
    }

    /// Declares the broker topology again (a queue of it was deleted under the worker).
    pub async fn declare_topology(&self) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        Ok(self.broker.declare_topology(&channel).await?)
    }

    /// What becomes of a reply the broker has refused `refusals` times: another attempt after
    /// a backoff (1 s, doubling up to a minute, jittered), or, after `--reply-attempts`, set aside.
    pub fn after_refusal(&self, refusals: u32) -> NextAttempt {
        let mut delays = backon::BackoffBuilder::build(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(60))
                .with_jitter()
                .with_max_times(self.broker.reply_attempts.saturating_sub(1) as usize),
        );
        match delays.nth(refusals.saturating_sub(1) as usize) {
            Some(delay) => NextAttempt::At(now_ms().saturating_add(delay.as_millis() as i64)),
            None => NextAttempt::SetAside,
        }
    }

    /// Publishes replies, pipelined, and awaits every confirm. The result has one entry per
    /// reply, in order; an error means none of them can be trusted to have arrived (the
    /// connection failed), while a refusal of one message is that message's outcome.
    pub async fn publish_all(
        &self,
        replies: &[(ReplyTarget, String)],
    ) -> Result<Vec<Delivered>, PublishError> {
        let result = self.publish_all_once(replies).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    async fn publish_all_once(
        &self,
        replies: &[(ReplyTarget, String)],
    ) -> Result<Vec<Delivered>, PublishError> {
        let channel = self.channel().await?;
        let mut confirms = Vec::with_capacity(replies.len());
        for (target, body) in replies {
            let mut properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            if let Some(correlation) = &target.correlation_id {
                properties = properties.with_correlation_id(correlation.as_str().into());
            }
            confirms.push(send(&channel, &target.reply_to, body.as_bytes(), properties).await?);
        }
        let mut delivered = Vec::with_capacity(confirms.len());
        for (confirm, (target, _)) in confirms.into_iter().zip(replies) {
            let outcome = confirmed(confirm).await?;
            if outcome == Delivered::NoSuchQueue {
                tracing::warn!(reply_to = %target.reply_to, correlation_id = ?target.correlation_id,
                    "the reply queue does not exist; the reply was dropped");
            }
            delivered.push(outcome);
        }
        Ok(delivered)
    }

    /// Publishes one message to `queue` with the given properties, confirmed.
    pub async fn publish_to(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Delivered, PublishError> {
        let result = async {
            let channel = self.channel().await?;
            confirmed(send(&channel, queue, body, properties).await?).await
        }
        .await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    pub async fn close(&self) {
        self.reset().await;
    }
}

/// Publishes one message to a queue through the default exchange, `mandatory`.
async fn send(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    Ok(channel
        .basic_publish("".into(), queue.into(), options, body, properties)
        .await?)
}

/// Awaits the broker's confirm of one message.
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<Delivered, PublishError> {
    let confirmation = confirm.await?;
    if confirmation.is_nack() {
        return Ok(Delivered::Refused);
    }
    Ok(if confirmation.take_message().is_some() {
        Delivered::NoSuchQueue
    } else {
        Delivered::Confirmed
    })
}

/// The backoff between attempts while the broker is away: exponential, jittered, capped.
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// Drains the outbox through the publisher until `stop` is cancelled and the outbox is empty
/// (or `stop` is cancelled and the broker stays away past the final flush). Between rounds it
/// waits for a wake-up, the poll period, or the next attempt at a refused reply.
pub async fn run(
    store: Store,
    publisher: Arc<Publisher>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        match drain(&store, &publisher, &stop).await {
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "the outbox could not be read"),
        }
        if stop.is_cancelled() {
            return;
        }
        let pause = match store.outbox_next_attempt().await {
            Ok(Some(at)) => {
                Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64).min(OUTBOX_POLL)
            }
            _ => OUTBOX_POLL,
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// Publishes everything due in the outbox, batch by batch, retrying each batch with backoff
/// while the broker is away. Replies the broker refuses are settled one by one.
async fn drain(
    store: &Store,
    publisher: &Publisher,
    stop: &CancellationToken,
) -> Result<(), crate::store::StoreError> {
    loop {
        let batch = store.outbox_batch(OUTBOX_BATCH).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let replies: Vec<(ReplyTarget, String)> = batch
            .iter()
            .map(|row| (row.target.clone(), row.body.clone()))
            .collect();
        let publish = (|| publisher.publish_all(&replies))
            .retry(reconnect_backoff())
            .notify(|e, after| {
                tracing::warn!(error = %e, retry_in = ?after, "replies wait in the outbox for the broker")
            });
        let outcomes = tokio::select! {
            result = publish => match result {
                Ok(outcomes) => outcomes,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return Ok(()),
        };
        let (mut delivered, mut refused) = (Vec::new(), Vec::new());
        for (row, outcome) in batch.iter().zip(outcomes) {
            if outcome == Delivered::Refused {
                let next = publisher.after_refusal(row.refusals + 1);
                note_refusal(&row.target, row.refusals + 1, next);
                refused.push((row.id, next));
            } else {
                delivered.push(row.id);
            }
        }
        store.outbox_settle(delivered, refused).await?;
    }
}

/// Logs a refused reply, and counts it when it is set aside.
pub fn note_refusal(target: &ReplyTarget, refusals: u32, next: NextAttempt) {
    match next {
        NextAttempt::At(at) => tracing::warn!(reply_to = %target.reply_to,
            correlation_id = ?target.correlation_id, refusals,
            retry_in_ms = at.saturating_sub(now_ms()).max(0),
            "the broker refused a reply (is its reply queue full?); it is retried on its own"),
        NextAttempt::SetAside => {
            metrics::counter!(crate::metrics::REPLIES_SET_ASIDE).increment(1);
            tracing::error!(reply_to = %target.reply_to, correlation_id = ?target.correlation_id,
                refusals, "the broker kept refusing a reply; it is set aside in the state database and not sent again");
        }
    }
}

/// One last drain at shutdown, bounded by `deadline`.
pub async fn flush(store: &Store, publisher: &Publisher, deadline: Duration) {
    let never = CancellationToken::new();
    match tokio::time::timeout(deadline, drain(store, publisher, &never)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the outbox could not be read at shutdown"),
        Err(_) => tracing::warn!(
            "replies are still in the outbox at shutdown; they are published at the next start"
        ),
    }
}
