//! The benchmark's output: one JSON object per (workload, metric) in the peers' format
//! (`shared/bench-peers/README.md`, "Output format", with `peer: "faultline"`), a table of our
//! results on stdout, and, with `--compare`, the peers' table with a Faultline row.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::machine::{Cores, round2};
use super::stats::{Summary, median};
use super::workloads::{Sample, round};

/// The aggregated repetitions of one metric.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub(crate) workload: &'static str,
    pub(crate) jobs: usize,
    pub(crate) concurrency: usize,
    pub(crate) runs: Vec<f64>,
    pub(crate) summary: Summary,
    pub(crate) cores: Cores,
    pub(crate) other_max: f64,
    /// Load averages (1, 5, 15 min) at the start of each repetition.
    pub(crate) loads: Vec<[f64; 3]>,
    /// Some repetition shared the machine (other processes above the noise threshold, or the
    /// quiet gate gave up).
    pub(crate) noisy: bool,
    pub(crate) discarded: usize,
    /// The median of each numeric context value of the samples.
    pub(crate) extra: Map<String, Value>,
}

/// The unit of a metric.
pub(crate) fn unit(workload: &str) -> &'static str {
    if workload.starts_with("latency_") {
        "ms"
    } else {
        "jobs/s"
    }
}

impl Line {
    /// Aggregates `metric` over `samples` (`discarded`: noisy repetitions thrown away).
    pub(crate) fn aggregate(
        metric: &'static str,
        jobs: usize,
        concurrency: usize,
        samples: &[Sample],
        discarded: usize,
        noise_cores: f64,
    ) -> Option<Line> {
        let runs: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.values.iter().find(|(m, _)| *m == metric).map(|(_, v)| *v))
            .collect();
        let summary = Summary::of(&runs)?;
        let med =
            |f: fn(&Cores) -> f64| median(&samples.iter().map(|s| f(&s.cores)).collect::<Vec<_>>());
        let other_max = samples.iter().map(|s| s.cores.other).fold(0.0, f64::max);
        let mut extra = Map::new();
        let keys: Vec<String> = samples
            .iter()
            .flat_map(|s| s.extra.keys().cloned())
            .collect();
        for key in keys {
            let values: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.extra.get(&key).and_then(Value::as_f64))
                .collect();
            if !values.is_empty() {
                extra.insert(key, json!(round(median(&values), 3)));
            }
        }
        Some(Line {
            workload: metric,
            jobs,
            concurrency,
            runs,
            summary,
            cores: Cores {
                bench: med(|c| c.bench),
                postgres: med(|c| c.postgres),
                other: med(|c| c.other),
            },
            other_max,
            loads: samples.iter().map(|s| s.load).collect(),
            noisy: other_max > noise_cores || samples.iter().any(|s| !s.quiet),
            discarded,
            extra,
        })
    }

    /// The peers' JSON line format, plus our context. `worker_args`: the extra `faultline
    /// worker` arguments of the run (none: the default configuration); they name the row.
    pub(crate) fn to_json(
        &self,
        version: &str,
        worker_args: &[String],
        settings: &Value,
        ts: &str,
    ) -> Value {
        let (peer, config) = if worker_args.is_empty() {
            ("faultline".to_owned(), "default".to_owned())
        } else {
            let args = worker_args.join(" ");
            (format!("faultline ({args})"), args)
        };
        let mut out = json!({
            "peer": peer,
            "version": version,
            "workload": self.workload,
            "jobs": self.jobs,
            "concurrency": self.concurrency,
            "median": round(self.summary.median, 3),
            "min": round(self.summary.min, 3),
            "max": round(self.summary.max, 3),
            "unit": unit(self.workload),
            "runs": self.runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
            "config": config,
            "completed_jobs": "kept, state succeeded (default retention 24 h)",
            "runtime": "rust, release build; the worker and the API as `faultline` processes",
            "cpu_cores": {
                "driver": round2(self.cores.bench),
                "postgres": round2(self.cores.postgres),
                "other": round2(self.cores.other),
                "other_max": round2(self.other_max),
            },
            "load_avg": self.loads,
            "noisy": self.noisy,
            "noisy_reps_discarded": self.discarded,
            "settings": settings,
            "ts": ts,
        });
        if let Value::Object(map) = &mut out {
            for (key, value) in &self.extra {
                map.insert(key.clone(), value.clone());
            }
        }
        out
    }
}

/// A number as the peers' `summarize.py` prints it.
pub(crate) fn fmt_number(x: f64) -> String {
    if x >= 100.0 {
        let whole = format!("{:.0}", x);
        let (sign, digits) = whole.split_at(usize::from(whole.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(summary: &Summary, noisy: bool) -> String {
    let mut cell = format!(
        "{} ({}–{})",
        fmt_number(summary.median),
        fmt_number(summary.min),
        fmt_number(summary.max)
    );
    if noisy {
        cell.push_str(" ⚠");
    }
    cell
}

/// Our results, one row per metric, plus the W4/W2 ratio when both ran.
pub(crate) fn table(lines: &[Line]) -> String {
    let mut out = String::new();
    out.push_str("| workload | median (min–max) | unit | jobs | C | cores: bench / postgres / other | load at start |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for line in lines {
        let loads: Vec<String> = line.loads.iter().map(|l| format!("{:.2}", l[0])).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} / {:.2} / {:.2} | {} |",
            line.workload,
            cell(&line.summary, line.noisy),
            unit(line.workload),
            line.jobs,
            line.concurrency,
            line.cores.bench,
            line.cores.postgres,
            line.cores.other,
            loads.join(", ")
        );
    }
    let find = |w: &str| lines.iter().find(|l| l.workload == w);
    if let (Some(w2), Some(w4)) = (find("drain"), find("history_drain")) {
        let _ = writeln!(
            out,
            "\nW4/W2: {:.2} (history drain {} jobs/s / drain {} jobs/s, medians)",
            w4.summary.median / w2.summary.median,
            fmt_number(w4.summary.median),
            fmt_number(w2.summary.median)
        );
    }
    out.push_str("\nmedian (min–max) of the repetitions; ⚠ = some repetition shared the CPU with other processes\n");
    out
}

/// The peers' table columns (`summarize.py`).
const PEER_COLUMNS: [(&str, &str); 7] = [
    ("insert_batch", "insert batch (jobs/s)"),
    ("insert_single", "insert single (jobs/s)"),
    ("drain", "drain C=32 (jobs/s)"),
    ("latency_p50", "lat p50 (ms)"),
    ("latency_p95", "lat p95 (ms)"),
    ("latency_p99", "lat p99 (ms)"),
    ("latency_max", "lat max (ms)"),
];

/// The peers' table (from their JSON lines, e.g. `results-latest.jsonl`) with our row first.
pub(crate) fn peer_table(ours: &[Value], peers: &str) -> String {
    let mut rows: BTreeMap<(usize, String), (String, BTreeMap<String, Value>)> = BTreeMap::new();
    let lines = ours.iter().cloned().chain(
        peers
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
    );
    for (order, line) in lines.enumerate() {
        let (Some(peer), Some(workload)) = (line["peer"].as_str(), line["workload"].as_str())
        else {
            continue;
        };
        let key = rows
            .keys()
            .find(|(_, p)| p == peer)
            .cloned()
            .unwrap_or((order, peer.to_owned()));
        let version = line["version"].as_str().unwrap_or("?").to_owned();
        let entry = rows
            .entry(key)
            .or_insert_with(|| (version, BTreeMap::new()));
        entry.1.insert(workload.to_owned(), line.clone());
    }
    let mut out = String::from("| peer | version |");
    for (_, head) in PEER_COLUMNS {
        let _ = write!(out, " {head} |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(PEER_COLUMNS.len()));
    out.push('\n');
    for ((_, peer), (version, cells)) in &rows {
        let _ = write!(out, "| {peer} | {version} |");
        for (key, _) in PEER_COLUMNS {
            let text = cells.get(key).and_then(|line| {
                let summary = Summary {
                    median: line["median"].as_f64()?,
                    min: line["min"].as_f64()?,
                    max: line["max"].as_f64()?,
                };
                let noisy = line["cpu_cores"]["other_max"].as_f64().unwrap_or(0.0) > 0.25;
                Some(cell(&summary, noisy))
            });
            let _ = write!(out, " {} |", text.unwrap_or_else(|| "—".to_owned()));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: f64, other: f64) -> Sample {
        Sample {
            values: vec![("drain", value)],
            cores: Cores {
                bench: 1.0,
                postgres: 0.5,
                other,
            },
            quiet_wait_s: 1.0,
            quiet: true,
            load: [0.5, 0.4, 0.3],
            extra: Map::from_iter([("startup_ms".to_owned(), json!(value / 1000.0))]),
        }
    }

    #[test]
    fn numbers_print_as_the_peers_print_them() {
        assert_eq!(fmt_number(61652.81), "61,653");
        assert_eq!(fmt_number(1153.797), "1,154");
        assert_eq!(fmt_number(100.0), "100");
        assert_eq!(fmt_number(1234567.0), "1,234,567");
        assert_eq!(fmt_number(16.149), "16.1");
        assert_eq!(fmt_number(0.574), "0.57");
    }

    #[test]
    fn lines_aggregate_median_min_max_and_flag_noise() {
        let samples = [
            sample(30_000.0, 0.0),
            sample(10_000.0, 0.3),
            sample(20_000.0, 0.1),
        ];
        let line = Line::aggregate("drain", 20_000, 32, &samples, 1, 0.25).expect("a line");
        assert_eq!(
            line.summary,
            Summary {
                median: 20_000.0,
                min: 10_000.0,
                max: 30_000.0
            }
        );
        assert!(line.noisy);
        assert_eq!(line.other_max, 0.3);
        assert_eq!(line.extra["startup_ms"], json!(20.0));
        assert!(Line::aggregate("latency_p50", 1, 1, &samples, 0, 0.25).is_none());

        let json = line.to_json("0.1.0", &[], &json!({}), "now");
        let tuned = line.to_json(
            "0.1.0",
            &["--completion-batch-size=1000".into()],
            &json!({}),
            "now",
        );
        assert_eq!(tuned["peer"], "faultline (--completion-batch-size=1000)");
        assert_eq!(tuned["config"], "--completion-batch-size=1000");
        for field in [
            "peer",
            "version",
            "workload",
            "jobs",
            "concurrency",
            "median",
            "min",
            "max",
            "unit",
        ] {
            assert!(json.get(field).is_some(), "{field} missing");
        }
        assert_eq!(json["unit"], "jobs/s");
        assert_eq!(json["noisy_reps_discarded"], 1);
        assert_eq!(json["startup_ms"], json!(20.0));
    }

    #[test]
    fn tables_show_every_metric_and_the_history_ratio() {
        let drain =
            Line::aggregate("drain", 20_000, 32, &[sample(40_000.0, 0.0)], 0, 0.25).unwrap();
        let mut history = drain.clone();
        history.workload = "history_drain";
        history.summary.median = 36_000.0;
        let text = table(&[drain.clone(), history]);
        assert!(
            text.contains("| drain | 40,000 (40,000–40,000) | jobs/s | 20000 | 32 |"),
            "{text}"
        );
        assert!(text.contains("W4/W2: 0.90"), "{text}");

        let ours = vec![drain.to_json("0.1.0", &[], &json!({}), "now")];
        let peers = r#"{"peer": "pgqueuer", "version": "1.6.0", "workload": "drain", "median": 5231.8, "min": 5066.6, "max": 5284.0, "cpu_cores": {"other_max": 0.3}}
{"peer": "pgqueuer", "version": "1.6.0", "workload": "latency_p99", "median": 3.04, "min": 2.79, "max": 9.66}"#;
        let text = peer_table(&ours, peers);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 4, "{text}");
        assert!(
            rows[2].starts_with("| faultline | 0.1.0 | — | — | 40,000 (40,000–40,000) |"),
            "{text}"
        );
        assert!(rows[3].contains("5,232 (5,067–5,284) ⚠"), "{text}");
        assert!(rows[3].contains("3.04 (2.79–9.66)"), "{text}");
    }
}
