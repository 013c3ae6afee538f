//! The operations, one file each: what a request does to the host and to the records.
//!
//! Each operation converges the host to the requested state and returns an [`Outcome`] (status,
//! result, warnings, and the [`Change`] to commit) or an [`OpError`]. Operations never commit
//! anything themselves and never see lapin types: the executor commits the change together with
//! the reply, and tests call operations without a broker.

mod createvolume;
mod deletecont;
mod deletecontdata;
mod deletevolume;
mod getallcont;
mod getcont;
mod restart;
mod restore;
mod start;
mod stop;

use std::path::PathBuf;
use std::sync::Arc;

use schemas::{ContainerRecord, ErrorCode, Op, ReplyResult, Request, Stage};

use crate::intake::validate::{
    check_container_location, check_host_path, check_path_syntax, Invalid,
};
use crate::progress::Progress;
use crate::runtime::{Bind, Runtime, RuntimeError};
pub use restore::converge_dead_instance;
pub use start::abandon as abandon_start;

use crate::store::{Change, ContainerRow, Store, StoreError};

/// What the operations work with.
pub struct OpContext {
    pub store: Store,
    pub runtime: Arc<dyn Runtime>,
    pub images_dir: PathBuf,
    pub definitions_dir: PathBuf,
    /// Canonical directories that binds may come from.
    pub bind_roots: Vec<PathBuf>,
    /// Where `volume_name` is bound inside the container.
    pub home_mount: String,
    /// Progress envelopes for the requests that asked for them.
    pub progress: Arc<Progress>,
}

impl OpContext {
    /// Where the sandbox image of a container lives.
    pub fn image_path(&self, name: &str) -> PathBuf {
        self.images_dir.join(name)
    }

    /// Records the intent of the next side effect (so recovery knows it may have happened),
    /// then tells the requester, if it asked for progress, that the request reached `stage`.
    pub async fn record_intent(&self, attempt: Attempt, stage: Stage) -> Result<(), StoreError> {
        self.store
            .record_intent(attempt.seq, stage.as_str())
            .await?;
        self.progress.report(attempt.seq, stage).await;
        Ok(())
    }
}

/// The run of a write request: its inbox sequence number and how many times it was started.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub seq: i64,
    pub number: u32,
}

impl Attempt {
    /// An earlier run of this request was interrupted: its side effects may be on the host.
    pub fn is_resumed(&self) -> bool {
        self.number > 1
    }
}

/// A successful operation.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub result: Option<ReplyResult>,
    pub warnings: Vec<String>,
    pub change: Change,
}

impl Outcome {
    fn new(op: Op, result: Option<ReplyResult>, change: Change) -> Self {
        Self {
            status: op.success_status(),
            result,
            warnings: Vec::new(),
            change,
        }
    }
}

/// A failed operation: a stable code and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    fn not_registered(name: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("container {name} is not registered"),
        )
    }
}

impl From<RuntimeError> for OpError {
    fn from(error: RuntimeError) -> Self {
        let code = match error {
            RuntimeError::Timeout { .. } => ErrorCode::Timeout,
            _ => ErrorCode::RuntimeFailed,
        };
        Self::new(code, error.to_string())
    }
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        Self::new(ErrorCode::Internal, error.to_string())
    }
}

/// Runs one request. `attempt` is `None` for reads, which are not in the inbox.
pub async fn execute(
    ctx: &OpContext,
    request: &Request,
    attempt: Option<Attempt>,
) -> Result<Outcome, OpError> {
    let attempt = || attempt.expect("write requests run with an inbox attempt");
    match request {
        Request::Start(r) => start::execute(ctx, r, attempt()).await,
        Request::Stop(r) => stop::execute(ctx, r.container_name.as_str(), attempt()).await,
        Request::Restart(r) => restart::execute(ctx, r.container_name.as_str(), attempt()).await,
        Request::Getcont(r) => getcont::execute(ctx, r.container_name.as_str()).await,
        Request::Getallcont(r) => getallcont::execute(ctx, r).await,
        Request::Deletecont(r) => deletecont::execute(ctx, r.container_name.as_str()).await,
        Request::Deletecontdata(r) => {
            deletecontdata::execute(ctx, r.container_name.as_str(), attempt()).await
        }
        Request::Createvolume(r) => createvolume::execute(ctx, r).await,
        Request::Deletevolume(r) => deletevolume::execute(ctx, r).await,
    }
}

/// The registered container, or 404.
async fn registered(ctx: &OpContext, name: &str) -> Result<ContainerRow, OpError> {
    ctx.store
        .container(name)
        .await?
        .ok_or_else(|| OpError::not_registered(name))
}

/// A container's record as replies show it.
pub fn record(row: &ContainerRow) -> ContainerRecord {
    ContainerRecord {
        container_name: row.name.clone(),
        container_active: row.active,
        container_ip: if row.active {
            row.ip.clone()
        } else {
            String::new()
        },
        container_image: row.image.clone(),
        image_distributor: row.distributor.clone(),
        image_os: row.os.clone(),
        image_version: row.version.clone(),
        binds: row.binds.clone(),
        volume_name: row.volume_name.clone(),
    }
}

impl From<Invalid> for OpError {
    fn from(invalid: Invalid) -> Self {
        Self::new(invalid.code, invalid.message)
    }
}

/// Checks a host directory against the bind policy: absolute, free of the characters that
/// separate apptainer bind specs, existing, and inside an allowed root once symlinks are
/// resolved. Returns the resolved path, which is what apptainer is given; it is held to the
/// same syntax, since a symlink's target can hold a `,` that would split the bind in two.
fn resolve_host_dir(ctx: &OpContext, field: &str, location: &str) -> Result<PathBuf, OpError> {
    check_host_path(field, location)?;
    let resolved = std::fs::canonicalize(location).map_err(|_| {
        OpError::bad_request(format!(
            "{field} {location} does not exist on the host; create the directory first"
        ))
    })?;
    if !resolved.is_dir() {
        return Err(OpError::bad_request(format!(
            "{field} {location} is not a directory"
        )));
    }
    if !ctx.bind_roots.iter().any(|root| resolved.starts_with(root)) {
        let roots: Vec<String> = ctx
            .bind_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Err(OpError::new(
            ErrorCode::Forbidden,
            format!(
                "{field} {location} is outside the directories binds may come from ({}); the operator sets them with --allowed-bind-roots",
                roots.join(":")
            ),
        ));
    }
    let resolved_text = resolved.to_str().ok_or_else(|| {
        OpError::bad_request(format!(
            "{field} {location} resolves to a path that is not UTF-8"
        ))
    })?;
    check_path_syntax(
        &format!("{field} {location}, once resolved,"),
        resolved_text,
    )?;
    Ok(resolved)
}

/// All binds of a container for `instance start`: the home volume, then the other binds, each
/// host directory resolved again now (a symlink may have changed since it was recorded).
fn instance_binds(
    ctx: &OpContext,
    volume_name: Option<&str>,
    binds: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<Bind>, OpError> {
    let mut all = Vec::with_capacity(binds.len() + 1);
    if let Some(volume) = volume_name {
        let host = resolve_host_dir(ctx, "volume_name", volume)?;
        all.push(Bind {
            host: host.display().to_string(),
            container: ctx.home_mount.clone(),
        });
    }
    for (host, container) in binds {
        check_container_location(container)?;
        let host = resolve_host_dir(ctx, "a host directory in binds", host)?;
        all.push(Bind {
            host: host.display().to_string(),
            container: container.clone(),
        });
    }
    Ok(all)
}

#[cfg(test)]
pub(crate) mod tests;
