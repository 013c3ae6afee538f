//! The outbox loop, the end of the request path: drains committed replies through the broker's
//! [`Publisher`], retrying with backoff while the broker is away. A reply leaves the outbox only
//! once the broker has confirmed it. A reply the broker refuses (nacks) is retried on its own
//! schedule, then set aside; it never holds up the others.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{reconnect_backoff, Delivered, Publisher};
use crate::store::{now_ms, NextAttempt, ReplyTarget, Store};

/// How many replies one round of the outbox publishes before awaiting their confirms.
const OUTBOX_BATCH: u32 = 256;
/// The outbox is checked this often even without a wake-up (replies left by a crash).
const OUTBOX_POLL: Duration = Duration::from_secs(5);

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
                let next = after_refusal(publisher, row.refusals + 1);
                note_refusal(&row.target, row.refusals + 1, next);
                refused.push((row.id, next));
            } else {
                delivered.push(row.id);
            }
        }
        store.outbox_settle(delivered, refused).await?;
    }
}

/// What becomes of a reply the broker has refused `refusals` times: another attempt after
/// a backoff (1 s, doubling up to a minute, jittered), or, after `--reply-attempts`, set aside.
pub fn after_refusal(publisher: &Publisher, refusals: u32) -> NextAttempt {
    let mut delays = backon::BackoffBuilder::build(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(60))
            .with_jitter()
            .with_max_times(publisher.reply_attempts().saturating_sub(1) as usize),
    );
    match delays.nth(refusals.saturating_sub(1) as usize) {
        Some(delay) => NextAttempt::At(now_ms().saturating_add(delay.as_millis() as i64)),
        None => NextAttempt::SetAside,
    }
}

/// Keeps a reply the broker refused (published outside the outbox, e.g. a read's) for another
/// attempt on the outbox's schedule, and wakes the outbox; `false` if it could not be stored.
pub async fn keep_refused(
    store: &Store,
    publisher: &Publisher,
    wake: &Notify,
    target: ReplyTarget,
    body: String,
) -> bool {
    let next = after_refusal(publisher, 1);
    note_refusal(&target, 1, next);
    if let Err(e) = store.outbox_keep_refused(target, body, next).await {
        tracing::error!(error = %e, "could not keep a refused reply for another attempt");
        return false;
    }
    wake.notify_one();
    true
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
