//! The five scenarios of issue 6 and the fleet's of issue 13. Each one is bounded in request
//! count and in time, talks only to the broker given on the command line, and returns its
//! figures; sizes come from [`Sizes`] (full or smoke). This module holds what they share (sizes, the worker-beside-echo pair,
//! the figures of a comparison) and the two request-load scenarios; the build-bound ones are
//! in `builds`, the registry-size one in `scale`, the several-hosts one in `fleet`.

mod builds;
mod fleet;
mod scale;

pub use builds::{head_of_line, parallel};
pub use fleet::fleet;
pub use scale::scale;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_producer::Client;
use orchestrator_worker::settings::QueueType;
use serde_json::json;

use crate::echo::{Echo, EchoKind};
use crate::load::{self, Bounds, Sample, Step};
use crate::procs::{self, Binaries, WorkerProcess, WorkerSpec};
use crate::report::{names, Figure, Goal, ScenarioReport, Target};

/// How big each scenario is.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// (requests in flight, getcont requests per measurement)
    pub overhead: Vec<(usize, usize)>,
    /// (requests in flight, createvolume/deletevolume pairs per measurement)
    pub writes: Vec<(usize, usize)>,
    /// Alternating rounds of echo and worker per measurement.
    pub rounds: usize,
    pub warmup: usize,
    pub measure_limit: Duration,
    pub parallel_starts: usize,
    pub parallel_build_ms: u64,
    pub parallel_concurrency: Vec<u32>,
    pub hol_requests: usize,
    pub scale_counts: Vec<usize>,
    pub scale_getcont: usize,
    pub scale_pages: usize,
    /// The fleet's host queues: each type is measured, side by side.
    pub fleet_queue_types: Vec<QueueType>,
    /// Containers started through the exchange, on the fleet and on the fleet of one.
    pub fleet_containers: usize,
    /// (requests in flight, getcont requests per measurement) through the fleet.
    pub fleet: Vec<(usize, usize)>,
    /// Names bound on the exchange (containers in one host's store) for the routing cost.
    pub fleet_routing: Vec<usize>,
    /// getcont requests at 1 in flight per round of the routing cost.
    pub fleet_routing_getcont: usize,
    /// getcont requests at 16 in flight per round of the routing cost.
    pub fleet_routing_loaded: usize,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            overhead: vec![(1, 600), (16, 3000), (128, 5000)],
            writes: vec![(16, 600), (128, 1200)],
            rounds: 2,
            warmup: 200,
            measure_limit: Duration::from_secs(8),
            parallel_starts: 200,
            parallel_build_ms: 200,
            parallel_concurrency: vec![1, 2, 4, 8],
            hol_requests: 3000,
            scale_counts: vec![1_000, 10_000, 100_000],
            scale_getcont: 1000,
            scale_pages: 20,
            fleet_queue_types: vec![QueueType::Quorum, QueueType::Classic],
            fleet_containers: 128,
            fleet: vec![(16, 3000), (128, 5000)],
            fleet_routing: vec![1_000, 100_000],
            fleet_routing_getcont: 1000,
            fleet_routing_loaded: 3000,
        }
    }

    pub fn smoke() -> Self {
        Self {
            overhead: vec![(1, 20), (16, 64), (128, 128)],
            writes: vec![(16, 16), (128, 128)],
            rounds: 1,
            warmup: 5,
            measure_limit: Duration::from_secs(10),
            parallel_starts: 6,
            parallel_build_ms: 50,
            parallel_concurrency: vec![1, 2],
            hol_requests: 100,
            scale_counts: vec![100, 1_000],
            scale_getcont: 30,
            scale_pages: 3,
            fleet_queue_types: vec![QueueType::Quorum, QueueType::Classic],
            fleet_containers: 6,
            fleet: vec![(2, 20), (6, 60)],
            fleet_routing: vec![10, 100],
            fleet_routing_getcont: 20,
            fleet_routing_loaded: 40,
        }
    }
}

/// What every scenario needs.
pub struct Env {
    pub amqp_url: String,
    pub bins: Binaries,
    pub work_dir: std::path::PathBuf,
    pub sizes: Sizes,
}

/// Containers seeded for the overhead, writes and head-of-line scenarios: one per task at the
/// highest in-flight count, so concurrent requests never queue behind each other in one lane.
const SEEDED_FOR_LOAD: usize = 128;
/// `--concurrency` of the workers under request load: the worker's default.
const LOAD_CONCURRENCY: u32 = 4;
/// The bind used by the writes scenario, inside the container.
const BIND_TARGET: &str = "/mnt/data";

fn getcont(name: &str) -> Step {
    Step {
        body: json!({"op": "getcont", "container_name": name})
            .to_string()
            .into_bytes(),
        expect: 200,
    }
}

fn volume_pair(name: &str, host: &str) -> Vec<Step> {
    let body = |op: &str| {
        json!({"op": op, "container_name": name, "host_location": host,
               "container_location": BIND_TARGET})
        .to_string()
        .into_bytes()
    };
    vec![
        Step {
            body: body("createvolume"),
            expect: 200,
        },
        Step {
            body: body("deletevolume"),
            expect: 200,
        },
    ]
}

fn check(report: &mut ScenarioReport, what: &str, sample: &Sample) {
    if sample.failures > 0 {
        report.failures.push(format!(
            "{what}: {} of {} requests failed: {:?}",
            sample.failures, sample.requests, sample.failure_reasons
        ));
    }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        f64::NAN
    }
}

/// One measurement of the worker and both baselines under the same load.
#[derive(Debug, Default)]
struct Trio {
    bare: Sample,
    reliable: Sample,
    worker: Sample,
}

/// Runs `bounds` against the bare echo, the reliable echo and the worker in alternating rounds
/// (in that order), so that all three see the same machine load.
async fn side_by_side<S>(clients: &Clients, bounds: Bounds, rounds: usize, script: S) -> Trio
where
    S: Fn(usize, usize) -> Vec<Step> + Clone + Send + Sync + 'static,
{
    let mut trio = Trio::default();
    for _ in 0..rounds {
        trio.bare
            .merge(load::run(&clients.bare, bounds, script.clone()).await);
        trio.reliable
            .merge(load::run(&clients.reliable, bounds, script.clone()).await);
        trio.worker
            .merge(load::run(&clients.worker, bounds, script.clone()).await);
    }
    trio
}

/// Starts a worker in `work_dir/label` and waits until it consumes; returns it, a client on
/// its queue, and how long it took from spawning to consuming.
async fn started_worker(
    env: &Env,
    label: &str,
    spec: WorkerSpec,
) -> anyhow::Result<(WorkerProcess, Arc<Client>, Duration)> {
    let spawned = Instant::now();
    let mut worker = WorkerProcess::spawn(
        &env.bins,
        &env.amqp_url,
        &env.work_dir.join(label),
        label,
        &spec,
    )?;
    let startup = worker.wait_until_consuming(spawned).await?;
    let client = Arc::new(Client::connect(&env.amqp_url, &worker.exchange).await?);
    Ok((worker, client, startup))
}

fn plain(concurrency: u32) -> WorkerSpec {
    WorkerSpec {
        concurrency,
        env: vec![],
        args: vec![],
        seeded: 0,
    }
}

/// Clients on the worker's request queue and on each echo's.
struct Clients {
    worker: Arc<Client>,
    bare: Arc<Client>,
    reliable: Arc<Client>,
}

/// One worker with [`SEEDED_FOR_LOAD`] stopped containers, and both echo responders beside it.
struct Pair {
    worker: WorkerProcess,
    echoes: Vec<Echo>,
    clients: Clients,
    host_dir: String,
}

async fn pair(env: &Env, label: &str) -> anyhow::Result<Pair> {
    let dir = env.work_dir.join(label);
    procs::seed(&dir, SEEDED_FOR_LOAD)?;
    let spec = WorkerSpec {
        seeded: SEEDED_FOR_LOAD,
        ..plain(LOAD_CONCURRENCY)
    };
    let (worker, worker_client, _) = started_worker(env, label, spec).await?;
    let mut echoes = Vec::new();
    let mut echo_clients = Vec::new();
    for kind in [EchoKind::Bare, EchoKind::Reliable] {
        let queue = format!(
            "bench.{label}.{}.{}-echo",
            uuid::Uuid::new_v4().simple(),
            kind.label()
        );
        // The worker's default prefetch, so every consumer has as many deliveries in hand.
        // A classic queue, as before the fleet: the fleet scenario compares queue types.
        echoes.push(Echo::start(&env.amqp_url, &queue, 64, kind, QueueType::Classic).await?);
        echo_clients.push(Arc::new(Client::connect(&env.amqp_url, &queue).await?));
    }
    let reliable = echo_clients.pop().expect("two echoes");
    let bare = echo_clients.pop().expect("two echoes");
    let host = dir.join("data/volumes/bench");
    std::fs::create_dir_all(&host)?;
    Ok(Pair {
        clients: Clients {
            worker: worker_client,
            bare,
            reliable,
        },
        worker,
        echoes,
        host_dir: host.display().to_string(),
    })
}

impl Pair {
    async fn stop(self, amqp_url: &str) -> anyhow::Result<()> {
        for echo in self.echoes {
            let (exchange, queue) = (echo.exchange.clone(), echo.queue.clone());
            echo.stop().await;
            procs::delete_queues(amqp_url, &[&queue]).await;
            if let Ok(topology) = schemas::Topology::new(&exchange) {
                procs::delete_exchanges(amqp_url, &topology).await;
            }
        }
        self.worker.stop().await
    }

    /// Warms all three up, then measures `tickets` of `script` at `in_flight` on each, side by
    /// side; failed requests go into `report`. Also returns how many apptainer calls the worker
    /// made during the measured rounds.
    async fn measure<S>(
        &self,
        env: &Env,
        report: &mut ScenarioReport,
        in_flight: usize,
        tickets: usize,
        script: S,
    ) -> (Trio, usize)
    where
        S: Fn(usize, usize) -> Vec<Step> + Clone + Send + Sync + 'static,
    {
        let bounds = Bounds {
            in_flight,
            tickets: env.sizes.warmup.max(in_flight),
            time_limit: env.sizes.measure_limit,
        };
        side_by_side(&self.clients, bounds, 1, script.clone()).await;
        let bounds = Bounds { tickets, ..bounds };
        let before = FakeCalls::read(&self.worker.dir).total_count();
        let trio = side_by_side(&self.clients, bounds, env.sizes.rounds, script).await;
        let apptainer = FakeCalls::read(&self.worker.dir).total_count() - before;
        check(report, &format!("bare echo at {in_flight}"), &trio.bare);
        check(
            report,
            &format!("reliable echo at {in_flight}"),
            &trio.reliable,
        );
        check(report, &format!("worker at {in_flight}"), &trio.worker);
        (trio, apptainer)
    }
}

/// Targets on a comparison's ratios, each against one baseline.
#[derive(Default)]
struct Goals {
    throughput_bare: Vec<Goal>,
    throughput_reliable: Vec<Goal>,
    p99_bare: Vec<Goal>,
    p99_reliable: Vec<Goal>,
}

/// The figures of a worker-against-both-echoes measurement: throughputs, p50s and p99s of all
/// three, and the worker's ratios against each baseline, with their targets.
fn compare(report: &mut ScenarioReport, case: &str, trio: &Trio, goals: Goals) {
    let Trio {
        bare,
        reliable,
        worker,
    } = trio;
    let with = |mut f: Figure, goals: Vec<Goal>| {
        f.goals = goals;
        f
    };
    let q = |s: &Sample, p: f64| s.quantile_ms(p);
    report.push(with(
        Figure::new(
            case,
            names::THROUGHPUT_BARE,
            ratio(worker.throughput(), bare.throughput()),
        ),
        goals.throughput_bare,
    ));
    report.push(with(
        Figure::new(
            case,
            names::THROUGHPUT_RELIABLE,
            ratio(worker.throughput(), reliable.throughput()),
        ),
        goals.throughput_reliable,
    ));
    report.push(Figure::new(
        case,
        names::P50_BARE,
        ratio(q(worker, 0.5), q(bare, 0.5)),
    ));
    report.push(Figure::new(
        case,
        names::P50_RELIABLE,
        ratio(q(worker, 0.5), q(reliable, 0.5)),
    ));
    report.push(with(
        Figure::new(case, names::P99_BARE, ratio(q(worker, 0.99), q(bare, 0.99))),
        goals.p99_bare,
    ));
    report.push(with(
        Figure::new(
            case,
            names::P99_RELIABLE,
            ratio(q(worker, 0.99), q(reliable, 0.99)),
        ),
        goals.p99_reliable,
    ));
    report.push(Figure::new(case, names::WORKER_RPS, worker.throughput()));
    report.push(Figure::new(case, names::BARE_RPS, bare.throughput()));
    report.push(Figure::new(
        case,
        names::RELIABLE_RPS,
        reliable.throughput(),
    ));
    report.push(Figure::new(case, names::WORKER_P50, q(worker, 0.5)));
    report.push(Figure::new(case, names::BARE_P50, q(bare, 0.5)));
    report.push(Figure::new(case, names::RELIABLE_P50, q(reliable, 0.5)));
    report.push(Figure::new(case, names::WORKER_P99, q(worker, 0.99)));
    report.push(Figure::new(case, names::BARE_P99, q(bare, 0.99)));
    report.push(Figure::new(case, names::RELIABLE_P99, q(reliable, 0.99)));
}

fn goal(issue: u32, target: Target) -> Goal {
    Goal { issue, target }
}

/// (1) `getcont` round trip against the echo responder at several in-flight counts; each task
/// asks for its own container.
pub async fn overhead(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("overhead");
    let p = pair(env, "overhead").await?;
    let script = |task: usize, _ticket: usize| vec![getcont(&procs::seeded_name(task))];
    for &(in_flight, requests) in &env.sizes.overhead {
        let (measured, _) = p
            .measure(env, &mut report, in_flight, requests, script)
            .await;
        let mut goals = Goals::default();
        if in_flight == 128 {
            // Issue 6's targets were set against the reliable echo.
            goals
                .throughput_reliable
                .push(goal(6, Target::AtLeast(0.7)));
            goals.p99_reliable.push(goal(6, Target::AtMost(2.0)));
        }
        if in_flight >= 16 {
            // Issue 14: reads at the speed of the floor of any RPC consumer.
            goals.throughput_bare.push(goal(14, Target::AtLeast(0.85)));
            goals.p99_bare.push(goal(14, Target::AtMost(1.5)));
        }
        compare(
            &mut report,
            &format!("{in_flight} in flight"),
            &measured,
            goals,
        );
    }
    p.stop(&env.amqp_url).await?;
    Ok(report)
}

/// (2) Durable writes: `createvolume`/`deletevolume` pairs, each task on its own container.
pub async fn writes(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("writes");
    let p = pair(env, "writes").await?;
    let host = p.host_dir.clone();
    let script = move |task: usize, _ticket: usize| volume_pair(&procs::seeded_name(task), &host);
    for &(in_flight, pairs) in &env.sizes.writes {
        let (measured, apptainer) = p
            .measure(env, &mut report, in_flight, pairs, script.clone())
            .await;
        let case = format!("{in_flight} in flight");
        // Counted so a change that puts an apptainer process back on this path shows: createvolume
        // looks inside the sandbox image on disk instead of running `apptainer exec`.
        let calls_per_request = apptainer as f64 / measured.worker.requests.max(1) as f64;
        let mut goals = Goals::default();
        if in_flight == 128 {
            // Against a responder that also makes its reply durable: issue 6, then issue 14.
            goals
                .throughput_reliable
                .push(goal(6, Target::AtLeast(0.3)));
            goals
                .throughput_reliable
                .push(goal(14, Target::AtLeast(0.6)));
        }
        compare(&mut report, &case, &measured, goals);
        report.push(Figure::new(
            &case,
            "apptainer calls per request",
            calls_per_request,
        ));
    }
    p.stop(&env.amqp_url).await?;
    Ok(report)
}

/// fake-apptainer's finished calls, from its log: by subcommand (`build`, `instance list`, ...),
/// how many and their summed duration.
#[derive(Default)]
struct FakeCalls(std::collections::BTreeMap<String, (usize, Duration)>);

impl FakeCalls {
    fn read(dir: &Path) -> Self {
        let log = std::fs::read_to_string(dir.join("fake.log")).unwrap_or_default();
        let mut calls = Self::default();
        for line in log.lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(start), Some(end)) = (entry["start_ms"].as_i64(), entry["end_ms"].as_i64())
            else {
                continue;
            };
            let argv: Vec<&str> = entry["argv"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let sub = match argv.first() {
                Some(&"instance") => format!("instance {}", argv.get(1).unwrap_or(&"")),
                Some(other) => (*other).to_owned(),
                None => String::new(),
            };
            let (count, time) = calls.0.entry(sub).or_default();
            *count += 1;
            *time += Duration::from_millis((end - start).max(0) as u64);
        }
        calls
    }

    fn count(&self, sub: &str) -> usize {
        self.0.get(sub).map_or(0, |(count, _)| *count)
    }

    fn time(&self, sub: &str) -> Duration {
        self.0.get(sub).map_or(Duration::ZERO, |(_, time)| *time)
    }

    fn total_count(&self) -> usize {
        self.0.values().map(|(count, _)| count).sum()
    }
}
