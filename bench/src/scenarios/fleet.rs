//! The fleet scenario (issue 13): several hosts on one exchange, each request routed to its
//! container's host by name. `getcont` through a fleet of three against a fleet of one holding
//! as many containers and against the bare echo, once per queue type; then the cost of routing
//! with many names bound on the exchange, bound the way a host binds them: from its store, at
//! start-up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use orchestrator_producer::{Client, Publish};
use orchestrator_worker::settings::QueueType;
use serde_json::json;

use super::{check, getcont, ratio, started_worker, Env, LOAD_CONCURRENCY};
use crate::echo::{Echo, EchoKind};
use crate::load::{self, Bounds, Sample, Step, REPLY_TIMEOUT};
use crate::procs::{self, WorkerProcess, WorkerSpec};
use crate::report::{names, Figure, ScenarioReport, Target};

/// How many hosts the fleet has.
const FLEET_HOSTS: usize = 3;
/// How many `start`s are in flight while the containers are placed (the fleet's client rule:
/// nothing more is sent for a name before its start's reply).
const STARTS_IN_FLIGHT: usize = 16;
/// Requests in flight for the routing cost's throughput figure, and the figure's name.
const ROUTING_IN_FLIGHT: usize = 16;
const ROUTING_RPS: &str = "getcont req/s at 16 in flight";
const ROUTING_P99: &str = "getcont p99 ms at 16 in flight";

/// (6) The fleet: name routing over three hosts, and routing with many names bound.
pub async fn fleet(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("fleet");
    for &queue_type in &env.sizes.fleet_queue_types {
        hosts_against_one(env, &mut report, queue_type).await?;
    }
    routing_cost(env, &mut report).await?;
    Ok(report)
}

/// A worker with `seeded` containers in its store, on host queues of `queue_type`.
fn spec(queue_type: QueueType, seeded: usize) -> WorkerSpec {
    WorkerSpec {
        concurrency: LOAD_CONCURRENCY,
        env: vec![],
        args: vec!["--queue-type".into(), queue_type.as_str().into()],
        seeded,
    }
}

/// The members of one fleet, and a client on its exchange.
struct Fleet {
    workers: Vec<WorkerProcess>,
    client: Arc<Client>,
}

impl Fleet {
    /// Starts `hosts` workers on one fresh exchange (each with its own node id, directory and
    /// fake state) and waits until every one consumes.
    async fn start(
        env: &Env,
        label: &str,
        hosts: usize,
        queue_type: QueueType,
    ) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let exchange = format!("bench.{label}.{id}");
        let spec = spec(queue_type, 0);
        let mut workers = Vec::with_capacity(hosts);
        for host in 0..hosts {
            let node = format!("bench-{}-{host}", &id[..12]);
            let dir = env.work_dir.join(format!("{label}-{host}"));
            workers.push(WorkerProcess::spawn_member(
                &env.bins,
                &env.amqp_url,
                &dir,
                &exchange,
                &node,
                &spec,
            )?);
        }
        let spawned = Instant::now();
        for worker in &mut workers {
            worker.wait_until_consuming(spawned).await?;
        }
        let client = Arc::new(Client::connect(&env.amqp_url, &exchange).await?);
        Ok(Self { workers, client })
    }

    async fn stop(self) -> anyhow::Result<()> {
        drop(self.client);
        procs::stop_all(self.workers).await
    }
}

/// The name of the `index`th container the fleet scenario starts.
fn fleet_name(index: usize) -> String {
    format!("fleet-{index}")
}

/// Starts `count` containers through the exchange, [`STARTS_IN_FLIGHT`] at a time, each one
/// placed by whichever host takes it; returns how many each node took and how long it took.
async fn start_containers(
    client: &Arc<Client>,
    count: usize,
) -> anyhow::Result<(BTreeMap<String, usize>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..STARTS_IN_FLIGHT.min(count) {
        let (client, next) = (Arc::clone(client), Arc::clone(&next));
        tasks.spawn(async move {
            let mut nodes = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return Ok::<_, anyhow::Error>(nodes);
                }
                let body = json!({
                    "op": "start",
                    "container_name": fleet_name(index),
                    "container_image": "jupyter/base-notebook",
                    "image_distributor": "docker",
                    "image_os": "jupyter/base-notebook",
                    "image_version": "latest",
                    "container_command": ["jupyter lab --no-browser"]
                });
                let reply = client
                    .call_raw(
                        body.to_string().as_bytes(),
                        Publish::default(),
                        REPLY_TIMEOUT,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "start {} through {} got no reply",
                            fleet_name(index),
                            client.topology().exchange()
                        )
                    })?;
                if reply.status != 201 {
                    bail!(
                        "start {} answered {}: {:?}",
                        fleet_name(index),
                        reply.status,
                        reply.error.map(|e| e.message)
                    );
                }
                nodes.push(reply.node);
            }
        });
    }
    let mut placed = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        for node in joined.context("a start task failed")?? {
            *placed.entry(node).or_insert(0) += 1;
        }
    }
    Ok((placed, began.elapsed()))
}

/// `getcont` of the fleet's containers, `in_flight` tasks at once, never two on one container:
/// task `t` asks for containers `t`, `t + in_flight`, `t + 2 × in_flight`, ... in turn, so every
/// container (and so every host) is asked.
fn spread_getcont(
    containers: usize,
    in_flight: usize,
) -> impl Fn(usize, usize) -> Vec<Step> + Clone + Send + Sync + 'static {
    let turns = (containers / in_flight).max(1);
    move |task, ticket| {
        let index = (task + in_flight * (ticket % turns)) % containers;
        vec![getcont(&fleet_name(index))]
    }
}

/// One queue type: a fleet of [`FLEET_HOSTS`] and a fleet of one, both with the same containers
/// started through their exchange, and the bare echo on a queue of that type, measured in
/// alternating rounds (bare, one host, fleet).
async fn hosts_against_one(
    env: &Env,
    report: &mut ScenarioReport,
    queue_type: QueueType,
) -> anyhow::Result<()> {
    let qt = queue_type.as_str();
    let containers = env.sizes.fleet_containers;
    let echo_exchange = format!(
        "bench.fleet-{qt}.{}.bare-echo",
        uuid::Uuid::new_v4().simple()
    );
    let echo = Echo::start(
        &env.amqp_url,
        &echo_exchange,
        64,
        EchoKind::Bare,
        queue_type,
    )
    .await?;
    let bare = Arc::new(Client::connect(&env.amqp_url, &echo_exchange).await?);
    let single = Fleet::start(env, &format!("fleet-{qt}-single"), 1, queue_type).await?;
    let fleet = Fleet::start(env, &format!("fleet-{qt}-hosts"), FLEET_HOSTS, queue_type).await?;

    let measured = async {
        let (_, single_took) = start_containers(&single.client, containers).await?;
        let (placed, fleet_took) = start_containers(&fleet.client, containers).await?;
        let case = format!("{qt}, placement");
        report.push(Figure::new(&case, "containers started", containers as f64));
        report.push(Figure::new(
            &case,
            "hosts holding containers",
            placed.len() as f64,
        ));
        report.push(Figure::new(
            &case,
            "containers on the busiest host",
            placed.values().copied().max().unwrap_or(0) as f64,
        ));
        report.push(Figure::new(
            &case,
            "containers on the least busy host",
            if placed.len() < FLEET_HOSTS {
                0.0
            } else {
                placed.values().copied().min().unwrap_or(0) as f64
            },
        ));
        let per_second = |took: Duration| containers as f64 / took.as_secs_f64();
        report.push(Figure::new(
            &case,
            "starts/s, fleet",
            per_second(fleet_took),
        ));
        report.push(Figure::new(
            &case,
            "starts/s, one host",
            per_second(single_took),
        ));

        for &(in_flight, tickets) in &env.sizes.fleet {
            let script = spread_getcont(containers, in_flight);
            let warmup = Bounds {
                in_flight,
                tickets: env.sizes.warmup.max(in_flight),
                time_limit: env.sizes.measure_limit,
            };
            for client in [&bare, &single.client, &fleet.client] {
                load::run(client, warmup, script.clone()).await;
            }
            let bounds = Bounds { tickets, ..warmup };
            let (mut b, mut s, mut f) = (Sample::default(), Sample::default(), Sample::default());
            for _ in 0..env.sizes.rounds {
                b.merge(load::run(&bare, bounds, script.clone()).await);
                s.merge(load::run(&single.client, bounds, script.clone()).await);
                f.merge(load::run(&fleet.client, bounds, script.clone()).await);
            }
            let case = format!("{qt}, {in_flight} in flight");
            check(report, &format!("bare echo, {case}"), &b);
            check(report, &format!("one host, {case}"), &s);
            check(report, &format!("fleet, {case}"), &f);
            compare_fleet(report, &case, &b, &s, &f);
        }
        anyhow::Ok(())
    }
    .await;

    drop(bare);
    let queue = echo.queue.clone();
    echo.stop().await;
    procs::delete_queues(&env.amqp_url, &[&queue]).await;
    if let Ok(topology) = schemas::Topology::new(&echo_exchange) {
        procs::delete_exchanges(&env.amqp_url, &topology).await;
    }
    let stopped = (single.stop().await, fleet.stop().await);
    measured?;
    stopped.0?;
    stopped.1
}

/// The figures of one fleet measurement: throughputs and p50/p99 of the fleet, the fleet of
/// one and the bare echo, and the ratios fleet/one host and each against the echo.
fn compare_fleet(
    report: &mut ScenarioReport,
    case: &str,
    bare: &Sample,
    single: &Sample,
    fleet: &Sample,
) {
    let q = |s: &Sample, p: f64| s.quantile_ms(p);
    let figures = [
        (
            names::THROUGHPUT_FLEET_SINGLE,
            ratio(fleet.throughput(), single.throughput()),
        ),
        (
            names::P50_FLEET_SINGLE,
            ratio(q(fleet, 0.5), q(single, 0.5)),
        ),
        (
            names::P99_FLEET_SINGLE,
            ratio(q(fleet, 0.99), q(single, 0.99)),
        ),
        (
            names::THROUGHPUT_FLEET_BARE,
            ratio(fleet.throughput(), bare.throughput()),
        ),
        (
            names::THROUGHPUT_SINGLE_BARE,
            ratio(single.throughput(), bare.throughput()),
        ),
        (names::P99_FLEET_BARE, ratio(q(fleet, 0.99), q(bare, 0.99))),
        (
            names::P99_SINGLE_BARE,
            ratio(q(single, 0.99), q(bare, 0.99)),
        ),
        (names::FLEET_RPS, fleet.throughput()),
        (names::SINGLE_RPS, single.throughput()),
        (names::BARE_RPS, bare.throughput()),
        (names::FLEET_P50, q(fleet, 0.5)),
        (names::SINGLE_P50, q(single, 0.5)),
        (names::BARE_P50, q(bare, 0.5)),
        (names::FLEET_P99, q(fleet, 0.99)),
        (names::SINGLE_P99, q(single, 0.99)),
        (names::BARE_P99, q(bare, 0.99)),
    ];
    for (name, value) in figures {
        report.push(Figure::new(case, name, value));
    }
}

/// One host over a store of `count` seeded containers: the names it bound at start-up, how
/// long that took, and its `getcont` samples.
struct Bound {
    count: usize,
    worker: WorkerProcess,
    client: Arc<Client>,
    startup: Duration,
    binding: Option<(usize, Duration)>,
    seeding: Duration,
    p50_runs: Sample,
    loaded_runs: Sample,
}

/// Routing cost: a host whose store holds 1,000 containers against one holding 100,000 (so
/// the exchange holds as many name bindings, made by the worker at start-up), `getcont` p50 at 1
/// in flight and throughput at [`ROUTING_IN_FLIGHT`], alternating between the two.
async fn routing_cost(env: &Env, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut hosts: Vec<Bound> = Vec::new();
    let started = async {
        for &count in &env.sizes.fleet_routing {
            let label = format!("fleet-routing-{count}");
            let seeding = procs::seed(&env.work_dir.join(&label), count)?;
            let (worker, client, startup) =
                started_worker(env, &label, spec(QueueType::Quorum, count)).await?;
            let binding = worker.startup_binding();
            hosts.push(Bound {
                count,
                worker,
                client,
                startup,
                binding,
                seeding,
                p50_runs: Sample::default(),
                loaded_runs: Sample::default(),
            });
        }
        anyhow::Ok(())
    }
    .await;
    if started.is_ok() {
        measure_routing(env, &mut hosts).await;
    }
    let largest = env.sizes.fleet_routing.iter().copied().max().unwrap_or(0);
    let baseline = hosts.first().map(|h| {
        (
            h.p50_runs.quantile_ms(0.5),
            h.loaded_runs.throughput(),
            h.startup,
        )
    });
    for host in &hosts {
        let Some((base_p50, base_rps, base_startup)) = baseline else {
            break;
        };
        let case = format!("{} names bound", host.count);
        check(
            report,
            &format!("getcont at 1 in flight, {case}"),
            &host.p50_runs,
        );
        check(
            report,
            &format!("getcont at {ROUTING_IN_FLIGHT} in flight, {case}"),
            &host.loaded_runs,
        );
        let p50 = host.p50_runs.quantile_ms(0.5);
        let mut p50_ratio = Figure::new(&case, "getcont p50 / smallest", ratio(p50, base_p50));
        if host.count == largest && largest >= 100_000 {
            p50_ratio = p50_ratio.goal(13, Target::AtMost(1.2));
        }
        report.push(Figure::new(&case, "getcont p50 ms", p50));
        report.push(p50_ratio);
        let rps = host.loaded_runs.throughput();
        report.push(Figure::new(&case, ROUTING_RPS, rps));
        report.push(Figure::new(
            &case,
            "throughput / smallest",
            ratio(rps, base_rps),
        ));
        report.push(Figure::new(
            &case,
            ROUTING_P99,
            host.loaded_runs.quantile_ms(0.99),
        ));
        let startup_ms = host.startup.as_secs_f64() * 1000.0;
        report.push(Figure::new(&case, "start-up to consuming ms", startup_ms));
        report.push(Figure::new(
            &case,
            "start-up / smallest",
            ratio(startup_ms, base_startup.as_secs_f64() * 1000.0),
        ));
        match host.binding {
            Some((names, took)) if names == host.count => {
                report.push(Figure::new(
                    &case,
                    "start-up binding s (worker log)",
                    took.as_secs_f64(),
                ));
                report.push(Figure::new(
                    &case,
                    "binding µs per name",
                    took.as_secs_f64() * 1e6 / names.max(1) as f64,
                ));
            }
            Some((names, _)) => report.failures.push(format!(
                "{case}: the worker bound {names} names at start-up, not {}",
                host.count
            )),
            None => report.failures.push(format!(
                "{case}: the worker's log has no line for its start-up binding"
            )),
        }
        report.push(Figure::new(&case, "seeding s", host.seeding.as_secs_f64()));
    }
    let workers = hosts.into_iter().map(|h| h.worker).collect();
    let stopped = procs::stop_all(workers).await;
    started?;
    stopped
}

/// Warms every host up, then measures them in alternating rounds: p50 at 1 in flight on names
/// spread over the whole store, and throughput at [`ROUTING_IN_FLIGHT`].
async fn measure_routing(env: &Env, hosts: &mut [Bound]) {
    let limit = env.sizes.measure_limit;
    for host in hosts.iter() {
        let count = host.count;
        let warm = Bounds {
            in_flight: 1,
            tickets: env.sizes.warmup.min(50),
            time_limit: limit,
        };
        load::run(&host.client, warm, spread_seeded(count, 1)).await;
    }
    for _ in 0..env.sizes.rounds {
        for host in hosts.iter_mut() {
            let count = host.count;
            let one = Bounds {
                in_flight: 1,
                tickets: env.sizes.fleet_routing_getcont,
                time_limit: limit,
            };
            let sample = load::run(&host.client, one, spread_seeded(count, 1)).await;
            host.p50_runs.merge(sample);
            let loaded = Bounds {
                in_flight: ROUTING_IN_FLIGHT,
                tickets: env.sizes.fleet_routing_loaded,
                time_limit: limit,
            };
            let sample = load::run(
                &host.client,
                loaded,
                spread_seeded(count, ROUTING_IN_FLIGHT),
            )
            .await;
            host.loaded_runs.merge(sample);
        }
    }
}

/// `getcont` of seeded containers spread over the whole store (7919 is prime, so every name
/// can come up), never two tasks on one container.
fn spread_seeded(
    count: usize,
    in_flight: usize,
) -> impl Fn(usize, usize) -> Vec<Step> + Clone + Send + Sync + 'static {
    let turns = (count / in_flight).max(1);
    move |task, ticket| {
        let index = (task + in_flight * (ticket * 7919 % turns)) % count;
        vec![getcont(&procs::seeded_name(index))]
    }
}
