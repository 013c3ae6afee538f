//! apptainer-orchestrator's worker: requests from RabbitMQ, run through the `apptainer` command
//! line, replies to each requester.
//!
//! The modules follow a request through the worker (the data path reads broker → intake →
//! scheduler → ops → runtime → store → outbox):
//! - [`broker`]: connections, topology, and the confirmed [`broker::Publisher`];
//! - [`intake`]: the consume loops (this host's queue, and placement: the fleet's shared
//!   queues); decode, check, deduplicate, write to the inbox, acknowledge;
//! - [`fleet`]: admin messages between hosts, and fleet-wide requests (`getallcont`);
//! - [`scheduler`]: one FIFO lane per container name, and the executor that runs a job and
//!   settles it (its reply and its change committed together);
//! - [`ops`]: one file per operation, and `ops::binds` for host directories;
//! - [`progress`]: best-effort progress envelopes for requests that ask for them;
//! - [`runtime`]: the apptainer adapter and the definition-file renderer;
//! - [`store`]: SQLite, one file per table (containers, inbox, outbox);
//! - [`outbox`]: drains committed replies through the publisher;
//! - [`app`]: [`Worker`], which wires them together.
//!
//! Around them, for operators: [`check`] (`--check`), [`reconciler`] (compares the records with
//! the instances apptainer runs), [`http`] (`/healthz`, `/readyz`, `/metrics`). Beneath
//! everything, the foundations: [`rules`] (every check of a request, and the one
//! [`rules::Refusal`]), [`reply`] (the reply envelopes), [`metrics`] (the names of what is
//! counted), [`telemetry`] (logs) and [`settings`] (flags and environment).
//!
//! Imports go one way only, down this order (`worker/tests/structure.rs` enforces it, with the
//! same list): `app` > `http`, `check`, `reconciler` > `intake` > `fleet` > `scheduler` > `ops` >
//! `progress` > `runtime` > `outbox` > `store` > `broker` > `rules`, `reply`, `metrics`,
//! `telemetry` > `settings`. The operator surfaces look at the path from outside, so nothing on
//! it needs them; the broker sits low because both ends of the path publish through it (the
//! intake its refusals, the outbox its replies), and the store only borrows its backoff and
//! reply address; the foundations know nothing of the path, so everything may use them.

pub mod app;
pub mod broker;
pub mod check;
pub mod fleet;
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
