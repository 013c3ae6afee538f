//! Apptainer processes of this worker that may outlive it.
//!
//! Each apptainer call runs in its own process group, so a worker killed with SIGKILL leaves
//! its calls running: a build would go on writing into the image a resumed `start` builds
//! again. Every spawned call is therefore recorded as a file (its pid and its start time, which
//! tells it from a later process that reuses the pid) and removed when the call ends; at
//! start-up, the process groups of the files left behind are killed before anything resumes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long start-up waits for a killed leftover process to be gone.
const REAP_WAIT: Duration = Duration::from_secs(5);

pub struct ChildRegistry {
    dir: PathBuf,
}

impl ChildRegistry {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Records a spawned call; the record is removed when the returned guard drops.
    pub fn record(&self, pid: u32) -> ChildRecord {
        let path = self.dir.join(pid.to_string());
        // A process already gone has nothing to kill later.
        if let Some(started) = start_time(pid) {
            if let Err(e) = std::fs::write(&path, started) {
                tracing::warn!(error = %e, path = %path.display(), "could not record an apptainer process");
            }
        }
        ChildRecord { path }
    }

    /// Kills the process groups of calls left running by an earlier run of the worker.
    pub fn reap_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let pid = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok());
            let recorded = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = pid {
                if start_time(pid).is_some_and(|started| started == recorded) {
                    tracing::warn!(
                        pid,
                        "killing an apptainer call left running by an earlier run of the worker"
                    );
                    kill_group(pid);
                    wait_gone(pid, &recorded);
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Removes its record when the call is over.
pub struct ChildRecord {
    path: PathBuf,
}

impl Drop for ChildRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The process's start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<String> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(19).map(str::to_owned)
}

pub fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn wait_gone(pid: u32, started: &str) {
    let deadline = Instant::now() + REAP_WAIT;
    while start_time(pid).is_some_and(|s| s == started) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
