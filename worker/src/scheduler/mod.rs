//! The scheduler: one FIFO lane per container name, and the executor that runs a lane's jobs.
//!
//! Requests for one container run one at a time in arrival order; lanes of different containers
//! run in parallel (apptainer processes are bounded separately, in the runtime). A lane exists
//! only while it has work: the last job out removes it, so memory does not grow with the number
//! of names ever seen. Total queued work is bounded by the intake's pending-request permits,
//! which every job carries until it is done.

mod executor;
mod fleet;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use schemas::{Reply, Request};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::ReplyTarget;

pub use executor::Executor;
pub use fleet::{Ownership, Room};

/// Lane of requests that name no container (`getallcont`); no container name can be this.
pub const GLOBAL_LANE: &str = "*";

/// The lane a request runs in: its container's, or the global one.
pub fn lane_of(request: &Request) -> String {
    request
        .container_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|| GLOBAL_LANE.to_owned())
}

/// One unit of work in a lane.
pub struct Job {
    pub kind: JobKind,
    /// Held until the job is done; bounds the work accepted but not finished.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Where progress envelopes go, when the requester asked for them (writes only: a read
    /// has no stage after `queued`, which the intake sends).
    pub progress: Option<ReplyTarget>,
    /// The request's span (correlation id, op, container, node): the job's logs carry it.
    pub span: tracing::Span,
}

pub enum JobKind {
    /// A write request in the inbox: its reply goes through the outbox.
    Write {
        request: Request,
        seq: i64,
        received_ms: i64,
        deadline_ms: Option<i64>,
    },
    /// A read: its reply goes back to the intake, which publishes it and then acknowledges.
    Read {
        request: Request,
        received: Instant,
        deadline_ms: Option<i64>,
        correlation_id: Option<String>,
        reply: oneshot::Sender<Reply>,
    },
    /// The reconciler found the container's instance gone while it is recorded as running.
    Reconcile { name: String },
}

/// One container's requests: those waiting, and whether one of its jobs is running.
#[derive(Default)]
struct Lane {
    waiting: VecDeque<Job>,
    running: bool,
}

/// The lanes. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    executor: Arc<Executor>,
    tracker: TaskTracker,
    /// Once cancelled, lanes start no new job; queued writes stay in the inbox for the next
    /// start, queued reads are redelivered by the broker.
    stopping: CancellationToken,
}

impl Scheduler {
    pub fn new(executor: Executor, tracker: TaskTracker, stopping: CancellationToken) -> Self {
        Self {
            lanes: Arc::default(),
            executor: Arc::new(executor),
            tracker,
            stopping,
        }
    }

    /// Queues `job` at the end of lane `lane`, starting the lane if it was idle.
    pub fn submit(&self, lane: &str, job: Job) {
        let start_lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            match lanes.get_mut(lane) {
                Some(queue) => {
                    queue.waiting.push_back(job);
                    false
                }
                None => {
                    let queue = Lane {
                        waiting: VecDeque::from([job]),
                        running: false,
                    };
                    lanes.insert(lane.to_owned(), queue);
                    true
                }
            }
        };
        if start_lane {
            let this = self.clone();
            let lane = lane.to_owned();
            self.tracker.spawn(async move { this.drive(lane).await });
        }
    }

    /// How many requests are ahead of one submitted to `lane` now: those waiting in it, plus
    /// the one running (0: the lane is idle and the request runs at once).
    pub fn position(&self, lane: &str) -> u32 {
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.get(lane).map_or(0, |queue| {
            u32::try_from(queue.waiting.len() + usize::from(queue.running)).unwrap_or(u32::MAX)
        })
    }

    /// How many lanes have work, and the longest queue.
    pub fn depth(&self) -> (usize, usize) {
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let longest = lanes.values().map(|l| l.waiting.len()).max().unwrap_or(0);
        (lanes.len(), longest)
    }

    /// Runs a lane's jobs one after another until it is empty, then removes it. The job is taken
    /// out and the empty lane removed under one lock, so a job submitted meanwhile either lands
    /// in this lane's queue before the check or starts a new lane.
    async fn drive(self, lane: String) {
        loop {
            let job = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
                let queue = lanes.get_mut(&lane).expect("a driven lane exists");
                let next = if self.stopping.is_cancelled() {
                    None
                } else {
                    queue.waiting.pop_front()
                };
                queue.running = next.is_some();
                if next.is_none() {
                    lanes.remove(&lane);
                }
                next
            };
            match job {
                Some(job) => self.executor.run(job).await,
                None => return,
            }
        }
    }
}
