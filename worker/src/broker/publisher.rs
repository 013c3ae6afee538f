//! Confirmed publishing: the [`Publisher`] (its own connection, persistent, `mandatory`,
//! confirmed) and [`reconnect_backoff`], the pause between attempts while the broker is away.
//! Used at both ends of the request path: replies (outbox, intake, progress) and dead letters.

use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::{Broker, BrokerError};

/// Where one reply must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTarget {
    pub reply_to: String,
    pub correlation_id: Option<String>,
}

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

    /// How many times a reply the broker refuses is tried (`--reply-attempts`).
    pub fn reply_attempts(&self) -> u32 {
        self.broker.reply_attempts
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
