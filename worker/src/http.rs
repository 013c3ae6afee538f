//! The optional HTTP listener (`--http-addr`): `/healthz`, `/readyz` and `/metrics` for service
//! managers, load balancers and Prometheus. It serves nothing else and never touches requests.
//!
//! Readiness is shared with the consume loop ([`Readiness`]); the store is probed on each
//! `/readyz`, so a full disk turns it 503 without waiting for a request to fail.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::fleet::Admin;
pub use crate::intake::Readiness;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// How long `/readyz` waits for the store's write probe before calling it unwritable.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the histogram summaries are maintained between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    store: Store,
    scheduler: Scheduler,
    fleet: Arc<Admin>,
}

/// Serves the endpoints on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    store: Store,
    scheduler: Scheduler,
    fleet: Arc<Admin>,
    stop: CancellationToken,
) {
    let handle = crate::metrics::recorder();
    let upkeep_stop = stop.clone();
    let upkeep = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                _ = upkeep_stop.cancelled() => return,
            }
        }
    });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            readiness,
            store,
            scheduler,
            fleet,
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "the HTTP listener failed; /healthz, /readyz and /metrics are gone until the worker restarts");
    }
    upkeep.abort();
}

/// Answering at all is the proof: the runtime that runs the worker ran this handler.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let mut reasons = Vec::new();
    if let Err(reason) = state.readiness.consumer() {
        reasons.push(format!("broker: {reason}"));
    }
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.probe_writable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("store: refuses writes: {e}")),
        Err(_) => reasons.push(format!(
            "store: no answer to a write within {}s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", reasons.join("\n")),
        )
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (lanes, longest) = state.scheduler.depth();
    metrics::gauge!(crate::metrics::LANES).set(lanes as f64);
    metrics::gauge!(crate::metrics::LONGEST_LANE).set(longest as f64);
    state.fleet.record_metrics().await;
    match state.store.depths().await {
        Ok((inbox, outbox)) => {
            metrics::gauge!(crate::metrics::INBOX_DEPTH).set(inbox as f64);
            metrics::gauge!(crate::metrics::OUTBOX_DEPTH).set(outbox as f64);
        }
        Err(e) => tracing::warn!(error = %e, "could not count the inbox and outbox for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::recorder().render(),
    )
}
