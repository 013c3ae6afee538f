//! Logging: `tracing` events to stderr, as text for people or JSON lines for log collectors.
//!
//! `RUST_LOG` chooses what is logged (default `info,lapin=warn`). Request bodies are never logged
//! at info level: they may carry commands and paths a log reader need not see.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// What is logged when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=warn";

/// Installs the global subscriber. Text is coloured only when stderr is a terminal, so a journal
/// or a file gets no escape codes.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
