//! Test support for every crate that emits metrics: a recorder local to the test's thread (so
//! tests running in one process never see each other's numbers), a parser of the exposition
//! text to read values, and `promtool`.
//!
//! `#[tokio::test]` runs on a current-thread runtime, so every task the test spawns records into
//! the thread's local recorder too.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use metrics::LocalRecorderGuard;
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};

/// A Prometheus recorder (Faultline's buckets and descriptions) for one test.
#[derive(Debug)]
pub struct LocalMetrics {
    recorder: PrometheusRecorder,
}

impl Default for LocalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalMetrics {
    /// A fresh recorder with every Faultline metric described.
    pub fn new() -> Self {
        let recorder = crate::recorder();
        metrics::with_local_recorder(&recorder, crate::describe);
        LocalMetrics { recorder }
    }

    /// Makes this the current thread's recorder until the guard is dropped.
    pub fn enter(&self) -> LocalRecorderGuard<'_> {
        metrics::set_default_local_recorder(&self.recorder)
    }

    /// A handle that renders this recorder's exposition text.
    pub fn handle(&self) -> PrometheusHandle {
        self.recorder.handle()
    }

    /// The exposition text now.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }

    /// The exposition now, parsed.
    pub fn scrape(&self) -> Exposition {
        Exposition::parse(&self.render())
    }
}

/// One sample line of the exposition text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (with `_bucket`, `_sum`, `_count` for histograms).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Parsed exposition text (the Prometheus text format, version 0.0.4).
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Every sample, in the order of the text.
    pub samples: Vec<Sample>,
    /// The `# HELP` names.
    pub described: Vec<String>,
}

impl Exposition {
    /// Parses `text`. Panics on a line it cannot read (a test helper).
    pub fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(help) = line.strip_prefix("# HELP ") {
                let name = help.split(' ').next().unwrap_or_default();
                exposition.described.push(name.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            exposition
                .samples
                .push(parse_sample(line).unwrap_or_else(|| panic!("unreadable line {line:?}")));
        }
        exposition
    }

    /// The sum of the samples named `name` whose labels include `labels` (0 when none does).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether some sample named `name` has labels including `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// The samples named `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(*k).is_some_and(|have| have == v))
        })
    }

    /// The distinct values of label `key` among the samples named `name`.
    pub fn label_values(&self, name: &str, key: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .matching(name, &[])
            .filter_map(|s| s.labels.get(key).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches(',');
            if let Some(after) = body.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = body.find('=')?;
            let key = body[..eq].trim().to_owned();
            let quoted = body[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => {
                        let (_, escaped) = chars.next()?;
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                    '"' => break i + 1,
                    other => value.push(other),
                }
            };
            body = &quoted[end..];
            labels.insert(key, value);
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Whether `promtool` can be run. When it cannot: under CI (env `CI` set) this panics with what
/// to install; locally it prints why the check is skipped and returns `false`.
pub fn promtool_available() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return true;
    }
    let message = "promtool is not installed: install Debian's `prometheus` package \
                   (`apt-get install -y --no-install-recommends prometheus`; .ci/run does)";
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED: {message}");
    false
}

/// Runs `promtool` with `args`, `stdin` as its input; returns (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("a stdin")
        .write_all(stdin.as_bytes())
        .expect("promtool reads its input");
    let output = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Asserts that `exposition` passes `promtool check metrics` (format and naming lints), when
/// promtool is available (see [`promtool_available`]).
pub fn assert_promtool_accepts_metrics(exposition: &str) {
    if !promtool_available() {
        return;
    }
    let (ok, output) = promtool(&["check", "metrics"], exposition);
    assert!(
        ok && output.trim().is_empty(),
        "promtool check metrics failed:\n{output}\n--- exposition ---\n{exposition}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{queue=\"q\\\"1\",kind=\"k,{x}\"} 3\n\
                    a_total{queue=\"q2\",kind=\"k\"} 4\n\
                    b 1.5\n\
                    h_bucket{le=\"+Inf\"} 2\n";
        let exposition = Exposition::parse(text);
        assert_eq!(exposition.described, vec!["a_total"]);
        assert_eq!(exposition.value("a_total", &[]), 7.0);
        assert_eq!(exposition.value("a_total", &[("queue", "q\"1")]), 3.0);
        assert_eq!(exposition.value("a_total", &[("kind", "k,{x}")]), 3.0);
        assert_eq!(exposition.value("b", &[]), 1.5);
        assert_eq!(exposition.value("missing", &[]), 0.0);
        assert!(exposition.has("h_bucket", &[("le", "+Inf")]));
        assert_eq!(
            exposition.label_values("a_total", "queue"),
            vec!["q\"1".to_owned(), "q2".to_owned()]
        );
    }

    #[test]
    fn a_local_recorder_sees_only_what_its_thread_records() {
        let local = LocalMetrics::new();
        {
            let _guard = local.enter();
            metrics::counter!("faultline_jobs_claimed_total", "queue" => "q").increment(2);
        }
        metrics::counter!("faultline_jobs_claimed_total", "queue" => "q").increment(5);
        let scrape = local.scrape();
        assert_eq!(
            scrape.value("faultline_jobs_claimed_total", &[("queue", "q")]),
            2.0
        );
        assert!(
            scrape
                .described
                .contains(&"faultline_jobs_claimed_total".to_owned())
        );
    }
}
