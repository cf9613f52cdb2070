//! What a drill found: its counts, its checks (each an invariant that held or not), the summary
//! table printed at the end and `target/drills/summary.json`.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

/// The result of one drill: the numbers of the summary table and every check it made.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    /// Jobs the drill submitted (and expects to end in a known state).
    pub(crate) jobs: usize,
    /// Jobs that did not end as expected (not finished, or finished without their effect).
    pub(crate) lost: usize,
    /// Executions beyond those a job needed (at-least-once repeats), from the effects ledger.
    pub(crate) repeated: usize,
    /// `faultline_stale_writes_rejected_total` of the workers that could be scraped at the end
    /// (`None`: not measured by this drill).
    pub(crate) stale_rejected: Option<u64>,
    /// How long recovery took after the fault, and the bound it had to stay within.
    pub(crate) recovery: Option<Recovery>,
    /// Every invariant checked, in order.
    pub(crate) checks: Vec<Check>,
    /// Facts worth showing that are not pass/fail (seed, breakdowns).
    pub(crate) notes: Vec<String>,
}

/// Recovery time against its bound (derived from the drill's configuration, never a constant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Recovery {
    /// Measured time from the end of the fault to the recovered state.
    pub(crate) took: Duration,
    /// The most it may take.
    pub(crate) bound: Duration,
}

/// One invariant and whether it held.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Check {
    /// What must hold, in words.
    pub(crate) what: String,
    /// Whether it held.
    pub(crate) ok: bool,
    /// What was observed.
    pub(crate) detail: String,
}

impl Report {
    /// Records whether `what` held; `detail` says what was observed.
    pub(crate) fn check(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            ok,
            detail: detail.into(),
        });
    }

    /// Records `expected == actual` as a check.
    pub(crate) fn check_eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: impl Into<String>,
        expected: T,
        actual: T,
    ) {
        let ok = expected == actual;
        self.check(
            what,
            ok,
            format!("expected {expected:?}, observed {actual:?}"),
        );
    }

    /// Records the recovery time and checks it against its bound.
    pub(crate) fn recovery(&mut self, what: &str, took: Duration, bound: Duration) {
        self.recovery = Some(Recovery { took, bound });
        self.check(
            format!("recovery ({what}) within its bound"),
            took <= bound,
            format!("took {}, bound {}", seconds(took), seconds(bound)),
        );
    }

    /// Adds a note.
    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Whether every check held (a drill that checked nothing did not pass).
    pub(crate) fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// The checks that failed.
    pub(crate) fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }
}

/// A finished drill, as the summary shows it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The drill's name.
    pub(crate) name: String,
    /// What it proves (for the JSON summary).
    pub(crate) proves: String,
    /// Its report, or why it could not run to the end.
    pub(crate) outcome: Result<Report, String>,
    /// Wall time of the drill.
    pub(crate) took: Duration,
}

impl Row {
    /// PASS when the drill ran to the end and every check held.
    pub(crate) fn passed(&self) -> bool {
        self.outcome.as_ref().is_ok_and(Report::passed)
    }

    fn verdict(&self) -> &'static str {
        match &self.outcome {
            Ok(report) if report.passed() => "PASS",
            Ok(_) => "FAIL",
            Err(_) => "ERROR",
        }
    }
}

/// `1.23s`.
pub(crate) fn seconds(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

const HEADERS: [&str; 7] = [
    "drill",
    "jobs",
    "lost",
    "repeated",
    "stale writes rejected",
    "recovery time (bound)",
    "verdict",
];

/// The summary table (one line per drill), followed by the failed checks and errors.
pub(crate) fn render_table(rows: &[Row]) -> String {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|row| {
            let (jobs, lost, repeated, stale, recovery) = match &row.outcome {
                Ok(r) => (
                    r.jobs.to_string(),
                    r.lost.to_string(),
                    r.repeated.to_string(),
                    r.stale_rejected.map_or("-".into(), |n| n.to_string()),
                    r.recovery.map_or("-".into(), |rec| {
                        format!("{} (≤ {})", seconds(rec.took), seconds(rec.bound))
                    }),
                ),
                Err(_) => Default::default(),
            };
            [
                row.name.clone(),
                jobs,
                lost,
                repeated,
                stale,
                recovery,
                row.verdict().to_owned(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width - cell.chars().count();
            // Names and the recovery column read left to right; counts line up on the right.
            if matches!(i, 0 | 5 | 6) {
                let _ = write!(text, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(text, "{}{cell}", " ".repeat(pad));
            }
            if i + 1 < cells.len() {
                text.push_str("  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADERS.map(str::to_owned));
    for cells in &cells {
        line(cells);
    }
    for row in rows {
        match &row.outcome {
            Ok(report) => {
                for failure in report.failures() {
                    let _ = writeln!(
                        out,
                        "{}: FAILED: {}: {}",
                        row.name, failure.what, failure.detail
                    );
                }
            }
            Err(error) => {
                let _ = writeln!(out, "{}: ERROR: {error}", row.name);
            }
        }
    }
    out
}

/// The machine-readable summary written to `target/drills/summary.json`.
pub(crate) fn summary_json(rows: &[Row], mode: &str) -> Value {
    let drills: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut drill = json!({
                "name": row.name,
                "proves": row.proves,
                "verdict": row.verdict(),
                "seconds": row.took.as_secs_f64(),
            });
            match &row.outcome {
                Ok(r) => {
                    let fields = json!({
                        "jobs": r.jobs,
                        "lost": r.lost,
                        "repeated": r.repeated,
                        "stale_writes_rejected": r.stale_rejected,
                        "recovery_seconds": r.recovery.map(|rec| rec.took.as_secs_f64()),
                        "recovery_bound_seconds": r.recovery.map(|rec| rec.bound.as_secs_f64()),
                        "checks": r.checks.iter().map(|c| json!({
                            "what": c.what, "ok": c.ok, "detail": c.detail,
                        })).collect::<Vec<_>>(),
                        "notes": r.notes,
                    });
                    merge(&mut drill, fields);
                }
                Err(error) => merge(&mut drill, json!({ "error": error })),
            }
            drill
        })
        .collect();
    json!({
        "mode": mode,
        "passed": rows.iter().all(Row::passed),
        "drills": drills,
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passing() -> Report {
        let mut report = Report {
            jobs: 2000,
            lost: 0,
            repeated: 12,
            stale_rejected: Some(0),
            ..Report::default()
        };
        report.check("every job succeeded", true, "2000 of 2000");
        report.recovery(
            "orphaned jobs done",
            Duration::from_millis(2_900),
            Duration::from_millis(5_600),
        );
        report
    }

    fn row(name: &str, outcome: Result<Report, String>) -> Row {
        Row {
            name: name.into(),
            proves: "something".into(),
            outcome,
            took: Duration::from_secs(3),
        }
    }

    #[test]
    fn a_report_passes_only_when_it_checked_something_and_everything_held() {
        assert!(!Report::default().passed(), "no checks is no pass");
        let mut report = passing();
        assert!(report.passed());
        report.check_eq("attempts", 3, 4);
        assert!(!report.passed());
        let failed: Vec<&Check> = report.failures().collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].detail, "expected 3, observed 4");
        let mut slow = Report::default();
        slow.recovery("x", Duration::from_secs(7), Duration::from_secs(6));
        assert!(!slow.passed(), "a recovery past its bound fails the drill");
    }

    #[test]
    fn the_table_has_a_line_per_drill_then_the_failures() {
        let mut failing = passing();
        failing.lost = 3;
        failing.stale_rejected = None;
        failing.check("none lost", false, "3 jobs still queued");
        let rows = [
            row("worker-crash", Ok(passing())),
            row("retries", Ok(failing)),
            row("db-outage", Err("could not start a cluster".into())),
        ];
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "drill         jobs  lost  repeated  stale writes rejected  recovery time (bound)  verdict"
        );
        assert_eq!(
            lines[1],
            "worker-crash  2000     0        12                      0  2.90s (≤ 5.60s)        PASS"
        );
        assert_eq!(
            lines[2],
            "retries       2000     3        12                      -  2.90s (≤ 5.60s)        FAIL"
        );
        assert_eq!(
            lines[3],
            "db-outage                                                                         ERROR"
        );
        assert_eq!(lines[4], "retries: FAILED: none lost: 3 jobs still queued");
        assert_eq!(lines[5], "db-outage: ERROR: could not start a cluster");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn the_json_summary_carries_every_number_and_check() {
        let rows = [
            row("worker-crash", Ok(passing())),
            row("db-outage", Err("boom".into())),
        ];
        let summary = summary_json(&rows, "short");
        assert_eq!(summary["mode"], "short");
        assert_eq!(summary["passed"], false);
        let crash = &summary["drills"][0];
        assert_eq!(crash["name"], "worker-crash");
        assert_eq!(crash["verdict"], "PASS");
        assert_eq!(crash["jobs"], 2000);
        assert_eq!(crash["repeated"], 12);
        assert_eq!(crash["stale_writes_rejected"], 0);
        assert_eq!(crash["recovery_seconds"], 2.9);
        assert_eq!(crash["recovery_bound_seconds"], 5.6);
        assert_eq!(crash["checks"][1]["ok"], true);
        assert_eq!(crash["seconds"], 3.0);
        let outage = &summary["drills"][1];
        assert_eq!(outage["verdict"], "ERROR");
        assert_eq!(outage["error"], "boom");
        assert!(outage.get("jobs").is_none());
        assert_eq!(summary_json(&rows[..1], "full")["passed"], true);
    }
}
