//! Test controls, read on every invocation from `FAKE_APPTAINER_*` variables and,
//! overriding them key by key, from the `KEY=VALUE` lines of the file named by
//! `FAKE_APPTAINER_CONTROL` (so a test can change the fake's behaviour while the
//! program that calls it keeps running).
//!
//! | key | value | effect |
//! |---|---|---|
//! | `FAIL` | `build,instance-start,...` | the subcommand fails: `FATAL:   fake-apptainer: injected failure of SUB`, exit 255 |
//! | `DELAY_MS` | `build=2000,instance-start=300` | sleeps that long at the start of the subcommand's work |
//! | `HANG` | `exec,...` | the subcommand sleeps forever |
//! | `HANG_AFTER` | `instance-start,...` | the subcommand does its work (an instance start leaves its instance running), then sleeps forever instead of exiting |
//! | `GARBAGE_LIST` | `1` | `instance list --json` prints non-JSON and exits 0 |
//!
//! Subcommand names: `build`, `instance-start` (also `instance run`),
//! `instance-stop`, `instance-list`, `exec`. `*` (or `all`) names every one; a
//! bare number in `DELAY_MS` delays every subcommand.

use std::collections::HashMap;
use std::time::Duration;

use crate::cli::Fail;
use crate::sys;

const KEYS: [&str; 5] = ["FAIL", "DELAY_MS", "HANG", "HANG_AFTER", "GARBAGE_LIST"];

pub struct Controls {
    values: HashMap<&'static str, String>,
}

impl Controls {
    pub fn load() -> Controls {
        let mut values = HashMap::new();
        for key in KEYS {
            if let Ok(v) = std::env::var(format!("FAKE_APPTAINER_{key}")) {
                values.insert(key, v);
            }
        }
        if let Some(path) = sys::env_nonempty("FAKE_APPTAINER_CONTROL") {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let Some((key, value)) = line.split_once('=') else {
                        continue;
                    };
                    let key = key.trim();
                    let key = key.strip_prefix("FAKE_APPTAINER_").unwrap_or(key);
                    if let Some(known) = KEYS.iter().find(|k| **k == key) {
                        values.insert(*known, value.trim().to_string());
                    }
                }
            }
        }
        Controls { values }
    }

    fn names(&self, key: &str) -> Vec<String> {
        self.values
            .get(key)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn listed(&self, key: &str, sub: &str) -> bool {
        self.names(key)
            .iter()
            .any(|n| n == sub || n == "*" || n == "all")
    }

    pub fn fails(&self, sub: &str) -> bool {
        self.listed("FAIL", sub)
    }

    pub fn delay(&self, sub: &str) -> Option<Duration> {
        let mut found = None;
        for entry in self.names("DELAY_MS") {
            let (name, ms) = match entry.split_once('=') {
                Some((n, ms)) => (n.trim().to_string(), ms.trim().to_string()),
                None => ("*".to_string(), entry),
            };
            if name == sub || name == "*" || name == "all" {
                if let Ok(ms) = ms.parse::<u64>() {
                    found = Some(Duration::from_millis(ms));
                }
            }
        }
        found
    }

    pub fn garbage_list(&self) -> bool {
        self.values
            .get("GARBAGE_LIST")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    }

    /// Delay, then hang, as asked for `sub`.
    pub fn wait(&self, sub: &str) {
        if let Some(delay) = self.delay(sub) {
            std::thread::sleep(delay);
        }
        if self.listed("HANG", sub) {
            hang();
        }
    }

    /// Hangs if `sub` is to hang once its work is done (`HANG_AFTER`).
    pub fn hang_after(&self, sub: &str) {
        if self.listed("HANG_AFTER", sub) {
            hang();
        }
    }

    /// Delay, hang, then the injected failure: the common gate of a subcommand.
    pub fn gate(&self, sub: &str) -> Result<(), Fail> {
        self.wait(sub);
        if self.fails(sub) {
            return Err(injected_failure(sub));
        }
        Ok(())
    }
}

/// Sleeps until killed, as a stuck apptainer would.
fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

pub fn injected_failure(sub: &str) -> Fail {
    Fail::Fatal(format!("fake-apptainer: injected failure of {sub}"))
}
