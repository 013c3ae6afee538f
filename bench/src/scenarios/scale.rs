//! The registry-size scenario: one worker over many seeded containers.

use serde_json::json;

use super::{check, getcont, plain, ratio, started_worker, Env};
use crate::load::{self, Bounds, Step};
use crate::procs::{self, WorkerSpec};
use crate::report::{Figure, ScenarioReport, Target};

/// (5) Scale: a worker over 1,000 to 100,000 registered containers.
pub async fn scale(env: &Env) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new("scale");
    let mut baseline: Option<(f64, f64, f64)> = None;
    let largest = env.sizes.scale_counts.iter().copied().max().unwrap_or(0);
    for &count in &env.sizes.scale_counts {
        let label = format!("scale-{count}");
        let dir = env.work_dir.join(&label);
        let seeded = procs::seed(&dir, count)?;
        let spec = WorkerSpec {
            seeded: count,
            ..plain(4)
        };
        let (worker, client, startup) = started_worker(env, &label, spec).await?;
        // Names spread over the whole table (7919 is prime, so every name can come up).
        let script =
            move |_, ticket: usize| vec![getcont(&procs::seeded_name(ticket * 7919 % count))];
        let one = |tickets| Bounds {
            in_flight: 1,
            tickets,
            time_limit: env.sizes.measure_limit,
        };
        load::run(&client, one(env.sizes.warmup.min(50)), script).await;
        let gets = load::run(&client, one(env.sizes.scale_getcont), script).await;
        check(&mut report, &format!("getcont at {count}"), &gets);
        let pages = load::run(&client, one(env.sizes.scale_pages), |_, _| {
            vec![Step {
                body: json!({"op": "getallcont", "page": 1, "page_size": 50})
                    .to_string()
                    .into_bytes(),
                expect: 200,
            }]
        })
        .await;
        check(&mut report, &format!("getallcont at {count}"), &pages);
        let rss = worker.rss_mib()?;
        let case = format!("{count} containers");
        let p50 = gets.quantile_ms(0.5);
        let page_p50 = pages.quantile_ms(0.5);
        let startup_ms = startup.as_secs_f64() * 1000.0;
        let (base_p50, base_page_p50, base_startup) =
            *baseline.get_or_insert((p50, page_p50, startup_ms));
        let mut p50_ratio = Figure::new(&case, "getcont p50 / smallest", ratio(p50, base_p50));
        let mut rss_figure = Figure::new(&case, "worker RSS MiB", rss);
        if count == largest && count >= 100_000 {
            p50_ratio = p50_ratio.target(Target::AtMost(1.5));
            rss_figure = rss_figure.target(Target::Below(200.0));
        }
        report.push(Figure::new(&case, "getcont p50 ms", p50));
        report.push(p50_ratio);
        report.push(Figure::new(&case, "getallcont page p50 ms", page_p50));
        report.push(Figure::new(
            &case,
            "getallcont page p50 / smallest",
            ratio(page_p50, base_page_p50),
        ));
        report.push(rss_figure);
        report.push(Figure::new(&case, "start-up to consuming ms", startup_ms));
        report.push(Figure::new(
            &case,
            "start-up / smallest",
            ratio(startup_ms, base_startup),
        ));
        report.push(Figure::new(&case, "seeding s", seeded.as_secs_f64()));
        drop(client);
        worker.stop().await?;
    }
    Ok(report)
}
