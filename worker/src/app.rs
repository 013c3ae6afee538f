//! The worker as a whole: [`Worker::build`] prepares everything that can fail at start-up (data
//! directory, store, broker), then [`Worker::run_until_stopped`] resumes unfinished requests,
//! consumes until the shutdown future resolves, drains, and flushes the outbox.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::BasicCancelOptions;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::broker::{reconnect_backoff, Publisher};
use crate::http::Readiness;
use crate::intake::Intake;
use crate::ops::OpContext;
use crate::outbox;
use crate::progress::Progress;
use crate::reconciler::Reconciler;
use crate::runtime::{Apptainer, Limits, Runtime};
use crate::scheduler::{lane_of, Executor, Job, JobKind, Scheduler};
use crate::settings::{RestorePolicy, Settings};
use crate::store::Store;

/// How often finished requests older than the deduplication window are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long the final outbox flush may take at shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

pub struct Worker {
    settings: Settings,
    node: String,
    store: Store,
    runtime: Arc<dyn Runtime>,
    broker: Broker,
    publisher: Arc<Publisher>,
    bind_roots: Vec<std::path::PathBuf>,
    /// Bound in `build`, so a taken port fails the start instead of a later task.
    http: Option<tokio::net::TcpListener>,
    readiness: Readiness,
}

impl Worker {
    /// Checks and opens everything the worker needs; once this returns, the broker is reachable
    /// and the topology is declared.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        crate::check::fit_to_start(&settings)
            .await
            .context("the worker cannot work on this host")?;
        let node = settings.node_id();
        let http_addr = settings
            .http_listen_addr()
            .map_err(anyhow::Error::msg)
            .context("refusing the HTTP listener's address")?;
        let http = match http_addr {
            Some(addr) => {
                crate::metrics::recorder();
                Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("could not listen for HTTP on {addr}"))?,
                )
            }
            None => None,
        };
        for dir in [
            settings.data_dir.clone(),
            settings.images_dir(),
            settings.definitions_dir(),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| {
                format!("could not create the data directory {}", dir.display())
            })?;
        }
        // Absolute from here on: apptainer reports the image of an instance as an absolute path,
        // and adopting an instance after a restart compares it with the stored one.
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
        let bind_roots = settings
            .bind_roots()
            .iter()
            .map(|root| {
                std::fs::canonicalize(root).with_context(|| {
                    format!("the allowed bind root {} does not exist", root.display())
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let store = Store::open(&settings.state_db()).with_context(|| {
            format!(
                "could not open the state database {}",
                settings.state_db().display()
            )
        })?;
        let runtime: Arc<dyn Runtime> = Arc::new(
            Apptainer::new(
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
            .context("could not prepare apptainer's temporary directory in the data directory")?,
        );
        let broker = Broker::new(&settings, &node);
        let publisher = Arc::new(Publisher::new(broker.clone()));
        publisher
            .connect()
            .await
            .context("could not start the worker")?;
        Ok(Self {
            settings,
            node,
            store,
            runtime,
            broker,
            publisher,
            bind_roots,
            http,
            readiness: Readiness::default(),
        })
    }

    /// Runs until `shutdown` resolves, then stops taking deliveries, lets running operations
    /// finish (up to the drain timeout), flushes the outbox and closes the connections.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let outbox_wake = Arc::new(Notify::new());
        let progress = Arc::new(Progress::new(Some(Arc::clone(&self.publisher))));
        let executor = Executor {
            ctx: OpContext {
                store: self.store.clone(),
                runtime: Arc::clone(&self.runtime),
                images_dir: self.settings.images_dir(),
                definitions_dir: self.settings.definitions_dir(),
                bind_roots: self.bind_roots.clone(),
                home_mount: self.settings.home_mount.clone(),
                progress: Arc::clone(&progress),
            },
            node: self.node.clone(),
            outbox_wake: Arc::clone(&outbox_wake),
            max_attempts: self.settings.max_attempts,
            restore: self.settings.restore_policy == RestorePolicy::Restart,
            stop: stop.clone(),
        };
        let scheduler = Scheduler::new(executor, tracker.clone(), stop.clone());
        let http_stop = CancellationToken::new();
        let serving = self.http.take().map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
            }
            tokio::spawn(crate::http::serve(
                listener,
                self.readiness.clone(),
                self.store.clone(),
                scheduler.clone(),
                http_stop.clone(),
            ))
        });
        let outbox_stop = CancellationToken::new();
        let outbox_task = tokio::spawn(outbox::run(
            self.store.clone(),
            Arc::clone(&self.publisher),
            Arc::clone(&outbox_wake),
            outbox_stop.clone(),
        ));

        let resumed = self.resume_unfinished(&scheduler).await?;
        let reconciler = Reconciler {
            store: self.store.clone(),
            runtime: Arc::clone(&self.runtime),
            scheduler: scheduler.clone(),
        };
        // At start-up, after the resumed requests: their lanes converge first.
        if let Err(e) = reconciler.reconcile_once().await {
            tracing::warn!(error = %e, "could not compare the records with apptainer's instances at start-up");
        }
        let reconciling = (self.settings.reconcile_interval_secs > 0).then(|| {
            tokio::spawn(reconciler.run(
                Duration::from_secs(self.settings.reconcile_interval_secs),
                stop.clone(),
            ))
        });
        tracing::info!(
            node = %self.node,
            queue = %self.broker.request_queue,
            broker = %self.settings.redacted_amqp_url(),
            resumed,
            "worker started"
        );
        let pruner = tokio::spawn(prune_periodically(
            self.store.clone(),
            Duration::from_secs(self.settings.dedupe_hours * 3600),
        ));

        let intake = Intake {
            store: self.store.clone(),
            scheduler: scheduler.clone(),
            publisher: Arc::clone(&self.publisher),
            progress,
            outbox_wake: Arc::clone(&outbox_wake),
            pending: Arc::new(Semaphore::new(self.settings.max_pending)),
            tracker: tracker.clone(),
            node: self.node.clone(),
            default_reply_queue: self.settings.reply_queue.clone(),
            dead_letter_queue: self.settings.dead_letter_queue(),
            max_body_bytes: self.settings.max_body_bytes,
            max_attempts: self.settings.max_attempts,
            stop: stop.clone(),
            abort: abort.clone(),
        };
        let consuming = consume_until_cancelled(
            &self.broker,
            &intake,
            &self.readiness,
            stop.clone(),
            Drain {
                tracker: &tracker,
                deadline: &abort,
            },
        );
        tokio::pin!(consuming);
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested; draining"),
            () = &mut consuming => {}
        }
        stop.cancel();
        // One deadline for the whole drain: `abort` is cancelled when it passes, and every wait
        // below ends by then. Only the final flush (FINAL_FLUSH) comes after it.
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout();
        let drain_deadline = {
            let abort = abort.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                abort.cancel();
            })
        };
        // The consumer stops taking deliveries but keeps its channel open until running reads
        // are answered and acknowledged (or the deadline passes).
        consuming.await;
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "operations still running at the drain deadline; they resume at the next start"
            );
        }
        abort.cancel();
        drain_deadline.abort();
        pruner.abort();
        if let Some(mut reconciling) = reconciling {
            if tokio::time::timeout_at(deadline, &mut reconciling)
                .await
                .is_err()
            {
                reconciling.abort();
            }
        }
        outbox_stop.cancel();
        let _ = outbox_task.await;
        outbox::flush(&self.store, &self.publisher, FINAL_FLUSH).await;
        self.publisher.close().await;
        http_stop.cancel();
        if let Some(serving) = serving {
            let _ = serving.await;
        }
        tracing::info!("worker stopped");
        Ok(())
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

/// What the consumer waits for once it stops taking deliveries: the work in flight (`tracker`),
/// until the drain deadline (`deadline`, cancelled when it passes).
struct Drain<'a> {
    tracker: &'a TaskTracker,
    deadline: &'a CancellationToken,
}

/// Consumes deliveries until `stop` is cancelled, re-subscribing (with backoff) whenever the
/// connection or the consumer is lost.
async fn consume_until_cancelled(
    broker: &Broker,
    intake: &Intake,
    readiness: &Readiness,
    stop: CancellationToken,
    drain: Drain<'_>,
) {
    let mut delays = backon::BackoffBuilder::build(reconnect_backoff());
    let mut subscribed_before = false;
    while !stop.is_cancelled() {
        let (connection, channel, mut consumer) = match broker.consume().await {
            Ok(parts) => parts,
            Err(e) => {
                readiness.not_consuming(e.to_string());
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?delay, "could not subscribe to the request queue");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        delays = backon::BackoffBuilder::build(reconnect_backoff());
        if subscribed_before {
            metrics::counter!(crate::metrics::BROKER_RECONNECTS).increment(1);
        }
        subscribed_before = true;
        readiness.consuming();
        tracing::info!(queue = %broker.request_queue, "consuming requests");
        loop {
            let next = tokio::select! {
                next = consumer.next() => next,
                _ = stop.cancelled() => break,
            };
            let end = match next {
                Some(Ok(delivery)) => {
                    let (batch, end) = with_ready_deliveries(&mut consumer, delivery).await;
                    intake.handle_batch(batch).await;
                    match end {
                        Some(end) => end,
                        None => continue,
                    }
                }
                Some(Err(e)) => StreamEnd::Failed(e),
                None => StreamEnd::Cancelled,
            };
            match end {
                StreamEnd::Failed(e) => {
                    tracing::warn!(error = %e, "the request consumer failed; re-subscribing");
                    readiness.not_consuming(format!("the request consumer failed: {e}"));
                    break;
                }
                StreamEnd::Cancelled => {
                    tracing::warn!("the broker cancelled the request consumer; re-subscribing");
                    readiness.not_consuming("the broker cancelled the request consumer");
                    break;
                }
            }
        }
        if stop.is_cancelled() {
            readiness.not_consuming("the worker is shutting down");
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            // Wait for the work in flight (lanes, and the acknowledgements, refusals and dead
            // letters that settle deliveries on this channel), but not past the drain deadline.
            // No delivery is taken any more, so the tracker can close.
            drain.tracker.close();
            tokio::select! {
                () = drain.tracker.wait() => {}
                () = drain.deadline.cancelled() => {}
            }
        }
        let _ = connection
            .close(200, "worker stopping or re-subscribing".into())
            .await;
    }
}

/// Why the request consumer's stream ended.
enum StreamEnd {
    Failed(lapin::Error),
    Cancelled,
}

/// The delivery in hand and those the broker has already sent behind it (at most the prefetch,
/// since none of them is acknowledged yet), so the intake can commit their writes together;
/// and how the stream ended, if it did meanwhile.
async fn with_ready_deliveries(
    consumer: &mut lapin::Consumer,
    first: lapin::message::Delivery,
) -> (Vec<lapin::message::Delivery>, Option<StreamEnd>) {
    let mut batch = vec![first];
    loop {
        match futures_lite::future::poll_once(consumer.next()).await {
            Some(Some(Ok(delivery))) => batch.push(delivery),
            Some(Some(Err(e))) => return (batch, Some(StreamEnd::Failed(e))),
            Some(None) => return (batch, Some(StreamEnd::Cancelled)),
            None => return (batch, None),
        }
    }
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
