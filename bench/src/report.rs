//! Results: figures with their targets, printed as one table and one JSON line per scenario.

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

/// One measured number.
#[derive(Debug, Clone)]
pub struct Figure {
    pub case: String,
    pub name: &'static str,
    pub value: f64,
    pub target: Option<Target>,
}

impl Figure {
    pub fn new(case: impl Into<String>, name: &'static str, value: f64) -> Self {
        Self {
            case: case.into(),
            name,
            value,
            target: None,
        }
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// `Some(true)` when a target is met, `None` when the figure has none.
    pub fn met(&self) -> Option<bool> {
        self.target.map(|t| t.met(self.value))
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
                json!({
                    "case": f.case,
                    "figure": f.name,
                    "value": round(f.value),
                    "target": f.target.map(|t| t.label()),
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

fn format_value(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The table of every figure, in Markdown so BENCHMARKS.md can hold it as printed.
pub fn table(reports: &[ScenarioReport]) -> String {
    let mut out = String::from(
        "| scenario | case | figure | value | target | met |\n|---|---|---|---:|---|---|\n",
    );
    for report in reports {
        for f in &report.figures {
            let met = match f.met() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                report.name,
                f.case,
                f.name,
                format_value(f.value),
                f.target.map(|t| t.label()).unwrap_or_default(),
                met
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_meets_its_target_or_says_no() {
        let mut report = ScenarioReport::new("overhead");
        report.push(Figure::new("128", "throughput ratio", 0.5).target(Target::AtLeast(0.7)));
        report.push(Figure::new("128", "echo req/s", 1000.0));
        let table = table(&[report]);
        assert!(table.contains("| overhead | 128 | throughput ratio | 0.50 | >= 0.7 | NO |"));
        assert!(table.contains("| overhead | 128 | echo req/s | 1000 |  |  |"));
    }
}
