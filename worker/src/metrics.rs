//! What the worker counts, for `/metrics` (Prometheus text format, served by [`crate::http`]).
//!
//! Counters and histograms are recorded where things happen (intake, scheduler, runtime, consume
//! loop, reconciler) through the `metrics` facade; gauges of depths are read at scrape time. The
//! names are listed here, in one place, and in the README.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests taken from the queue, by `op` (`unknown` when the body names none).
pub const REQUESTS_RECEIVED: &str = "orchestrator_requests_received_total";
/// Replies sent, by `op` and `status`.
pub const REPLIES: &str = "orchestrator_replies_total";
/// Seconds from acceptance to reply, by `op`.
pub const OPERATION_DURATION: &str = "orchestrator_operation_duration_seconds";
/// apptainer processes started, by `subcommand`.
pub const APPTAINER_INVOCATIONS: &str = "orchestrator_apptainer_invocations_total";
/// apptainer calls that failed (could not start, timed out, or exited with an error the worker
/// treats as a failure), by `subcommand`.
pub const APPTAINER_FAILURES: &str = "orchestrator_apptainer_failures_total";
/// Requests accepted but not finished.
pub const INBOX_DEPTH: &str = "orchestrator_inbox_depth";
/// Replies committed but not yet confirmed by the broker.
pub const OUTBOX_DEPTH: &str = "orchestrator_outbox_depth";
/// Lanes (containers) with queued or running work.
pub const LANES: &str = "orchestrator_lanes";
/// Jobs in the longest lane.
pub const LONGEST_LANE: &str = "orchestrator_longest_lane";
/// Replies the broker kept refusing (a full reply queue that rejects publishes), given up after
/// `--reply-attempts` and kept in the state database for `--dedupe-hours`.
pub const REPLIES_SET_ASIDE: &str = "orchestrator_replies_set_aside_total";
/// Deliveries the broker marked as redelivered.
pub const REDELIVERIES: &str = "orchestrator_redeliveries_total";
/// Duplicate requests answered without running them again.
pub const DUPLICATES_SUPPRESSED: &str = "orchestrator_duplicates_suppressed_total";
/// Times the request consumer subscribed again after losing its connection or consumer.
pub const BROKER_RECONNECTS: &str = "orchestrator_broker_reconnects_total";
/// What the reconciler found, by `kind`: `dead` (recorded running, instance gone) or `unknown`
/// (an instance the worker has no record of).
pub const RECONCILER_FINDINGS: &str = "orchestrator_reconciler_findings_total";

/// Containers this host holds (registered, running or not), labelled `node`: a fleet
/// dashboard sums it over hosts. Read at scrape time.
pub const FLEET_CONTAINERS_HELD: &str = "orchestrator_fleet_containers_held";
/// Containers running on this host, labelled `node`. Read at scrape time.
pub const FLEET_CONTAINERS_RUNNING: &str = "orchestrator_fleet_containers_running";
/// `--max-containers` of this host, labelled `node`; absent when unlimited.
pub const FLEET_CAPACITY: &str = "orchestrator_fleet_capacity";
/// Starts of names nobody owned that this host took and placed on itself, labelled `node`.
pub const FLEET_PLACEMENTS: &str = "orchestrator_fleet_placements_total";
/// Gathers (`orchestrator.gather`) this host answered, labelled `node`.
pub const FLEET_GATHERS_ANSWERED: &str = "orchestrator_fleet_gathers_answered_total";

/// Histogram buckets of operation durations, in seconds: reads take milliseconds, builds minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Installs the process-wide recorder once and returns its handle (later calls return the same
/// one). Before it is installed, recording is a no-op.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(OPERATION_DURATION.into()),
                DURATION_BUCKETS,
            )
            .expect("the duration buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in this process");
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_RECEIVED, "Requests taken from the queue, by op");
    describe_counter!(REPLIES, "Replies sent, by op and status");
    describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Time from acceptance to reply, by op"
    );
    describe_counter!(
        APPTAINER_INVOCATIONS,
        "apptainer processes started, by subcommand"
    );
    describe_counter!(
        APPTAINER_FAILURES,
        "apptainer calls that failed, by subcommand"
    );
    describe_gauge!(INBOX_DEPTH, "Requests accepted but not finished");
    describe_gauge!(
        OUTBOX_DEPTH,
        "Replies waiting to be confirmed by the broker"
    );
    describe_gauge!(LANES, "Containers with queued or running work");
    describe_gauge!(LONGEST_LANE, "Jobs in the longest lane");
    describe_counter!(
        REPLIES_SET_ASIDE,
        "Replies the broker kept refusing, set aside after --reply-attempts"
    );
    describe_counter!(
        REDELIVERIES,
        "Deliveries marked as redelivered by the broker"
    );
    describe_counter!(
        DUPLICATES_SUPPRESSED,
        "Duplicate requests answered without running them"
    );
    describe_counter!(
        BROKER_RECONNECTS,
        "Re-subscriptions of the request consumer"
    );
    describe_counter!(
        RECONCILER_FINDINGS,
        "Reconciler findings, by kind (dead, unknown)"
    );
    describe_fleet();
}

fn describe_fleet() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(FLEET_CONTAINERS_HELD, "Containers this host holds, by node");
    describe_gauge!(FLEET_CONTAINERS_RUNNING, "Containers running, by node");
    describe_gauge!(FLEET_CAPACITY, "--max-containers of this host, by node");
    describe_counter!(
        FLEET_PLACEMENTS,
        "Starts of unowned names placed on this host, by node"
    );
    describe_counter!(
        FLEET_GATHERS_ANSWERED,
        "Gathers this host answered, by node"
    );
}

/// This host's share of the fleet, at scrape time.
pub fn fleet_host(node: &str, capacity: Option<u32>, held: u64, running: u64) {
    let node = node.to_owned();
    metrics::gauge!(FLEET_CONTAINERS_HELD, "node" => node.clone()).set(held as f64);
    metrics::gauge!(FLEET_CONTAINERS_RUNNING, "node" => node.clone()).set(running as f64);
    if let Some(capacity) = capacity {
        metrics::gauge!(FLEET_CAPACITY, "node" => node).set(f64::from(capacity));
    }
}

/// This host took a start of a name nobody owned and placed it on itself.
pub fn placement_taken(node: &str) {
    metrics::counter!(FLEET_PLACEMENTS, "node" => node.to_owned()).increment(1);
}

/// This host answered a gather.
pub fn gather_answered(node: &str) {
    metrics::counter!(FLEET_GATHERS_ANSWERED, "node" => node.to_owned()).increment(1);
}

/// A request was taken from the queue.
pub fn request_received(op: Option<schemas::Op>) {
    let op = op.map_or_else(|| "unknown".to_owned(), |op| op.to_string());
    metrics::counter!(REQUESTS_RECEIVED, "op" => op).increment(1);
}

/// A reply was produced; `duration` is recorded only for requests that ran.
pub fn replied(op: Option<schemas::Op>, status: u16, duration: Option<std::time::Duration>) {
    let op = op.map_or_else(|| "unknown".to_owned(), |op| op.to_string());
    if let Some(duration) = duration {
        metrics::histogram!(OPERATION_DURATION, "op" => op.clone()).record(duration.as_secs_f64());
    }
    metrics::counter!(REPLIES, "op" => op, "status" => status.to_string()).increment(1);
}
