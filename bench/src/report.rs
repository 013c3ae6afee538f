//! Results: figures with their targets, printed three ways: a compact table for a person (the
//! default), one JSON object per scenario (`--json`), or the long Markdown table of every figure
//! (`--markdown`, the form BENCHMARKS.md holds).

use serde_json::{json, Value};

/// A target from the issue, checked against a figure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::AtMost(t) => value <= t,
            Target::Below(t) => value < t,
        }
    }

    fn label(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {t}"),
            Target::AtMost(t) => format!("<= {t}"),
            Target::Below(t) => format!("< {t}"),
        }
    }
}

/// A target and the issue that set it, so old and new targets on one figure stay apart.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub issue: u32,
    pub target: Target,
}

impl Goal {
    pub fn met(self, value: f64) -> bool {
        self.target.met(value)
    }

    pub fn label(self) -> String {
        format!("{} (issue {})", self.target.label(), self.issue)
    }
}

/// One measured number.
#[derive(Debug, Clone)]
pub struct Figure {
    pub case: String,
    pub name: &'static str,
    pub value: f64,
    pub goals: Vec<Goal>,
}

impl Figure {
    pub fn new(case: impl Into<String>, name: &'static str, value: f64) -> Self {
        Self {
            case: case.into(),
            name,
            value,
            goals: Vec::new(),
        }
    }

    /// A target of issue 6 (the scenarios' original targets).
    pub fn target(self, target: Target) -> Self {
        self.goal(6, target)
    }

    /// A target set by `issue`.
    pub fn goal(mut self, issue: u32, target: Target) -> Self {
        self.goals.push(Goal { issue, target });
        self
    }

    /// `Some(true)` when every target is met, `None` when the figure has none.
    pub fn met(&self) -> Option<bool> {
        (!self.goals.is_empty()).then(|| self.goals.iter().all(|g| g.met(self.value)))
    }

    fn targets_label(&self) -> String {
        self.goals
            .iter()
            .map(|g| g.label())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn met_label(&self) -> String {
        self.goals
            .iter()
            .map(|g| if g.met(self.value) { "yes" } else { "NO" })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What one scenario measured, and anything that went wrong (a failed request, a worker that
/// did not start): failures make the bench exit non-zero, missed targets do not.
#[derive(Debug, Default)]
pub struct ScenarioReport {
    pub name: &'static str,
    pub figures: Vec<Figure>,
    pub failures: Vec<String>,
}

impl ScenarioReport {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    pub fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub fn json(&self) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .map(|f| {
                let targets: Vec<Value> = f
                    .goals
                    .iter()
                    .map(|g| {
                        json!({
                            "issue": g.issue,
                            "target": g.target.label(),
                            "met": g.met(f.value),
                        })
                    })
                    .collect();
                json!({
                    "case": f.case,
                    "figure": f.name,
                    "value": round(f.value),
                    "targets": targets,
                    "met": f.met(),
                })
            })
            .collect();
        json!({
            "scenario": self.name,
            "figures": figures,
            "failures": self.failures,
        })
    }
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

pub fn format_value(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The table of every figure, in Markdown so BENCHMARKS.md can hold it as printed.
pub fn markdown(reports: &[ScenarioReport]) -> String {
    let mut out = String::from(
        "| scenario | case | figure | value | target | met |\n|---|---|---|---:|---|---|\n",
    );
    for report in reports {
        for f in &report.figures {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                report.name,
                f.case,
                f.name,
                format_value(f.value),
                f.targets_label(),
                f.met_label()
            ));
        }
        for failure in &report.failures {
            out.push_str(&format!(
                "| {} | FAILED | {} | | | |\n",
                report.name,
                failure.replace('|', "/").replace('\n', " ")
            ));
        }
    }
    out
}

/// The figures a worker-against-both-echoes comparison reports per case, by name; the compact
/// table shows these as columns.
pub mod names {
    pub const WORKER_RPS: &str = "worker req/s";
    pub const BARE_RPS: &str = "bare echo req/s";
    pub const RELIABLE_RPS: &str = "reliable echo req/s";
    pub const THROUGHPUT_BARE: &str = "throughput worker/bare echo";
    pub const THROUGHPUT_RELIABLE: &str = "throughput worker/reliable echo";
    pub const P50_BARE: &str = "p50 latency worker/bare echo";
    pub const P50_RELIABLE: &str = "p50 latency worker/reliable echo";
    pub const P99_BARE: &str = "p99 latency worker/bare echo";
    pub const P99_RELIABLE: &str = "p99 latency worker/reliable echo";
    pub const WORKER_P50: &str = "worker p50 ms";
    pub const BARE_P50: &str = "bare echo p50 ms";
    pub const RELIABLE_P50: &str = "reliable echo p50 ms";
    pub const WORKER_P99: &str = "worker p99 ms";
    pub const BARE_P99: &str = "bare echo p99 ms";
    pub const RELIABLE_P99: &str = "reliable echo p99 ms";

    // The fleet scenario: three hosts on one exchange against one host and the bare echo.
    pub const FLEET_RPS: &str = "fleet req/s";
    pub const SINGLE_RPS: &str = "one host req/s";
    pub const THROUGHPUT_FLEET_SINGLE: &str = "throughput fleet/one host";
    pub const P50_FLEET_SINGLE: &str = "p50 latency fleet/one host";
    pub const P99_FLEET_SINGLE: &str = "p99 latency fleet/one host";
    pub const THROUGHPUT_FLEET_BARE: &str = "throughput fleet/bare echo";
    pub const THROUGHPUT_SINGLE_BARE: &str = "throughput one host/bare echo";
    pub const P99_FLEET_BARE: &str = "p99 latency fleet/bare echo";
    pub const P99_SINGLE_BARE: &str = "p99 latency one host/bare echo";
    pub const FLEET_P50: &str = "fleet p50 ms";
    pub const SINGLE_P50: &str = "one host p50 ms";
    pub const FLEET_P99: &str = "fleet p99 ms";
    pub const SINGLE_P99: &str = "one host p99 ms";
}

/// A compact comparison table: the header of its first column (the case), and its other
/// columns as (header, figure); a case is a row when it has the first column's figure.
struct Columns {
    case: &'static str,
    columns: &'static [(&'static str, &'static str)],
}

/// The worker against both echoes (overhead, writes).
const COMPARISON: Columns = Columns {
    case: "in flight",
    columns: &COMPARISON_COLUMNS,
};

/// Three hosts against one host and the bare echo (fleet).
const FLEET_COMPARISON: Columns = Columns {
    case: "queue, in flight",
    columns: &[
        ("fleet req/s", names::FLEET_RPS),
        ("one host req/s", names::SINGLE_RPS),
        ("bare req/s", names::BARE_RPS),
        ("fleet/one", names::THROUGHPUT_FLEET_SINGLE),
        ("fleet/bare", names::THROUGHPUT_FLEET_BARE),
        ("one/bare", names::THROUGHPUT_SINGLE_BARE),
        ("fleet p99 ms", names::FLEET_P99),
        ("one host p99", names::SINGLE_P99),
        ("bare p99", names::BARE_P99),
    ],
};

const COMPARISON_COLUMNS: [(&str, &str); 8] = [
    ("worker req/s", names::WORKER_RPS),
    ("bare req/s", names::BARE_RPS),
    ("reliable req/s", names::RELIABLE_RPS),
    ("worker/bare", names::THROUGHPUT_BARE),
    ("worker/reliable", names::THROUGHPUT_RELIABLE),
    ("worker p99 ms", names::WORKER_P99),
    ("bare p99", names::BARE_P99),
    ("reliable p99", names::RELIABLE_P99),
];

/// What a person reads: per scenario, one row per case for worker-against-echo comparisons
/// (throughputs, the two throughput ratios, the three p99s), then every figure that has a target
/// with its verdict, then the remaining figures. The full list is in `--markdown` and `--json`.
pub fn human(reports: &[ScenarioReport]) -> String {
    let mut out = String::new();
    for report in reports {
        out.push_str(&format!("{}\n", heading(report.name)));
        let mut cases: Vec<&str> = Vec::new();
        for f in &report.figures {
            if !cases.contains(&f.case.as_str()) {
                cases.push(&f.case);
            }
        }
        let find = |case: &str, name: &str| {
            report
                .figures
                .iter()
                .find(|f| f.case == case && f.name == name)
        };
        let table = [&COMPARISON, &FLEET_COMPARISON]
            .into_iter()
            .find(|t| {
                let key = t.columns[0].1;
                report.figures.iter().any(|f| f.name == key)
            })
            .unwrap_or(&COMPARISON);
        let compared: Vec<&str> = cases
            .iter()
            .copied()
            .filter(|c| find(c, table.columns[0].1).is_some())
            .collect();
        let shown = |f: &Figure| {
            table.columns.iter().any(|(_, n)| *n == f.name) && compared.contains(&f.case.as_str())
        };
        if !compared.is_empty() {
            let mut rows = vec![std::iter::once(table.case)
                .chain(table.columns.iter().map(|(h, _)| *h))
                .map(str::to_owned)
                .collect::<Vec<_>>()];
            for case in &compared {
                let mut row = vec![case.trim_end_matches(" in flight").to_owned()];
                for (_, name) in table.columns {
                    row.push(find(case, name).map_or(String::new(), |f| format_value(f.value)));
                }
                rows.push(row);
            }
            out.push_str(&aligned(&rows, "  "));
        }
        let targeted: Vec<&Figure> = report
            .figures
            .iter()
            .filter(|f| !f.goals.is_empty())
            .collect();
        if !targeted.is_empty() {
            out.push_str("  targets:\n");
            let rows: Vec<Vec<String>> = targeted
                .iter()
                .flat_map(|f| {
                    f.goals.iter().map(move |g| {
                        vec![
                            f.case.clone(),
                            f.name.to_owned(),
                            format_value(f.value),
                            g.label(),
                            if g.met(f.value) { "yes" } else { "NO" }.to_owned(),
                        ]
                    })
                })
                .collect();
            out.push_str(&aligned(&rows, "    "));
        }
        let rest: Vec<Vec<String>> = report
            .figures
            .iter()
            .filter(|f| f.goals.is_empty() && !shown(f) && !is_detail(f.name))
            .map(|f| vec![f.case.clone(), f.name.to_owned(), format_value(f.value)])
            .collect();
        if !rest.is_empty() {
            let prefix = if compared.is_empty() {
                "  "
            } else {
                out.push_str("  also:\n");
                "    "
            };
            out.push_str(&aligned(&rest, prefix));
        }
        for failure in &report.failures {
            out.push_str(&format!("  FAILED: {failure}\n"));
        }
        out.push('\n');
    }
    out
}

/// Figures of a comparison left out of the compact table (they are in `--markdown`/`--json`).
fn is_detail(name: &str) -> bool {
    [
        names::P50_BARE,
        names::P50_RELIABLE,
        names::P99_BARE,
        names::P99_RELIABLE,
        names::WORKER_P50,
        names::BARE_P50,
        names::RELIABLE_P50,
        names::P50_FLEET_SINGLE,
        names::P99_FLEET_BARE,
        names::P99_SINGLE_BARE,
        names::FLEET_P50,
        names::SINGLE_P50,
    ]
    .contains(&name)
}

fn heading(scenario: &str) -> String {
    match scenario {
        "overhead" => {
            "overhead (reads: getcont; worker/bare, worker/reliable = throughput ratios)".into()
        }
        "writes" => {
            "writes (createvolume + deletevolume; worker/bare, worker/reliable = throughput ratios)"
                .into()
        }
        "fleet" => "fleet (getcont routed by name: 3 hosts against 1 host against the bare echo, \
                    per queue type; fleet/one, fleet/bare, one/bare = throughput ratios)"
            .into(),
        other => other.to_owned(),
    }
}

/// Rows as columns: the first left-aligned, the others right-aligned, each line prefixed.
fn aligned(rows: &[Vec<String>], prefix: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(prefix);
        for (c, value) in row.iter().enumerate() {
            if c == 0 {
                line.push_str(&format!("{value:<w$}", w = widths[c]));
            } else if value.parse::<f64>().is_ok() || value.is_empty() {
                line.push_str(&format!("  {value:>w$}", w = widths[c]));
            } else {
                line.push_str(&format!("  {value:<w$}", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_meets_its_target_or_says_no() {
        let mut report = ScenarioReport::new("overhead");
        report.push(
            Figure::new("128", "throughput ratio", 0.5)
                .target(Target::AtLeast(0.4))
                .goal(14, Target::AtLeast(0.7)),
        );
        report.push(Figure::new("128", "echo req/s", 1000.0));
        let table = markdown(&[report]);
        assert!(table.contains(
            "| overhead | 128 | throughput ratio | 0.50 | >= 0.4 (issue 6), >= 0.7 (issue 14) | yes, NO |"
        ));
        assert!(table.contains("| overhead | 128 | echo req/s | 1000 |  |  |"));
    }

    #[test]
    fn the_compact_table_has_one_row_per_in_flight_level() {
        let mut report = ScenarioReport::new("overhead");
        for (case, rps) in [("16 in flight", 900.0), ("128 in flight", 1500.0)] {
            report.push(Figure::new(case, names::WORKER_RPS, rps));
            report.push(Figure::new(case, names::BARE_RPS, 2000.0));
            report.push(
                Figure::new(case, names::THROUGHPUT_BARE, rps / 2000.0)
                    .goal(14, Target::AtLeast(0.85)),
            );
        }
        let text = human(&[report]);
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  16 ") || l.starts_with("  128 "))
            .collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(
            text.contains(
                "128 in flight  throughput worker/bare echo  0.75  >= 0.85 (issue 14)  NO"
            ),
            "{text}"
        );
    }
}
