//! Progress envelopes: `"final": false` replies that tell a requester which stage its request
//! has reached, sent only to requests that carried the `x-progress: true` header.
//!
//! Best effort, by design: they are published directly (not through the outbox), each publish
//! is bounded by [`PROGRESS_PUBLISH_TIMEOUT`], and a failure is logged and forgotten. A lost
//! progress event costs a requester a line of display; a lost final reply would cost it its
//! answer, which is why final replies alone go through the outbox. Each event is confirmed
//! before the operation goes on, so on the one publishing channel every progress envelope of a
//! request precedes its final reply. The wish is kept in memory only: a request resumed after a
//! crash gets its final reply but no more progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::Stage;

use crate::broker::Publisher;
use crate::reply::{to_body, ReplyHeader};
use crate::store::{now_ms, ReplyTarget};

/// How long one progress envelope may take to be confirmed before it is given up.
pub const PROGRESS_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a request's progress goes, and what its envelopes say about it.
#[derive(Debug, Clone)]
pub struct Watcher {
    pub target: ReplyTarget,
    pub header: ReplyHeader,
    /// When the worker took the request, in ms since the epoch (envelopes report the time since
    /// in `duration_ms`).
    pub received_ms: i64,
}

/// The requests that asked for progress, by inbox sequence number, and the publisher their
/// envelopes go through. `None` as publisher (tests of operations) drops every event.
pub struct Progress {
    publisher: Option<Arc<Publisher>>,
    watchers: Mutex<HashMap<i64, Watcher>>,
}

impl Progress {
    pub fn new(publisher: Option<Arc<Publisher>>) -> Self {
        Self {
            publisher,
            watchers: Mutex::default(),
        }
    }

    /// From now until [`Progress::unwatch`], stages reported for `seq` are sent to `watcher`.
    pub fn watch(&self, seq: i64, watcher: Watcher) {
        self.lock().insert(seq, watcher);
    }

    pub fn unwatch(&self, seq: i64) {
        self.lock().remove(&seq);
    }

    /// Sends `stage` to the requester of `seq`, if it asked for progress.
    pub async fn report(&self, seq: i64, stage: Stage) {
        let watcher = self.lock().get(&seq).cloned();
        if let Some(watcher) = watcher {
            self.send(&watcher, stage, None).await;
        }
    }

    /// Publishes one progress envelope and waits (boundedly) for its confirm.
    pub async fn send(&self, watcher: &Watcher, stage: Stage, position: Option<u32>) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        let header = ReplyHeader {
            duration_ms: (now_ms() - watcher.received_ms).max(0) as u64,
            ..watcher.header.clone()
        };
        let envelope = header.progress(watcher.target.correlation_id.as_deref(), stage, position);
        let replies = [(watcher.target.clone(), to_body(&envelope))];
        match tokio::time::timeout(PROGRESS_PUBLISH_TIMEOUT, publisher.publish_all(&replies)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, %stage, "a progress event was not published"),
            Err(_) => tracing::debug!(%stage, "a progress event was not confirmed in time"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Watcher>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
