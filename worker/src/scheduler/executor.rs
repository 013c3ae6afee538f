//! The executor: runs a job's operation and settles it. A write's reply is committed to the
//! outbox together with the operation's change (retried until written: the lane waits); a
//! read's reply goes back to the intake. Below the lanes, above the operations.

use std::sync::Arc;

use schemas::{ErrorCode, Reply, Request, PROTOCOL_VERSION};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::fleet::{Ownership, Room};
use super::{Job, JobKind};
use crate::ops::{self, Attempt, OpContext, OpError, Outcome};
use crate::progress::Watcher;
use crate::reply::{to_body, ReplyHeader};
use crate::store::{now_ms, Change, ReplyTarget};

/// Runs jobs: operations, then their commit with the reply.
pub struct Executor {
    pub ctx: OpContext,
    pub node: String,
    /// Woken when replies were committed to the outbox.
    pub outbox_wake: Arc<Notify>,
    /// A request interrupted this many times (the worker died while running it) is given up.
    pub max_attempts: u32,
    /// Whether instances that died outside the orchestrator are started again.
    pub restore: bool,
    /// Cancelled at shutdown: a request whose end cannot be recorded is then left in the inbox.
    pub stop: CancellationToken,
    /// Keeps the name bindings true to the store.
    pub ownership: Arc<Ownership>,
    /// Whether this host may take another start.
    pub room: Arc<Room>,
}

impl Executor {
    pub(super) async fn run(self: &Arc<Self>, job: Job) {
        let Job {
            kind,
            permit: _permit,
            progress,
            span,
        } = job;
        self.run_kind(kind, progress).instrument(span).await
    }

    async fn run_kind(self: &Arc<Self>, kind: JobKind, progress: Option<ReplyTarget>) {
        match kind {
            JobKind::Write {
                request,
                seq,
                received_ms,
                deadline_ms,
            } => {
                if let Some(target) = progress {
                    let watcher = Watcher {
                        target,
                        header: self.header(&request, 0),
                        received_ms,
                    };
                    self.ctx.progress.watch(seq, watcher);
                }
                self.run_write(seq, received_ms, deadline_ms, request).await
            }
            JobKind::Read {
                request,
                received,
                deadline_ms,
                correlation_id,
                reply,
            } => {
                let outcome = match deadline_passed(deadline_ms) {
                    Some(error) => Err(error),
                    None => self.guarded(request.clone(), None).await,
                };
                if let Some(name) = request.container_name() {
                    let store = &self.ctx.store;
                    self.ownership.settle(store, name, &Change::Nothing).await;
                }
                let header = self.header(&request, received.elapsed().as_millis() as u64);
                answered(&request, &outcome, header.duration_ms);
                // The intake may have given up (shutdown); then the delivery is redelivered.
                let _ = reply.send(final_reply(&header, correlation_id.as_deref(), &outcome));
            }
            JobKind::Reconcile { name } => {
                if let Err(e) = ops::converge_dead_instance(&self.ctx, &name, self.restore).await {
                    tracing::warn!(container = %name, error = %e, "could not reconcile a dead instance");
                }
            }
        }
    }

    async fn run_write(
        self: &Arc<Self>,
        seq: i64,
        received_ms: i64,
        deadline_ms: Option<i64>,
        request: Request,
    ) {
        let outcome = match self.ctx.store.begin_attempt(seq).await {
            Err(e) => Err(OpError::from(e)),
            Ok(number) if number > self.max_attempts => {
                tracing::error!(
                    seq,
                    attempts = number - 1,
                    "giving up a request that was interrupted too often"
                );
                let error = OpError::new(
                    ErrorCode::Internal,
                    format!(
                        "the worker stopped {} times while running this request and gave it up; check the worker's log and the container's state",
                        number - 1
                    ),
                );
                Err(self.abandoned(&request, error).await)
            }
            Ok(number) => match deadline_passed(deadline_ms) {
                Some(error) if number > 1 => Err(self.abandoned(&request, error).await),
                Some(error) => Err(error),
                None => {
                    if number > 1 {
                        tracing::info!(seq, attempt = number, "resuming an interrupted request");
                    }
                    match self.claim(&request).await {
                        Ok(()) => {
                            self.guarded(request.clone(), Some(Attempt { seq, number }))
                                .await
                        }
                        Err(refused) => Err(refused),
                    }
                }
            },
        };
        self.ctx.progress.unwatch(seq);
        let duration = (now_ms() - received_ms).max(0) as u64;
        let header = self.header(&request, duration);
        answered(&request, &outcome, duration);
        let change = outcome
            .as_ref()
            .map(|o| o.change.clone())
            .unwrap_or(Change::Nothing);
        if let Err(e) = &outcome {
            tracing::info!(seq, op = %request.op(), code = ?e.code, "request failed: {}", e.message);
        }
        if let Some(name) = request.container_name() {
            self.ownership.settle(&self.ctx.store, name, &change).await;
        }
        let reply_for =
            move |correlation: Option<&str>| to_body(&final_reply(&header, correlation, &outcome));
        if self.settle(seq, change, reply_for).await {
            self.outbox_wake.notify_one();
        }
        if let Some(name) = request.container_name() {
            let was_start = matches!(request, Request::Start(_));
            self.room.finished(name.as_str(), was_start);
        }
    }

    /// Before a `start` runs: the name must route here ([`Ownership::claim`]).
    async fn claim(&self, request: &Request) -> Result<(), OpError> {
        match request {
            Request::Start(start) => self.ownership.claim(&start.container_name).await,
            _ => Ok(()),
        }
    }

    /// Records the end of a request: its change, its completion and its reply, in one
    /// transaction, retried with backoff while the store refuses it. The lane waits meanwhile,
    /// so no later request of the container runs before this one is settled (and the intake,
    /// whose writes fail alike, takes nothing either). `false` when shutdown came first: the
    /// request stays in the inbox and runs again at the next start.
    async fn settle<R>(&self, seq: i64, change: Change, reply_for: R) -> bool
    where
        R: Fn(Option<&str>) -> String + Send + Sync + 'static,
    {
        let reply_for = Arc::new(reply_for);
        let commit = || {
            let reply_for = Arc::clone(&reply_for);
            let change = change.clone();
            self.ctx
                .store
                .finish(seq, change, move |correlation| reply_for(correlation))
        };
        let settled = crate::store::until_written(&self.stop, "the request's lane waits", commit)
            .await
            .is_some();
        if !settled {
            tracing::warn!(
                seq,
                "shutting down before the end of a request could be recorded; it will be resumed at the next start"
            );
        }
        settled
    }

    /// A write that is not run again after an interrupted attempt: undoes what that attempt may
    /// have left on the host, where the operation knows how.
    async fn abandoned(&self, request: &Request, error: OpError) -> OpError {
        match request {
            Request::Start(req) => ops::abandon_start(&self.ctx, req, error).await,
            _ => error,
        }
    }

    /// Runs the operation so that a panic becomes a 500 reply instead of a lane that never
    /// moves again. It runs in place, in the lane's task: a task of its own would cost a
    /// hand-off per request.
    async fn guarded(
        self: &Arc<Self>,
        request: Request,
        attempt: Option<Attempt>,
    ) -> Result<Outcome, OpError> {
        use futures_lite::FutureExt;
        let op = request.op();
        let running = ops::execute(&self.ctx, &request, attempt);
        match std::panic::AssertUnwindSafe(running).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(%op, panic = %message, "an operation panicked");
                Err(OpError::new(
                    ErrorCode::Internal,
                    format!("the worker failed while running {op}; see its log"),
                ))
            }
        }
    }

    fn header(&self, request: &Request, duration_ms: u64) -> ReplyHeader {
        ReplyHeader {
            node: self.node.clone(),
            op: Some(request.op()),
            container_name: request.container_name().map(|n| n.to_string()),
            duration_ms,
        }
    }
}

/// The reply status of an outcome.
fn status_of(outcome: &Result<Outcome, OpError>) -> u16 {
    match outcome {
        Ok(outcome) => outcome.status,
        Err(error) => error.code.status(),
    }
}

/// Logs (in the request's span) how a request ended.
fn answered(request: &Request, outcome: &Result<Outcome, OpError>, duration_ms: u64) {
    let status = status_of(outcome);
    tracing::info!(op = %request.op(), status, duration_ms, "request answered");
    crate::metrics::replied(
        Some(request.op()),
        status,
        Some(std::time::Duration::from_millis(duration_ms)),
    );
}

/// The 504 of a request whose deadline passed before it could run.
fn deadline_passed(deadline_ms: Option<i64>) -> Option<OpError> {
    let deadline = deadline_ms?;
    let late = now_ms() - deadline;
    (late > 0).then(|| {
        OpError::new(
            ErrorCode::DeadlineExceeded,
            format!("the request's deadline passed {late} ms before its turn came; it was not run"),
        )
    })
}

/// The final reply for a finished operation.
fn final_reply(
    header: &ReplyHeader,
    correlation_id: Option<&str>,
    outcome: &Result<Outcome, OpError>,
) -> Reply {
    match outcome {
        Ok(outcome) => Reply {
            v: PROTOCOL_VERSION,
            correlation_id: correlation_id.map(str::to_owned),
            op: header.op,
            container_name: header.container_name.clone(),
            status: outcome.status,
            ok: true,
            is_final: true,
            stage: None,
            position: None,
            result: outcome.result.clone(),
            error: None,
            warnings: outcome.warnings.clone(),
            node: header.node.clone(),
            duration_ms: header.duration_ms,
        },
        Err(error) => header.error(correlation_id, error.code, &error.message),
    }
}

/// Ownership without a broker session (binding changes are skipped), for the unit tests.
#[cfg(test)]
fn test_ownership() -> Arc<Ownership> {
    use clap::Parser;
    let settings = crate::settings::Settings::try_parse_from(["test"]).unwrap();
    let node = schemas::NodeId::parse("test").unwrap();
    Arc::new(Ownership::new(crate::broker::Broker::new(&settings, &node)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;

    use super::Executor;
    use crate::ops::tests::{accepted, context, start};
    use crate::runtime::{Bind, InstanceInfo, Runtime, RuntimeError, Stopped};

    /// A runtime whose every call panics: a bug in the worker, as far as the lane can tell.
    struct Panicking;

    #[async_trait::async_trait]
    impl Runtime for Panicking {
        async fn build_sandbox(&self, _: &Path, _: &Path) -> Result<(), RuntimeError> {
            panic!("build_sandbox")
        }
        async fn start_instance(&self, _: &Path, _: &str, _: &[Bind]) -> Result<(), RuntimeError> {
            panic!("start_instance")
        }
        async fn instances(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
            panic!("instances")
        }
        async fn instance(&self, _: &str) -> Result<Option<InstanceInfo>, RuntimeError> {
            panic!("instance")
        }
        async fn stop_instance(&self, _: &str) -> Result<Stopped, RuntimeError> {
            panic!("stop_instance")
        }
        async fn is_dir_in_image(&self, _: &Path, _: &str) -> Result<bool, RuntimeError> {
            panic!("is_dir_in_image")
        }
        async fn version(&self) -> Result<String, RuntimeError> {
            panic!("version")
        }
    }

    #[tokio::test]
    async fn an_operation_that_panics_is_answered_500_and_leaves_the_inbox() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("volumes")).unwrap();
        let executor = Arc::new(Executor {
            ctx: context(dir.path(), Arc::new(Panicking)),
            node: "test".into(),
            outbox_wake: Arc::new(Notify::new()),
            max_attempts: 5,
            restore: false,
            stop: CancellationToken::new(),
            ownership: super::test_ownership(),
            room: Arc::new(super::Room::new(None)),
        });
        let request = start("nb1");
        let seq = accepted(&executor.ctx, &request).await;

        executor.run_write(seq, 0, None, request).await;

        let replies = executor.ctx.store.outbox_batch(10).await.unwrap();
        assert_eq!(replies.len(), 1);
        let reply: serde_json::Value = serde_json::from_str(&replies[0].body).unwrap();
        assert_eq!(reply["status"], 500, "{reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the worker failed while running start"));
        assert!(executor.ctx.store.unfinished().await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod settling {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use schemas::{ContainerName, ContainerRequest, Request};
    use tokio::sync::Notify;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::super::{Job, JobKind, Scheduler};
    use super::Executor;
    use crate::ops::tests::{accepted, context, start, MemoryRuntime};

    /// A write job for `request`, as the intake submits it.
    fn write_job(request: schemas::Request, seq: i64) -> Job {
        Job {
            kind: JobKind::Write {
                request,
                seq,
                received_ms: crate::store::now_ms(),
                deadline_ms: None,
            },
            permit: None,
            progress: None,
            span: tracing::Span::none(),
        }
    }

    #[tokio::test]
    async fn a_lane_does_not_move_on_before_its_request_is_settled() {
        // Arrange: a start whose final commit fails three times, and a stop queued behind it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("volumes")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let executor = Executor {
            ctx: context(dir.path(), Arc::new(MemoryRuntime::default())),
            node: "test".into(),
            outbox_wake: Arc::new(Notify::new()),
            max_attempts: 5,
            restore: false,
            stop: CancellationToken::new(),
            ownership: super::test_ownership(),
            room: Arc::new(super::Room::new(None)),
        };
        let store = executor.ctx.store.clone();
        let stop = Request::Stop(ContainerRequest {
            v: None,
            container_name: ContainerName::parse("nb1").unwrap(),
        });
        let first = accepted(&executor.ctx, &start("nb1")).await;
        let second = accepted(&executor.ctx, &stop).await;
        store.fail_finish(first, 3);
        let scheduler = Scheduler::new(executor, TaskTracker::new(), CancellationToken::new());

        // Act
        scheduler.submit("nb1", write_job(start("nb1"), first));
        scheduler.submit("nb1", write_job(stop, second));

        // Assert: both settled, the start first, each answered once.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !store.unfinished().await.unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let replies: Vec<(String, u64)> = store
            .outbox_batch(10)
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let reply: serde_json::Value = serde_json::from_str(&row.body).unwrap();
                (
                    reply["op"].as_str().unwrap().to_owned(),
                    reply["status"].as_u64().unwrap(),
                )
            })
            .collect();
        let unfinished = store.unfinished().await.unwrap();
        assert_eq!(
            replies,
            [("start".to_owned(), 201), ("stop".to_owned(), 200)],
            "unfinished: {unfinished:?}"
        );
    }
}
