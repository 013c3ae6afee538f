//! The worker as a whole: [`Worker::build`] checks, opens and wires everything (everything that
//! can fail at start-up fails there), then [`Worker::run_until_stopped`] reads resume → consume
//! → drain. The top of the layers: it may use every module, and no module uses it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use schemas::NodeId;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Publisher};
use crate::intake::{consume_until_cancelled, Drain, Fatal, Intake, Readiness};
use crate::ops::OpContext;
use crate::outbox;
use crate::progress::Progress;
use crate::reconciler::Reconciler;
use crate::runtime::{Apptainer, Limits, Runtime};
use crate::scheduler::{lane_of, Executor, Job, JobKind, Ownership, Room, Scheduler};
use crate::settings::{RestorePolicy, Settings};
use crate::store::Store;

/// How often finished requests older than the deduplication window are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long the final outbox flush may take at shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

pub struct Worker {
    settings: Settings,
    node: NodeId,
    store: Store,
    runtime: Arc<dyn Runtime>,
    broker: Broker,
    publisher: Arc<Publisher>,
    /// Bound in `build`, so a taken port fails the start instead of a later task.
    http: Option<tokio::net::TcpListener>,
    readiness: Readiness,
    scheduler: Scheduler,
    intake: Intake,
    outbox_wake: Arc<Notify>,
    /// The work in flight: lane jobs, and the replies and acknowledgements that settle
    /// deliveries. The drain waits on it.
    tracker: TaskTracker,
    /// Cancelled at shutdown: no delivery is taken and no job started any more.
    stop: CancellationToken,
    /// Cancelled when the drain deadline passes: every wait of the drain ends then.
    abort: CancellationToken,
}

/// The tasks that run beside the consumer, stopped in order by the drain.
struct Background {
    serving: Option<JoinHandle<()>>,
    http_stop: CancellationToken,
    outbox: JoinHandle<()>,
    outbox_stop: CancellationToken,
    reconciling: Option<JoinHandle<()>>,
    pruner: JoinHandle<()>,
}

impl Worker {
    /// Checks, opens and wires everything the worker needs; once this returns, the broker is
    /// reachable, the topology is declared, and nothing that runs later can fail to start.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        crate::check::fit_to_start(&settings)
            .await
            .context("the worker cannot work on this host")?;
        let node = settings
            .node_id()
            .map_err(anyhow::Error::msg)
            .context("the worker needs a node id")?;
        let http = bind_http(&settings).await?;
        let bind_roots = prepare_data_dir(&mut settings)?;
        let store = Store::open(&settings.state_db()).with_context(|| {
            format!(
                "could not open the state database {}",
                settings.state_db().display()
            )
        })?;
        let unclean_start = store
            .mark_running()
            .await
            .context("could not record the start of this run in the state database")?;
        let runtime = open_runtime(&settings)?;
        let broker = Broker::new(&settings, &node);
        let publisher = Arc::new(Publisher::new(broker.clone()));
        publisher
            .connect()
            .await
            .context("could not start the worker")?;
        let wiring = Wiring {
            unclean_start,
            settings: &settings,
            node: &node,
            store: &store,
            runtime: &runtime,
            publisher: &publisher,
        };
        Ok(wiring.into_worker(bind_roots, http, broker))
    }

    /// Runs until `shutdown` resolves: resumes the requests a previous run left unfinished,
    /// consumes, then drains (stops taking deliveries, lets running work finish up to the drain
    /// deadline), flushes the outbox and closes the connections.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let background = self.start_background();
        let resumed = self.resume_unfinished(&self.scheduler).await?;
        let reconciling = self.reconcile_at_start().await;
        let background = Background {
            reconciling,
            ..background
        };
        tracing::info!(
            node = %self.node,
            exchange = %self.broker.topology.exchange(),
            queue = %self.broker.host_queue(),
            broker = %self.settings.redacted_amqp_url(),
            resumed,
            "worker started"
        );
        let (deadline, consumed) = self.consume_then_drain(shutdown).await;
        self.stop_background(background, deadline).await;
        // A run that ends for want of its lease was not this node's: it leaves the marker as
        // the previous run left it.
        if consumed.is_ok() || !self.intake.unclean_start {
            if let Err(e) = self.store.mark_stopped().await {
                tracing::warn!(error = %e, "could not record the clean end of this run");
            }
        }
        consumed.context("the worker stopped consuming")?;
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Starts the HTTP listener, the outbox loop and the pruner.
    fn start_background(&mut self) -> Background {
        let http_stop = CancellationToken::new();
        let serving = self.http.take().map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
            }
            tokio::spawn(crate::http::serve(
                listener,
                self.readiness.clone(),
                self.store.clone(),
                self.scheduler.clone(),
                http_stop.clone(),
            ))
        });
        let outbox_stop = CancellationToken::new();
        let outbox = tokio::spawn(outbox::run(
            self.store.clone(),
            Arc::clone(&self.publisher),
            Arc::clone(&self.outbox_wake),
            outbox_stop.clone(),
        ));
        let pruner = tokio::spawn(prune_periodically(
            self.store.clone(),
            Duration::from_secs(self.settings.dedupe_hours * 3600),
        ));
        Background {
            serving,
            http_stop,
            outbox,
            outbox_stop,
            reconciling: None,
            pruner,
        }
    }

    /// Compares the records with apptainer's instances once, after the resumed requests (their
    /// lanes converge first), then starts the periodic reconciler if one is configured.
    async fn reconcile_at_start(&self) -> Option<JoinHandle<()>> {
        let reconciler = Reconciler {
            store: self.store.clone(),
            runtime: Arc::clone(&self.runtime),
            scheduler: self.scheduler.clone(),
        };
        if let Err(e) = reconciler.reconcile_once().await {
            tracing::warn!(error = %e, "could not compare the records with apptainer's instances at start-up");
        }
        (self.settings.reconcile_interval_secs > 0).then(|| {
            tokio::spawn(reconciler.run(
                Duration::from_secs(self.settings.reconcile_interval_secs),
                self.stop.clone(),
            ))
        })
    }

    /// Consumes until `shutdown` resolves, then drains under one deadline: `abort` is cancelled
    /// when it passes, and every wait of the drain ends by then. The consumer stops taking
    /// deliveries but keeps its channel open until the work in flight is done (it waits on the
    /// tracker itself); the wait here covers what remains, with no polling.
    /// Returns the drain deadline, which the reconciler is also given.
    async fn consume_then_drain(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> (tokio::time::Instant, Result<(), Fatal>) {
        let consuming = consume_until_cancelled(
            &self.broker,
            &self.intake,
            &self.readiness,
            self.stop.clone(),
            Drain {
                tracker: &self.tracker,
                deadline: &self.abort,
            },
        );
        tokio::pin!(consuming);
        let mut consumed = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested; draining"),
            result = &mut consuming => consumed = Some(result),
        }
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout();
        let drain_deadline = {
            let abort = self.abort.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                abort.cancel();
            })
        };
        let consumed = match consumed {
            Some(result) => result,
            None => consuming.await,
        };
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "operations still running at the drain deadline; they resume at the next start"
            );
        }
        self.abort.cancel();
        drain_deadline.abort();
        (deadline, consumed)
    }

    /// Stops what runs beside the consumer: the pruner, the reconciler (it had until the drain
    /// deadline), the outbox with one last bounded flush, the publisher, the HTTP listener.
    async fn stop_background(&self, background: Background, deadline: tokio::time::Instant) {
        background.pruner.abort();
        if let Some(mut reconciling) = background.reconciling {
            if tokio::time::timeout_at(deadline, &mut reconciling)
                .await
                .is_err()
            {
                reconciling.abort();
            }
        }
        background.outbox_stop.cancel();
        let _ = background.outbox.await;
        outbox::flush(&self.store, &self.publisher, FINAL_FLUSH).await;
        self.publisher.close().await;
        background.http_stop.cancel();
        if let Some(serving) = background.serving {
            let _ = serving.await;
        }
    }

    /// Puts requests accepted before a crash or shutdown back into their lanes, in their
    /// original order.
    async fn resume_unfinished(&self, scheduler: &Scheduler) -> anyhow::Result<usize> {
        let unfinished = self
            .store
            .unfinished()
            .await
            .context("could not read the inbox")?;
        let count = unfinished.len();
        for entry in unfinished {
            let request: schemas::Request = serde_json::from_str(&entry.body)
                .with_context(|| format!("inbox request {} is corrupt", entry.seq))?;
            if let Some(intent) = &entry.intent {
                tracing::info!(seq = entry.seq, %intent, "resuming a request interrupted during {intent}");
            }
            debug_assert_eq!(lane_of(&request), entry.lane);
            let span = tracing::info_span!(
                "request",
                seq = entry.seq,
                op = %request.op(),
                container = request.container_name().map(|n| n.to_string()),
                node = %self.node,
                resumed = true,
            );
            scheduler.submit(
                &entry.lane,
                Job {
                    kind: JobKind::Write {
                        request,
                        seq: entry.seq,
                        received_ms: entry.received_ms,
                        deadline_ms: entry.deadline_ms,
                    },
                    permit: None,
                    // The wish for progress was not kept: a resumed request gets its final
                    // reply only.
                    progress: None,
                    span,
                },
            );
        }
        Ok(count)
    }
}

/// The parts `build` opened, wired into the lanes, the executor and the intake.
struct Wiring<'a> {
    /// The previous run in this data directory did not end cleanly.
    unclean_start: bool,
    settings: &'a Settings,
    node: &'a NodeId,
    store: &'a Store,
    runtime: &'a Arc<dyn Runtime>,
    publisher: &'a Arc<Publisher>,
}

impl Wiring<'_> {
    fn into_worker(
        self,
        bind_roots: Vec<PathBuf>,
        http: Option<tokio::net::TcpListener>,
        broker: Broker,
    ) -> Worker {
        let (settings, store) = (self.settings, self.store);
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let outbox_wake = Arc::new(Notify::new());
        let progress = Arc::new(Progress::new(Some(Arc::clone(self.publisher))));
        let ownership = Arc::new(Ownership::new(broker.clone()));
        let room = Arc::new(Room::new(settings.max_containers));
        let executor = Executor {
            ctx: OpContext {
                store: store.clone(),
                runtime: Arc::clone(self.runtime),
                images_dir: settings.images_dir(),
                definitions_dir: settings.definitions_dir(),
                bind_roots,
                home_mount: settings.home_mount.clone(),
                progress: Arc::clone(&progress),
            },
            node: self.node.to_string(),
            outbox_wake: Arc::clone(&outbox_wake),
            max_attempts: settings.max_attempts,
            restore: settings.restore_policy == RestorePolicy::Restart,
            stop: stop.clone(),
            ownership: Arc::clone(&ownership),
            room: Arc::clone(&room),
        };
        let scheduler = Scheduler::new(executor, tracker.clone(), stop.clone());
        let intake = Intake {
            broker: broker.clone(),
            ownership,
            room,
            lease_wait: settings.lease_wait(),
            unclean_start: self.unclean_start,
            store: store.clone(),
            scheduler: scheduler.clone(),
            publisher: Arc::clone(self.publisher),
            progress,
            outbox_wake: Arc::clone(&outbox_wake),
            pending: Arc::new(Semaphore::new(settings.max_pending)),
            tracker: tracker.clone(),
            node: self.node.to_string(),
            default_reply_queue: settings.reply_queue.clone(),
            dead_letter_queue: settings.dead_letter_queue(),
            max_body_bytes: settings.max_body_bytes,
            max_attempts: settings.max_attempts,
            stop: stop.clone(),
            abort: abort.clone(),
        };
        Worker {
            settings: settings.clone(),
            node: self.node.clone(),
            store: store.clone(),
            runtime: Arc::clone(self.runtime),
            broker,
            publisher: Arc::clone(self.publisher),
            http,
            readiness: Readiness::default(),
            scheduler,
            intake,
            outbox_wake,
            tracker,
            stop,
            abort,
        }
    }
}

/// Binds the HTTP listener, if one is configured.
async fn bind_http(settings: &Settings) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let http_addr = settings
        .http_listen_addr()
        .map_err(anyhow::Error::msg)
        .context("refusing the HTTP listener's address")?;
    let Some(addr) = http_addr else {
        return Ok(None);
    };
    crate::metrics::recorder();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("could not listen for HTTP on {addr}"))?;
    Ok(Some(listener))
}

/// Creates the data directory and its parts, makes it absolute (apptainer reports the image of
/// an instance as an absolute path, and adopting an instance after a restart compares it with
/// the stored one), and returns the allowed bind roots, resolved.
fn prepare_data_dir(settings: &mut Settings) -> anyhow::Result<Vec<PathBuf>> {
    for dir in [
        settings.data_dir.clone(),
        settings.images_dir(),
        settings.definitions_dir(),
    ] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("could not create the data directory {}", dir.display()))?;
    }
    settings.data_dir = std::fs::canonicalize(&settings.data_dir).with_context(|| {
        format!(
            "could not resolve the data directory {}",
            settings.data_dir.display()
        )
    })?;
    if settings.allowed_bind_roots.is_empty() {
        let volumes = settings.bind_roots().remove(0);
        std::fs::create_dir_all(&volumes)
            .with_context(|| format!("could not create {}", volumes.display()))?;
    }
    settings
        .bind_roots()
        .iter()
        .map(|root| {
            std::fs::canonicalize(root)
                .with_context(|| format!("the allowed bind root {} does not exist", root.display()))
        })
        .collect()
}

/// The apptainer adapter, with its record of calls and temporary directory in the data
/// directory.
fn open_runtime(settings: &Settings) -> anyhow::Result<Arc<dyn Runtime>> {
    let apptainer = Apptainer::new(
        settings.data_dir.join("run/apptainer-calls"),
        settings.apptainer.clone(),
        settings.network.clone(),
        Limits {
            builds: settings.concurrency as usize,
            commands: settings.command_concurrency as usize,
        },
        settings.stop_grace_secs,
        settings.build_timeout(),
        settings.command_timeout(),
        &settings.apptainer_env,
    )
    .context("could not prepare the record of apptainer calls in the data directory")?
    .with_temp_dir(&settings.apptainer_temp_dir())
    .context("could not prepare apptainer's temporary directory in the data directory")?;
    Ok(Arc::new(apptainer))
}

async fn prune_periodically(store: Store, window: Duration) {
    loop {
        match store.prune_finished(window.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                forgotten = n,
                "forgot finished requests past the deduplication window"
            ),
            Err(e) => tracing::warn!(error = %e, "could not prune finished requests"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}
