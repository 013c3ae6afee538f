//! apptainer-orchestrator's worker: requests from RabbitMQ, run through the `apptainer` command
//! line, replies to each requester.
//!
//! The modules follow a request through the worker:
//! - [`settings`]: flags and environment;
//! - [`broker`]: connections and topology;
//! - [`intake`]: decode, validate, deduplicate, write to the inbox, acknowledge;
//! - [`scheduler`]: one FIFO lane per container name, and the executor;
//! - [`ops`]: one file per operation;
//! - [`progress`]: best-effort progress envelopes for requests that ask for them;
//! - [`runtime`]: the apptainer adapter and the definition-file renderer;
//! - [`store`]: SQLite (containers, inbox, outbox);
//! - [`outbox`]: confirmed publishing of replies;
//! - [`reconciler`]: compares the records with the instances apptainer runs;
//! - [`app`]: [`Worker`], which wires them together.
//!
//! Around them, for operators: [`check`] (`--check`), [`telemetry`] (logs), [`http`]
//! (`/healthz`, `/readyz`, `/metrics`) and [`metrics`] (the names of what is counted).

pub mod app;
pub mod broker;
pub mod check;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod progress;
pub mod reconciler;
pub mod reply;
pub mod rules;
pub mod runtime;
pub mod scheduler;
pub mod settings;
pub mod store;
pub mod telemetry;

pub use app::Worker;
pub use settings::Settings;

/// Resolves on SIGTERM or SIGINT: the signals a service manager and a terminal send.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
