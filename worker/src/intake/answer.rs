//! Replies that do not go through the outbox (a read's, a refusal's, a dead letter's), each
//! published on a task of its own so that the intake never waits for one.
//!
//! While the broker is away, such a reply waits (with backoff) like the outbox does; a reply the
//! broker refuses (nacks) is handed to the outbox, which retries it on its own schedule and then
//! sets it aside. A delivery is acknowledged only once its reply is safe in either way.

use std::sync::Arc;

use backon::Retryable;
use lapin::message::Delivery;
use lapin::BasicProperties;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::{reconnect_backoff, Delivered, PublishError, Publisher};
use crate::outbox;
use crate::store::{ReplyTarget, Store};

/// How many times moving a delivery to the dead-letter queue is tried (with backoff, about a
/// minute in all) before the delivery goes back to the broker, to come back and be tried again.
const DEAD_LETTER_ATTEMPTS: usize = 10;

/// Publishes replies outside the outbox; cheap to clone.
#[derive(Clone)]
pub struct Answerer {
    pub publisher: Arc<Publisher>,
    pub store: Store,
    pub outbox_wake: Arc<Notify>,
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes: replies still waiting for the broker are
    /// given up (deliveries not yet acknowledged are redelivered to the next run).
    pub abort: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the dead-letter queue {0} does not exist (it was deleted); declared it again")]
    Missing(String),
    #[error("the broker refused the message for the dead-letter queue {0}")]
    Refused(String),
}

impl Answerer {
    /// Publishes `body` to `target`; `true` once it is safe: confirmed, returned (the reply
    /// queue is gone), or refused and handed to the outbox. `false` when the drain deadline came
    /// first or the refused reply could not be stored.
    pub async fn publish(&self, target: ReplyTarget, body: String) -> bool {
        let replies = [(target, body)];
        let publish = (|| self.publisher.publish_all(&replies))
            .retry(reconnect_backoff())
            .notify(|e, after| tracing::warn!(error = %e, retry_in = ?after, "a reply waits for the broker"));
        let outcome = tokio::select! {
            result = publish => result,
            _ = self.abort.cancelled() => return false,
        };
        if !matches!(outcome.as_deref(), Ok([Delivered::Refused])) {
            return outcome.is_ok();
        }
        let [(target, body)] = replies;
        outbox::keep_refused(
            &self.store,
            &self.publisher,
            &self.outbox_wake,
            target,
            body,
        )
        .await
    }

    /// Publishes a reply on a task of its own, then acknowledges the delivery; if the reply
    /// cannot be made safe, the delivery goes back to the broker.
    pub fn answer_then_ack(&self, delivery: Delivery, target: ReplyTarget, body: String) {
        let this = self.clone();
        let answering = async move {
            this.settle(delivery, this.publish(target, body).await)
                .await
        };
        self.tracker
            .spawn(answering.instrument(tracing::Span::current()));
    }

    /// Moves a delivery to the dead-letter queue (mandatory and confirmed, the queue declared
    /// again when it was deleted, with backoff between attempts), then answers its requester
    /// with `reply` and acknowledges it, on a task of its own. If the move keeps failing, the
    /// delivery goes back to the broker.
    pub fn dead_letter_then_ack(
        &self,
        delivery: Delivery,
        queue: String,
        properties: BasicProperties,
        target: ReplyTarget,
        reply: String,
    ) {
        let this = self.clone();
        let moving = async move {
            let moved = this.move_to(&queue, &delivery.data, &properties).await;
            if moved {
                tracing::error!(%queue, "a delivery kept coming back unprocessed; moved it to the dead-letter queue");
            }
            let answered = moved && this.publish(target, reply).await;
            this.settle(delivery, answered).await
        };
        self.tracker
            .spawn(moving.instrument(tracing::Span::current()));
    }

    async fn move_to(&self, queue: &str, data: &[u8], properties: &BasicProperties) -> bool {
        let attempt = || async {
            match self
                .publisher
                .publish_to(queue, data, properties.clone())
                .await?
            {
                Delivered::Confirmed => Ok(()),
                Delivered::NoSuchQueue => {
                    self.publisher.declare_topology().await?;
                    Err(DeadLetterError::Missing(queue.to_owned()))
                }
                Delivered::Refused => Err(DeadLetterError::Refused(queue.to_owned())),
            }
        };
        let moving = attempt
            .retry(reconnect_backoff().with_max_times(DEAD_LETTER_ATTEMPTS))
            .notify(
                |e, after| tracing::warn!(error = %e, retry_in = ?after, "a dead letter waits"),
            );
        tokio::select! {
            result = moving => match result {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not move a delivery to the dead-letter queue; it goes back to the broker");
                    false
                }
            },
            _ = self.abort.cancelled() => false,
        }
    }

    /// Acknowledges a delivery whose reply is safe; otherwise returns it to the broker (unless
    /// the drain deadline passed: then the closing channel returns it).
    async fn settle(&self, delivery: Delivery, safe: bool) {
        if safe {
            super::ack(delivery).await
        } else if !self.abort.is_cancelled() {
            super::requeue(delivery).await
        }
    }
}
