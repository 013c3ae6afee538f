//! Apptainer processes of this worker that may outlive it.
//!
//! Each apptainer call runs in its own process group, so a worker killed with SIGKILL leaves
//! its calls running: a build would go on writing into the image a resumed `start` builds
//! again. Every spawned call is therefore recorded as a file (its pid, which is also its
//! process group, and its start time, which tells it from a later process that reuses the pid).
//! A call that ends by itself removes its record; a call cut off (timed out, or dropped at the
//! drain deadline) has its whole group killed, and its record stays until no process of the
//! group is left. At start-up, the groups of the records left behind are killed and waited for
//! before anything resumes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long start-up waits for a killed leftover process group to be gone.
const REAP_WAIT: Duration = Duration::from_secs(5);

pub struct ChildRegistry {
    dir: PathBuf,
}

impl ChildRegistry {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Records a spawned call. Dropping the returned guard kills the call's process group;
    /// [`ChildRecord::finished`] is for a call whose process exited by itself.
    pub fn record(&self, pid: u32) -> ChildRecord {
        let path = self.dir.join(pid.to_string());
        // A process already gone has nothing to kill later.
        if let Some(started) = start_time(pid) {
            if let Err(e) = std::fs::write(&path, started) {
                tracing::warn!(error = %e, path = %path.display(), "could not record an apptainer process");
            }
        }
        ChildRecord {
            path,
            pid,
            finished: false,
        }
    }

    /// Kills the process groups of calls left running by an earlier run of the worker, and
    /// waits for them to be gone.
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
            let Some(pid) = pid else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            // The leader still running is ours only if it started when recorded. A leader that
            // is gone may have left members of its group, which are ours: Linux does not hand
            // out a pid again while it names a live process group.
            let ours = start_time(pid).is_none_or(|started| started == recorded);
            if ours && group_alive(pid) {
                tracing::warn!(
                    pid,
                    "killing an apptainer call left running by an earlier run of the worker"
                );
                kill_group(pid);
                let deadline = Instant::now() + REAP_WAIT;
                while group_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if ours && group_alive(pid) {
                tracing::warn!(pid, "an apptainer call left running is not gone yet; it is killed again at the next start");
                continue;
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The record of one call in flight.
pub struct ChildRecord {
    path: PathBuf,
    pid: u32,
    finished: bool,
}

impl ChildRecord {
    /// The call's process exited by itself: the record goes.
    pub fn finished(mut self) {
        self.finished = true;
    }

    /// Kills the call's whole process group and waits (at most `limit`) until none of it is
    /// left; the record goes only then. The caller must have reaped the group leader.
    pub async fn kill_and_wait(mut self, limit: Duration) {
        kill_group(self.pid);
        let deadline = Instant::now() + limit;
        while group_alive(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.finished = !group_alive(self.pid);
    }
}

impl Drop for ChildRecord {
    fn drop(&mut self) {
        if !self.finished {
            // Cut off (the call's future was dropped): the whole group goes, not just the
            // leader. The record stays for the next start-up unless the group is already gone.
            kill_group(self.pid);
            if group_alive(self.pid) {
                return;
            }
        }
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

fn group(pid: u32) -> Option<nix::unistd::Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .map(nix::unistd::Pid::from_raw)
}

pub fn kill_group(pid: u32) {
    if let Some(group) = group(pid) {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether any process (including one not yet reaped) is left in process group `pid`.
fn group_alive(pid: u32) -> bool {
    group(pid).is_some_and(|group| {
        !matches!(
            nix::sys::signal::killpg(group, None),
            Err(nix::errno::Errno::ESRCH)
        )
    })
}
