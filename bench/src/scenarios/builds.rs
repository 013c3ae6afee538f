//! The build-bound scenarios: parallel starts against `--concurrency`, and other containers'
//! reads while one `start` builds (head-of-line blocking).

use std::time::{Duration, Instant};

use anyhow::Context;
use orchestrator_producer::Publish;
use serde_json::json;

use super::{check, getcont, plain, ratio, started_worker, Env, FakeCalls, SEEDED_FOR_LOAD};
use crate::load::{self, Bounds, Step};
use crate::procs::{self, WorkerSpec};
use crate::report::{Figure, ScenarioReport, Target};

/// (3) Parallel starts with a fixed build time, at several `--concurrency` settings.
pub async fn parallel(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("parallel");
    let starts = env.sizes.parallel_starts;
    let build = Duration::from_millis(env.sizes.parallel_build_ms);
    for &concurrency in &env.sizes.parallel_concurrency {
        let label = format!("parallel-{concurrency}");
        let dir = env.work_dir.join(&label);
        let delay = format!("build={}", build.as_millis());
        let spec = WorkerSpec {
            concurrency,
            env: vec![("FAKE_APPTAINER_DELAY_MS".into(), delay)],
            args: vec![],
            seeded: 0,
        };
        let (worker, client, _) = started_worker(env, &label, spec).await?;
        let ideal = build * starts as u32 / concurrency;
        let bounds = Bounds {
            in_flight: starts,
            tickets: starts,
            time_limit: ideal * 4 + Duration::from_secs(60),
        };
        let sample = load::run(&client, bounds, |_, ticket| {
            let body = json!({
                "op": "start",
                "container_name": format!("par-{ticket}"),
                "container_image": "jupyter/base-notebook",
                "image_distributor": "docker",
                "image_os": "jupyter/base-notebook",
                "image_version": "latest",
                "container_command": ["jupyter lab --no-browser"]
            });
            vec![Step {
                body: body.to_string().into_bytes(),
                expect: 201,
            }]
        })
        .await;
        check(&mut report, &format!("concurrency {concurrency}"), &sample);
        if sample.requests < starts {
            report.failures.push(format!(
                "concurrency {concurrency}: only {} of {starts} starts ran within {:?}",
                sample.requests, bounds.time_limit
            ));
        }
        let calls = FakeCalls::read(&dir);
        let case = format!("concurrency {concurrency}");
        report.push(
            Figure::new(
                &case,
                "wall/ideal (builds only)",
                ratio(sample.wall.as_secs_f64(), ideal.as_secs_f64()),
            )
            .target(Target::AtMost(1.2)),
        );
        // Against the time the builds really took: how well the build slots were kept busy.
        report.push(Figure::new(
            &case,
            "wall/(build time/concurrency)",
            ratio(
                sample.wall.as_secs_f64(),
                calls.time("build").as_secs_f64() / f64::from(concurrency),
            ),
        ));
        report.push(Figure::new(&case, "wall s", sample.wall.as_secs_f64()));
        report.push(Figure::new(&case, "ideal s", ideal.as_secs_f64()));
        let per_start = |count: usize| count as f64 / starts as f64;
        report.push(Figure::new(
            &case,
            "apptainer calls per start",
            per_start(calls.total_count()),
        ));
        report.push(Figure::new(
            &case,
            "instance list per start",
            per_start(calls.count("instance list")),
        ));
        drop(client);
        worker.stop().await?;
    }
    Ok(report)
}

/// (4) Head-of-line blocking: other containers' `getcont` while one `start` builds.
pub async fn head_of_line(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("head-of-line");
    let label = "hol";
    let dir = env.work_dir.join(label);
    procs::seed(&dir, SEEDED_FOR_LOAD)?;
    let spec = WorkerSpec {
        seeded: SEEDED_FOR_LOAD,
        ..plain(4)
    };
    let (worker, client, _) = started_worker(env, label, spec).await?;
    let in_flight = 16;
    let bounds = Bounds {
        in_flight,
        tickets: env.sizes.hol_requests,
        time_limit: env.sizes.measure_limit,
    };
    let script = |task: usize, _| vec![getcont(&procs::seeded_name(task))];
    load::run(
        &client,
        Bounds {
            tickets: env.sizes.warmup.max(in_flight),
            ..bounds
        },
        script,
    )
    .await;
    let idle = load::run(&client, bounds, script).await;
    check(&mut report, "idle", &idle);

    // A build long enough to outlast the measurement under load.
    let build = (idle.wall * 3 + Duration::from_secs(2)).max(Duration::from_secs(5));
    worker.control_fake(&[&format!("DELAY_MS=build={}", build.as_millis())])?;
    let start = json!({
        "op": "start", "container_name": "hol-build",
        "container_image": "jupyter/base-notebook", "image_distributor": "docker",
        "image_os": "jupyter/base-notebook", "image_version": "latest"
    });
    let pending = client
        .send(start.to_string().as_bytes(), Publish::default())
        .await
        .context("could not publish the long start")?;
    let began = Instant::now();
    while !worker.build_began() {
        if began.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the long build did not begin within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = load::run(&client, bounds, script).await;
    check(&mut report, "during the build", &busy);
    let overlapped = began.elapsed() < build;
    if !overlapped {
        report
            .failures
            .push("the build ended before the measurement under it did".into());
    }
    match pending.wait(build + Duration::from_secs(60)).await {
        Ok(reply) if reply.status == 201 => {}
        Ok(reply) => report.failures.push(format!(
            "the long start answered {}: {:?}",
            reply.status, reply.error
        )),
        Err(e) => report
            .failures
            .push(format!("the long start got no reply: {e}")),
    }
    let case = format!("{in_flight} in flight");
    report.push(
        Figure::new(
            &case,
            "p99 during build/idle",
            ratio(busy.quantile_ms(0.99), idle.quantile_ms(0.99)),
        )
        .target(Target::AtMost(1.5)),
    );
    report.push(Figure::new(
        &case,
        "p50 during build/idle",
        ratio(busy.quantile_ms(0.5), idle.quantile_ms(0.5)),
    ));
    report.push(Figure::new(&case, "idle p99 ms", idle.quantile_ms(0.99)));
    report.push(Figure::new(
        &case,
        "during build p99 ms",
        busy.quantile_ms(0.99),
    ));
    report.push(Figure::new(&case, "build s", build.as_secs_f64()));
    drop(client);
    worker.stop().await?;
    Ok(report)
}
