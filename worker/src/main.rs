//! `orchestrator-worker`: wiring only; everything else is in the library.

use clap::Parser;
use orchestrator_worker::{shutdown_signal, Settings, Worker};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::parse();
    let result = async {
        let worker = Worker::build(settings).await?;
        worker.run_until_stopped(shutdown_signal()).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
