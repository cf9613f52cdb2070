//! The operator kit in `docs/`: the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), the scrape config passes `promtool check config`, and the Grafana
//! dashboard is valid JSON whose every query parses as PromQL and names only Faultline metrics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use faultline_metrics::names;
use faultline_metrics::testing::promtool_available;
use serde_json::Value;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

/// Runs promtool in `dir`; asserts success.
fn promtool_in(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !promtool_available() {
        return;
    }
    let dir = docs().join("prometheus");
    let checked = promtool_in(&dir, &["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    promtool_in(&dir, &["test", "rules", "alerts_test.yml"]);
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    for alert in [
        "FaultlineBacklogGrowing",
        "FaultlineOldestReadyJobTooOld",
        "FaultlineJobFailureRatioHigh",
        "FaultlineLeaseExpirationsSpiking",
        "FaultlineDatabaseDown",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}

#[test]
fn the_scrape_config_passes_promtool_check_config() {
    if !promtool_available() {
        return;
    }
    let dir = docs().join("prometheus");
    let checked = promtool_in(&dir, &["check", "config", "prometheus.yml"]);
    assert!(
        checked.contains("is valid prometheus config file syntax"),
        "{checked}"
    );
}

/// Every PromQL expression of the dashboard's panels and variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("an expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] == "query" {
            let query = variable["definition"].as_str().expect("a definition");
            // label_values(METRIC, LABEL) is Grafana's, not PromQL: check its metric.
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split(',').next())
                .expect("a label_values query");
            queries.push(metric.trim().to_owned());
        }
    }
    queries
}

#[test]
fn the_dashboard_is_valid_and_queries_only_faultline_metrics() {
    let text = std::fs::read_to_string(docs().join("grafana/faultline.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["uid"], "faultline");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 20, "{}", queries.len());

    // Metric names used: every one is a Faultline metric (or a histogram's series of one).
    let known: BTreeSet<String> = names::ALL
        .iter()
        .flat_map(|name| {
            [
                (*name).to_owned(),
                format!("{name}_bucket"),
                format!("{name}_sum"),
                format!("{name}_count"),
            ]
        })
        .collect();
    let mut used = BTreeSet::new();
    for query in &queries {
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("faultline_") {
                assert!(known.contains(word), "unknown metric {word} in {query}");
                used.insert(word.trim_end_matches("_bucket").to_owned());
            }
        }
    }
    // The panels the issue asks for have their metrics.
    for name in [
        names::JOBS_FINISHED_TOTAL,
        names::JOB_DURATION_SECONDS,
        names::JOB_RETRIES_TOTAL,
        names::LEASE_EXPIRATIONS_TOTAL,
        names::JOBS_RECOVERED_TOTAL,
        names::STALE_WRITES_REJECTED_TOTAL,
        names::QUEUE_DEPTH,
        names::QUEUE_OLDEST_READY_AGE_SECONDS,
        names::DB_UP,
    ] {
        assert!(used.contains(name), "no panel shows {name}");
    }
    assert!(
        queries.iter().any(|q| q.contains("histogram_quantile(")),
        "latency quantiles"
    );

    // Every query parses as PromQL: promtool checks them as recording rules, with Grafana's
    // variables replaced by values.
    if !promtool_available() {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let promql = query
            .replace("$__rate_interval", "5m")
            .replace("$queue", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    let dir = std::env::temp_dir().join(format!("faultline-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.yml"), rules).unwrap();
    let checked = promtool_in(&dir, &["check", "rules", "dashboard.yml"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}
