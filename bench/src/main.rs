//! `orchestrator-bench`: how close the worker comes to the broker's own round trip, and how its
//! cost grows. Every figure is a ratio against a baseline measured side by side in the same run
//! (a bare echo responder on the same broker, the ideal wall time, the smallest store), or a
//! count, because the machines it runs on are shared and noisy.
//!
//! The modules: [`echo`] (the baseline responder), [`procs`] (the worker and fake-apptainer
//! processes, seeding the store), [`load`] (closed-loop load and statistics), [`scenarios`]
//! (the five scenarios of issue 6), [`report`] (the table and the JSON lines).

mod echo;
mod load;
mod procs;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};

/// Benchmarks the apptainer-orchestrator worker against a bare lapin echo responder on the same
/// RabbitMQ broker. It starts everything it needs: the echo responder (in this process), and
/// `orchestrator-worker` with `fake-apptainer` as child processes, both taken from the directory
/// of this executable (build them with `cargo build --release -p apptainer-orchestrator-worker
/// -p apptainer-orchestrator-tests --bins`). Prints a Markdown table of every figure and one
/// JSON line per scenario. Exits non-zero when a request or a process fails (never because a
/// target is missed).
#[derive(Debug, Parser)]
#[command(name = "orchestrator-bench", version, about, long_about)]
struct Args {
    /// AMQP URL of the broker; only its queues named `bench.*` are used (and deleted after).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = orchestrator_producer::DEFAULT_AMQP_URL,
        hide_env_values = true
    )]
    amqp_url: String,

    /// Run every scenario tiny (seconds in total): a check that the benchmark still works.
    #[arg(long)]
    smoke: bool,

    /// Scenarios to run, comma-separated (default: all, in this order).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,

    /// Directory for the workers' data directories (a fresh temporary directory inside it is
    /// used and removed). Default: the system's temporary directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,

    /// Only seed: write N stopped containers (`seeded-0`, ...) into the state database of a
    /// worker whose `--data-dir` is `<DIR>/data`, then exit. This is the bulk path the scale
    /// scenario uses; DIR is given with `--seed-dir`.
    #[arg(long, value_name = "N", requires = "seed_dir")]
    seed: Option<usize>,

    /// The directory `--seed` writes into (its `data/state.sqlite`).
    #[arg(long, value_name = "DIR")]
    seed_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Overhead,
    Writes,
    Parallel,
    HeadOfLine,
    Scale,
}

const ALL: [Scenario; 5] = [
    Scenario::Overhead,
    Scenario::Writes,
    Scenario::Parallel,
    Scenario::HeadOfLine,
    Scenario::Scale,
];

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenarios; `Ok(false)` when one of them failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    if let (Some(count), Some(dir)) = (args.seed, &args.seed_dir) {
        let took = procs::seed(dir, count)?;
        eprintln!(
            "seeded {count} containers into {} in {:.2}s",
            procs::state_db(dir).display(),
            took.as_secs_f64()
        );
        return Ok(true);
    }
    let bins = procs::binaries_next_to_bench()?;
    let mut temp = tempfile::Builder::new();
    temp.prefix("orchestrator-bench-");
    let work = match &args.work_dir {
        Some(dir) => temp.tempdir_in(dir)?,
        None => temp.tempdir()?,
    };
    let env = scenarios::Env {
        amqp_url: args.amqp_url.clone(),
        bins,
        work_dir: work.path().to_owned(),
        sizes: if args.smoke {
            scenarios::Sizes::smoke()
        } else {
            scenarios::Sizes::full()
        },
    };
    let chosen = if args.scenario.is_empty() {
        ALL.to_vec()
    } else {
        args.scenario.clone()
    };
    let started = Instant::now();
    let mut reports = Vec::new();
    for scenario in chosen {
        eprintln!(
            "[{:>6.1}s] running {scenario:?}",
            started.elapsed().as_secs_f64()
        );
        let result = match scenario {
            Scenario::Overhead => scenarios::overhead(&env).await,
            Scenario::Writes => scenarios::writes(&env).await,
            Scenario::Parallel => scenarios::parallel(&env).await,
            Scenario::HeadOfLine => scenarios::head_of_line(&env).await,
            Scenario::Scale => scenarios::scale(&env).await,
        };
        let mut report = result.unwrap_or_else(|e| {
            let mut failed = report::ScenarioReport::new(name_of(scenario));
            failed.failures.push(format!("{e:#}"));
            failed
        });
        if args.smoke {
            // Tiny runs say nothing about the targets; only failures count.
            report.figures.iter_mut().for_each(|f| f.target = None);
        }
        println!("{}", report.json());
        reports.push(report);
    }
    println!();
    print!("{}", report::table(&reports));
    let total = started.elapsed();
    println!(
        "\n{} scenarios in {:.0}s{}",
        reports.len(),
        total.as_secs_f64(),
        if args.smoke { " (smoke sizes)" } else { "" }
    );
    Ok(reports.iter().all(|r| r.failures.is_empty()))
}

fn name_of(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Overhead => "overhead",
        Scenario::Writes => "writes",
        Scenario::Parallel => "parallel",
        Scenario::HeadOfLine => "head-of-line",
        Scenario::Scale => "scale",
    }
}
