//! The operations, one file each: what a request does to the host and to the records.
//!
//! Each operation converges the host to the requested state and returns an [`Outcome`] (status,
//! result, warnings, and the [`Change`] to commit) or an [`OpError`]. Operations never commit
//! anything themselves and never see lapin types: the executor commits the change together with
//! the reply, and tests call operations without a broker.

mod binds;
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

use crate::progress::Progress;
use crate::runtime::{Runtime, RuntimeError};
pub use getallcont::{cut as cut_page, first_records, page_of};
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

/// A failed operation has the shape of a refused request: a stable code and a sentence a
/// person can act on. A refusal of the rules is an operation's error as it is (`From<Refusal>`
/// is the identity); [`RuntimeError`] and [`StoreError`] convert below.
pub type OpError = crate::rules::Refusal;

impl OpError {
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
        // The executor names the node that answers (`reply::stamp_node`).
        node: None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
