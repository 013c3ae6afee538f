//! Waiting out a store that refuses writes (disk full, read-only file): the one retry loop for
//! store calls, used by the intake (deliveries stay in RabbitMQ meanwhile) and by the lanes (a
//! request's end must be recorded before its lane goes on).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::StoreResult;

/// Runs a store call until it succeeds, with jittered exponential backoff between attempts;
/// `None` when `stop` was cancelled first. `waiting` says, for the log, what waits meanwhile.
pub async fn until_written<T, F, Fut>(
    stop: &CancellationToken,
    waiting: &str,
    mut call: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let mut delays = backon::BackoffBuilder::build(crate::broker::reconnect_backoff());
    let mut failing_since: Option<Instant> = None;
    loop {
        match call().await {
            Ok(value) => {
                if let Some(since) = failing_since {
                    tracing::info!(after = ?since.elapsed(), "the state database accepts writes again; {waiting} no longer");
                }
                return Some(value);
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::error!(error = %e, "the state database refuses writes; {waiting} until it accepts them again (is the disk full or the file read-only?)");
                    failing_since = Some(Instant::now());
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}
