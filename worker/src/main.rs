//! `orchestrator-worker`: wiring only; everything else is in the library.

use clap::Parser;
use orchestrator_worker::{check, shutdown_signal, telemetry, Settings, Worker};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    if settings.check {
        let report = check::run(&settings).await;
        println!("{report}");
        return if report.passed() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    telemetry::init(settings.log_format);
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
