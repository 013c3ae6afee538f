//! The runtime: what the operations ask of Apptainer, behind a trait.
//!
//! [`Apptainer`] is the one production implementation; it runs the real `apptainer` command
//! line (tests point it at `fake-apptainer`, which behaves the same). This layer knows nothing of
//! requests, replies or the store.

mod apptainer;
mod children;
pub mod definition;
mod sandbox;

use std::path::Path;
use std::time::Duration;

pub use apptainer::{Apptainer, Limits};

/// An instance as `instance list --json` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub name: String,
    pub pid: i64,
    /// The image the instance runs, as an absolute path.
    pub image: String,
    /// Empty when the instance has no network namespace of its own.
    pub ip: String,
}

/// One bind: a host directory mounted at a directory of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: String,
    pub container: String,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The instance was running and is gone now.
    Stopped,
    /// Apptainer knew no instance of that name: it was already gone.
    WasNotRunning,
}

/// Why an apptainer call failed. The message carries apptainer's own FATAL/ERROR lines, which
/// are what an operator needs to act.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("apptainer {command} failed (exit {exit}): {message}")]
    Failed {
        command: &'static str,
        exit: String,
        message: String,
    },
    #[error("apptainer {command} did not finish within {}s and was killed", .after.as_secs())]
    Timeout {
        command: &'static str,
        after: Duration,
    },
    #[error("could not run apptainer {command} ({program}): {reason}")]
    Spawn {
        command: &'static str,
        program: String,
        reason: String,
    },
    #[error("could not look inside image {image}: {reason}")]
    Inspect { image: String, reason: String },
    #[error("apptainer {command} printed output that could not be read: {reason}")]
    Unparseable {
        command: &'static str,
        reason: String,
    },
}

/// What the operations need from Apptainer. Every method converges where it can: stopping a
/// gone instance reports [`Stopped::WasNotRunning`] rather than failing.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Builds a sandbox image at `image` from the definition file `definition`, replacing a
    /// previous image there only when the build succeeds.
    async fn build_sandbox(&self, image: &Path, definition: &Path) -> Result<(), RuntimeError>;

    /// Starts instance `name` of `image` with `binds`, on the configured network.
    async fn start_instance(
        &self,
        image: &Path,
        name: &str,
        binds: &[Bind],
    ) -> Result<(), RuntimeError>;

    /// Every running instance apptainer lists (for this user, on this host).
    async fn instances(&self) -> Result<Vec<InstanceInfo>, RuntimeError>;

    /// The running instance called exactly `name`, if any.
    async fn instance(&self, name: &str) -> Result<Option<InstanceInfo>, RuntimeError>;

    /// Stops instance `name`.
    async fn stop_instance(&self, name: &str) -> Result<Stopped, RuntimeError>;

    /// Whether `path` is a directory inside `image` (symbolic links followed inside the image).
    async fn is_dir_in_image(&self, image: &Path, path: &str) -> Result<bool, RuntimeError>;

    /// `apptainer --version`.
    async fn version(&self) -> Result<String, RuntimeError>;
}
