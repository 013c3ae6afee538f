//! Log messages on stderr in the format of apptainer's `sylog` package
//! (reference section 0.1): `FATAL:   `, `WARNING: `, `INFO:    `
//! prefixes, and the `LEVEL [U=..,P=..] func() msg` layout under `--debug`.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};

/// Current message level: FATAL=-4 ... INFO=1 ... DEBUG=5 (default 1).
static LEVEL: AtomicI32 = AtomicI32::new(1);

#[derive(Clone, Copy)]
pub enum Level {
    Fatal,
    Warning,
    Info,
    Verbose,
    Debug,
}

impl Level {
    fn value(self) -> i32 {
        match self {
            Level::Fatal => -4,
            Level::Warning => -2,
            Level::Info => 1,
            Level::Verbose => 2,
            Level::Debug => 5,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Fatal => "FATAL",
            Level::Warning => "WARNING",
            Level::Info => "INFO",
            Level::Verbose => "VERBOSE",
            Level::Debug => "DEBUG",
        }
    }
}

pub fn set_level(level: i32) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn level() -> i32 {
    LEVEL.load(Ordering::Relaxed)
}

/// Prints one message if the current level lets it through.
pub fn message(level: Level, msg: &str) {
    let current = self::level();
    if level.value() > current {
        return;
    }
    let msg = msg.trim_end_matches('\n');
    let line = if current >= 5 {
        let context = format!("[U={},P={}]", crate::sys::uid(), std::process::id());
        format!(
            "{:<8}{:<19}{:<30}{}\n",
            level.label(),
            context,
            "fakeApptainer()",
            msg
        )
    } else {
        format!("{:<8} {}\n", format!("{}:", level.label()), msg)
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn fatal(msg: &str) {
    message(Level::Fatal, msg);
}

pub fn warning(msg: &str) {
    message(Level::Warning, msg);
}

pub fn info(msg: &str) {
    message(Level::Info, msg);
}

pub fn verbose(msg: &str) {
    message(Level::Verbose, msg);
}

pub fn debug(msg: &str) {
    message(Level::Debug, msg);
}

/// Writes text that is not a log message (build progress lines) when INFO is shown.
pub fn plain_at_info(text: &str) {
    if Level::Info.value() <= level() {
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}
