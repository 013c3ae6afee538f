//! `orchestrator-bench`: how close the worker comes to the broker's own round trip, and how its
//! cost grows. Every figure is a ratio against a baseline measured side by side in the same run
//! (a bare echo responder on the same broker, the ideal wall time, the smallest store), or a
//! count, because the machines it runs on are shared and noisy.
//!
//! The modules: [`echo`] (the two baseline responders, bare and reliable), [`procs`] (the worker
//! and fake-apptainer processes, seeding the store), [`load`] (closed-loop load and statistics),
//! [`scenarios`] (the five scenarios of issue 6, and the fleet's of issue 13), [`report`] (the
//! compact table, the Markdown table and the JSON).

mod echo;
mod load;
mod procs;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};

/// Benchmarks the apptainer-orchestrator worker against two lapin echo responders on the same
/// RabbitMQ broker: the bare echo (transient reply, no confirm, ack at once) and the reliable
/// echo (persistent, mandatory, confirmed reply, ack after the confirm). It starts everything it
/// needs: the echo responders (in this process), and `orchestrator-worker` with `fake-apptainer`
/// as child processes, both taken from the directory of this executable (build them with
/// `cargo build --release -p apptainer-orchestrator-worker -p apptainer-orchestrator-tests
/// --bins`). Prints a compact table per scenario (or `--json`, or `--markdown`). Exits non-zero
/// when a request or a process fails (never because a target is missed).
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

    /// Scenarios to run, comma-separated (default: all but `fleet`, in this order; `--smoke`
    /// runs all six). `reads` is another name for `overhead` (the `getcont` round trip).
    /// `fleet` is left out of the default run because its host with 100,000 containers takes
    /// minutes to bind its names before it consumes.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,

    /// Print only JSON on stdout: one object per scenario, one per line, with every figure.
    #[arg(long, conflicts_with = "markdown")]
    json: bool,

    /// Print the long Markdown table of every figure (the form BENCHMARKS.md records) instead
    /// of the compact tables.
    #[arg(long)]
    markdown: bool,

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
    #[value(alias = "reads")]
    Overhead,
    Writes,
    Parallel,
    HeadOfLine,
    Scale,
    Fleet,
}

/// What `--smoke` runs: every scenario. The default run is all but the last (`fleet`).
const ALL: [Scenario; 6] = [
    Scenario::Overhead,
    Scenario::Writes,
    Scenario::Parallel,
    Scenario::HeadOfLine,
    Scenario::Scale,
    Scenario::Fleet,
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
    let chosen = if args.scenario.is_empty() && args.smoke {
        ALL.to_vec()
    } else if args.scenario.is_empty() {
        ALL[..ALL.len() - 1].to_vec()
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
            Scenario::Fleet => scenarios::fleet(&env).await,
        };
        let mut report = result.unwrap_or_else(|e| {
            let mut failed = report::ScenarioReport::new(name_of(scenario));
            failed.failures.push(format!("{e:#}"));
            failed
        });
        if args.smoke {
            // Tiny runs say nothing about the targets; only failures count.
            report.figures.iter_mut().for_each(|f| f.goals.clear());
        }
        if args.json {
            emit(&format!("{}\n", report.json()));
        }
        reports.push(report);
    }
    let total = started.elapsed();
    let summary = format!(
        "{} scenario{} in {:.0}s{}",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        total.as_secs_f64(),
        if args.smoke { " (smoke sizes)" } else { "" }
    );
    if args.json {
        eprintln!("{summary}");
    } else if args.markdown {
        emit(&format!("{}\n{summary}\n", report::markdown(&reports)));
    } else {
        emit(&format!("{}{summary}\n", report::human(&reports)));
    }
    Ok(reports.iter().all(|r| r.failures.is_empty()))
}

/// Writes to stdout; a reader that went away (`| head`) is not an error of the run, and must not
/// turn into a panic that leaves the worker processes behind.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn name_of(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Overhead => "overhead",
        Scenario::Writes => "writes",
        Scenario::Parallel => "parallel",
        Scenario::HeadOfLine => "head-of-line",
        Scenario::Scale => "scale",
        Scenario::Fleet => "fleet",
    }
}
