//! The reconciler: compares the store with what apptainer really runs, at start-up and then
//! periodically. A container recorded as running whose instance is gone gets a reconcile job in
//! its lane (recorded as stopped, or restarted per the restore policy). Instances apptainer lists
//! that the store does not know are reported in the log and never touched: they may belong to
//! someone else on the host.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::runtime::Runtime;
use crate::scheduler::{Job, JobKind, Scheduler};
use crate::store::Store;

/// What one comparison found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    /// Recorded as running, but no instance: reconcile jobs were queued for these.
    pub dead: Vec<String>,
    /// Running, but not registered here.
    pub unknown: Vec<String>,
}

pub struct Reconciler {
    pub store: Store,
    pub runtime: Arc<dyn Runtime>,
    pub scheduler: Scheduler,
}

impl Reconciler {
    pub async fn reconcile_once(&self) -> anyhow::Result<Findings> {
        // Read the records first: an instance started after this read is listed, and one
        // recorded after it is not examined, so a fresh start is never taken for a dead one.
        let active = self.store.active_container_names().await?;
        let listed = self.runtime.instances().await?;
        let listed_names: HashSet<&str> = listed.iter().map(|i| i.name.as_str()).collect();
        let mut findings = Findings::default();
        for name in active {
            if !listed_names.contains(name.as_str()) {
                self.scheduler.submit(
                    &name,
                    Job {
                        kind: JobKind::Reconcile { name: name.clone() },
                        permit: None,
                        progress: None,
                        span: tracing::info_span!("reconcile", container = %name),
                    },
                );
                findings.dead.push(name);
            }
        }
        for instance in &listed {
            if !self.store.is_registered(&instance.name).await? {
                findings.unknown.push(instance.name.clone());
            }
        }
        metrics::counter!(crate::metrics::RECONCILER_FINDINGS, "kind" => "dead")
            .increment(findings.dead.len() as u64);
        metrics::counter!(crate::metrics::RECONCILER_FINDINGS, "kind" => "unknown")
            .increment(findings.unknown.len() as u64);
        if !findings.dead.is_empty() {
            tracing::warn!(containers = ?findings.dead, "instances of running containers are gone");
        }
        if !findings.unknown.is_empty() {
            tracing::info!(instances = ?findings.unknown, "apptainer runs instances this worker does not know; leaving them alone");
        }
        Ok(findings)
    }

    /// Compares every `period` until `stop` is cancelled.
    pub async fn run(self, period: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(error = %e, "could not compare the records with apptainer's instances");
            }
        }
    }
}
