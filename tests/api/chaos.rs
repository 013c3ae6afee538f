//! A mixed stream of requests over many containers while the worker is killed with SIGKILL at
//! random moments and started again: every write still gets one final reply (its duplicates
//! are identical) and every read one at most (a read queued at a kill is not redelivered: the
//! client asks again), each write's status is what a model of the earlier server's rules
//! predicts, the records agree with the instances really running, and no instance was started
//! twice.
//!
//! Seeded: a failure prints its seed; `CHAOS_SEED=N` replays the same stream and kill times.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::helpers::{
    named, raw_client, spawn_worker_with, start_request, wait_until_owned, WorkerOptions,
};

const CONTAINERS: usize = 50;
const REQUESTS: usize = 1000;
const KILLS: usize = 3;
const PUBLISH_OVER: Duration = Duration::from_secs(8);
const ALL_ANSWERED_WITHIN: Duration = Duration::from_secs(180);

/// xorshift64*: enough randomness for a test, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The earlier server's rules for one container, to predict each write's status.
#[derive(Default, Clone)]
struct Model {
    registered: bool,
    active: bool,
    binds: BTreeSet<usize>,
    leftover: bool,
}

impl Model {
    /// Applies `op` and returns the status the worker must answer (None: a read, not checked).
    fn apply(&mut self, op: &str, bind: usize) -> Option<u16> {
        let status = match op {
            "start" if self.registered || self.leftover => 409,
            "start" => {
                *self = Model {
                    registered: true,
                    active: true,
                    ..Model::default()
                };
                201
            }
            "getcont" => return None,
            _ if op != "deletecontdata" && !self.registered => 404,
            "stop" if !self.active => 409,
            "stop" => {
                self.active = false;
                200
            }
            "restart" if self.active => 409,
            "restart" => {
                self.active = true;
                200
            }
            "createvolume" if self.binds.contains(&bind) => 409,
            "createvolume" => {
                self.binds.insert(bind);
                200
            }
            "deletevolume" if self.active => 422,
            "deletevolume" if !self.binds.remove(&bind) => 404,
            "deletevolume" => 200,
            "deletecont" if self.active => 422,
            "deletecont" => {
                *self = Model {
                    leftover: true,
                    ..Model::default()
                };
                204
            }
            "deletecontdata" if self.registered => 422,
            "deletecontdata" if !self.leftover => 404,
            "deletecontdata" => {
                self.leftover = false;
                204
            }
            other => panic!("unknown op {other}"),
        };
        Some(status)
    }
}

const OPS: &[(&str, usize)] = &[
    ("start", 16),
    ("stop", 14),
    ("restart", 14),
    ("getcont", 16),
    ("createvolume", 12),
    ("deletevolume", 10),
    ("deletecont", 10),
    ("deletecontdata", 8),
];

fn pick_op(rng: &mut Rng) -> &'static str {
    let total: usize = OPS.iter().map(|(_, w)| w).sum();
    let mut roll = rng.below(total);
    for (op, weight) in OPS {
        if roll < *weight {
            return op;
        }
        roll -= weight;
    }
    unreachable!()
}

#[tokio::test]
async fn killed_at_random_moments_the_worker_loses_nothing_and_runs_nothing_twice() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("chaos seed {seed}");
    let mut rng = Rng(seed);
    let mut worker = spawn_worker_with(WorkerOptions {
        args: vec![
            "--reconcile-interval-secs".into(),
            "0".into(),
            "--restore-policy".into(),
            "none".into(),
        ],
        env: vec![("FAKE_APPTAINER_DELAY_MS".into(), "build=30".into())],
        ..WorkerOptions::default()
    })
    .await;
    let hosts: Vec<String> = (0..3)
        .map(|i| worker.volume(&format!("shared{i}")))
        .collect();

    // The stream: (correlation id, body, expected status of a write).
    let mut models = vec![Model::default(); CONTAINERS];
    let mut stream = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let container = rng.below(CONTAINERS);
        let name = format!("chaos{container:02}");
        let op = pick_op(&mut rng);
        let bind = rng.below(hosts.len());
        let body = match op {
            "start" => start_request(&name),
            "createvolume" | "deletevolume" => json!({"op": op, "container_name": name,
                "host_location": hosts[bind], "container_location": "/mnt"}),
            _ => named(op, &name),
        };
        let expected = models[container].apply(op, bind);
        stream.push((format!("chaos-{seed}-{i}"), body, expected));
    }

    // Collect every reply that arrives, duplicates included.
    let raw = raw_client().await;
    let mut consumer = raw.replies.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
            if tx.send(reply).is_err() {
                return;
            }
        }
    });

    // Act: publish at a steady pace while killing and restarting the worker.
    let mut kill_at: Vec<Duration> = (0..KILLS)
        .map(|_| {
            Duration::from_millis(500 + rng.below(PUBLISH_OVER.as_millis() as usize - 500) as u64)
        })
        .collect();
    kill_at.sort();
    let began = Instant::now();
    let pause = PUBLISH_OVER / REQUESTS as u32;
    let mut recoveries = Vec::new();
    for (correlation, body, expected) in &stream {
        if kill_at.first().is_some_and(|at| began.elapsed() >= *at) {
            kill_at.remove(0);
            worker.kill();
            let restarting = Instant::now();
            worker.restart().await;
            recoveries.push(restarting.elapsed());
        }
        let properties =
            BasicProperties::default().with_correlation_id(correlation.as_str().into());
        raw.publish(&worker.exchange, body, properties).await;
        if body["op"] == "start" && *expected == Some(201) {
            // The fleet's client rule (DESIGN.md, "Fleet"): nothing more for a new name until
            // its start is placed, i.e. the name routes to a host.
            let name = body["container_name"].as_str().unwrap();
            wait_until_owned(&worker.exchange, name, Duration::from_secs(60)).await;
        }
        tokio::time::sleep(pause).await;
    }
    while !kill_at.is_empty() {
        kill_at.remove(0);
        worker.kill();
        let restarting = Instant::now();
        worker.restart().await;
        recoveries.push(restarting.elapsed());
    }

    // Wait until every write has a final reply, then a moment more for the reads behind the
    // last writes and for stray duplicates.
    let writes: BTreeSet<&str> = stream
        .iter()
        .filter(|(_, _, expected)| expected.is_some())
        .map(|(correlation, _, _)| correlation.as_str())
        .collect();
    let mut replies: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = Instant::now() + ALL_ANSWERED_WITHIN;
    while !writes.iter().all(|w| replies.contains_key(*w)) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, rx.recv()).await {
            Ok(Some(reply)) if reply["final"] == true => {
                replies
                    .entry(reply["correlation_id"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(reply);
            }
            Ok(Some(_)) => {}
            _ => panic!(
                "seed {seed}: only {} of {} writes were answered; worker log:\n{}",
                writes.iter().filter(|w| replies.contains_key(**w)).count(),
                writes.len(),
                worker.log()
            ),
        }
    }
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        if reply["final"] == true {
            replies
                .entry(reply["correlation_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(reply);
        }
    }

    // Assert: one final reply per request (a write's duplicates identical), the predicted status.
    let strip = |r: &Value| {
        let mut r = r.clone();
        r.as_object_mut().unwrap().remove("duration_ms");
        r
    };
    let (mut duplicates, mut mismatches, mut unanswered_reads) = (0, Vec::new(), 0);
    for (correlation, body, expected) in &stream {
        let Some(answers) = replies.get(correlation) else {
            unanswered_reads += 1;
            continue;
        };
        duplicates += answers.len() - 1;
        if expected.is_some() {
            assert!(
                answers.iter().all(|a| strip(a) == strip(&answers[0])),
                "seed {seed}: different replies to one write {body}: {answers:#?}"
            );
        }
        let status = answers[0]["status"].as_u64().unwrap() as u16;
        match expected {
            Some(expected) if status != *expected => mismatches.push(format!(
                "{body} -> {status}, expected {expected}: {}",
                answers[0]["error"]
            )),
            None if ![200, 404].contains(&status) => mismatches.push(format!("{body} -> {status}")),
            _ => {}
        }
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed}: {} statuses differ from the model:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    // The records agree with the instances really running.
    let page = worker
        .call(json!({"op": "getallcont", "page_size": 1000}))
        .await;
    let Some(schemas::ReplyResult::Page(page)) = page.result else {
        panic!("a page")
    };
    let recorded: BTreeSet<String> = page
        .containers
        .iter()
        .filter(|c| c.container_active)
        .map(|c| c.container_name.clone())
        .collect();
    let running: BTreeSet<String> = worker.running_instances().into_iter().collect();
    assert_eq!(
        recorded, running,
        "seed {seed}: records and instances disagree"
    );
    let modelled: BTreeSet<String> = (0..CONTAINERS)
        .filter(|c| models[*c].active)
        .map(|c| format!("chaos{c:02}"))
        .collect();
    assert_eq!(
        recorded, modelled,
        "seed {seed}: the final state is not the model's"
    );

    // No instance was started twice: per container, successful starts and stops alternate, and
    // apptainer never refused a start because the instance already existed.
    let mut lifecycle: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for call in worker.fake_calls() {
        let sub = call.subcommand();
        if sub == "instance start" && call.exit != 0 {
            panic!("seed {seed}: an instance start failed: {call:?}");
        }
        if (sub == "instance start" || sub == "instance stop") && call.exit == 0 {
            let name = call.argv.last().unwrap().clone();
            lifecycle.entry(name).or_default().push((call.end_ms, sub));
        }
    }
    for (name, mut events) in lifecycle {
        events.sort();
        for pair in events.windows(2) {
            assert_ne!(
                pair[0].1, pair[1].1,
                "seed {seed}: {name} had two {} in a row: {events:?}",
                pair[0].1
            );
        }
    }

    println!(
        "chaos summary: seed {seed}, {} requests over {CONTAINERS} containers, {} kills, {} answered, {unanswered_reads} reads unanswered (queued at a kill), {duplicates} duplicate replies, {} status mismatches, 0 state mismatches, recovery (restart to consuming) max {:?}",
        stream.len(),
        recoveries.len(),
        replies.len(),
        mismatches.len(),
        recoveries.iter().max().unwrap()
    );
}
