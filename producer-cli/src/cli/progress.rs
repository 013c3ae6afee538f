//! Live progress on stderr: a spinner with the stage and the elapsed time on a terminal, one
//! plain line per stage otherwise (logs, pipes, tests).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use schemas::Reply;

pub struct Display {
    spinner: Option<ProgressBar>,
    started: Instant,
}

impl Display {
    pub fn new(terminal: bool) -> Self {
        let spinner = terminal.then(|| {
            let spinner = ProgressBar::new_spinner();
            spinner.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            spinner.enable_steady_tick(Duration::from_millis(120));
            spinner.set_message("sent; waiting for the worker");
            spinner
        });
        Self {
            spinner,
            started: Instant::now(),
        }
    }

    /// Shows one progress envelope.
    pub fn show(&mut self, event: &Reply) {
        let name = event.container_name.as_deref().unwrap_or("request");
        let stage = event.stage.as_deref().unwrap_or("working");
        let mut text = format!("{name}: {stage}");
        if let Some(position) = event.position {
            text.push_str(&format!(" (position {position})"));
        }
        match &self.spinner {
            Some(spinner) => spinner.set_message(text),
            None => eprintln!("{text} after {:.1}s", self.started.elapsed().as_secs_f64()),
        }
    }

    /// Removes the spinner, so the result is printed on a clean line.
    pub fn finish(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
    }
}
