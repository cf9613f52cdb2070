//! The API's Prometheus metrics, recorded through the `metrics` facade (whatever recorder the
//! process installed): requests by method, route template and status, enqueues and replays, the
//! job events of the HTTP worker protocol, stale writes and store errors. Names and labels come
//! from `faultline_ports::telemetry`; queue and kind label values pass through the
//! [`LabelGuard`] of [`crate::ApiConfig`].

use std::time::Duration;

use faultline_ports::domain::{Job, JobState};
use faultline_ports::telemetry::{labels, names, outcome};
use faultline_ports::{LabelGuard, StoreError};
use metrics::{counter, gauge, histogram};
use poem::http::Method;

/// The `route` label of requests that match no route.
pub(crate) const UNMATCHED: &str = "unmatched";

/// Maps request paths to the route templates of the API (`/v1/jobs/{id}`), so that the `route`
/// label never carries a raw path (ids would make it unbounded).
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    /// (template, its segments, number of literal segments), most literal segments first.
    routes: Vec<(String, Vec<Segment>, usize)>,
    /// Templates that also match every path below them (`/docs`).
    prefixes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

impl RouteTable {
    /// A table of `templates` (OpenAPI style, `{name}` for a parameter segment) and of `prefixes`
    /// (a template that also stands for everything below it).
    pub(crate) fn new<'a>(
        templates: impl IntoIterator<Item = &'a str>,
        prefixes: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut routes: Vec<(String, Vec<Segment>, usize)> = templates
            .into_iter()
            .map(|template| {
                let segments: Vec<Segment> = template
                    .split('/')
                    .map(|segment| {
                        if segment.starts_with('{') && segment.ends_with('}') {
                            Segment::Param
                        } else {
                            Segment::Literal(segment.to_owned())
                        }
                    })
                    .collect();
                let literal = segments
                    .iter()
                    .filter(|s| matches!(s, Segment::Literal(_)))
                    .count();
                (template.to_owned(), segments, literal)
            })
            .collect();
        routes.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        RouteTable {
            routes,
            prefixes: prefixes.into_iter().map(str::to_owned).collect(),
        }
    }

    /// The template `path` belongs to, or [`UNMATCHED`].
    pub(crate) fn template(&self, path: &str) -> &str {
        let segments: Vec<&str> = path.split('/').collect();
        for (template, pattern, _) in &self.routes {
            if pattern.len() == segments.len()
                && pattern.iter().zip(&segments).all(|(p, s)| match p {
                    Segment::Literal(literal) => literal == s,
                    Segment::Param => !s.is_empty(),
                })
            {
                return template;
            }
        }
        for prefix in &self.prefixes {
            if path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            {
                return prefix;
            }
        }
        UNMATCHED
    }
}

/// The `method` label: the standard methods as they are, anything else `OTHER`.
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// One answered request.
pub(crate) fn request(method: &'static str, route: &str, status: u16, took: Duration) {
    counter!(
        names::HTTP_REQUESTS_TOTAL,
        labels::METHOD => method,
        labels::ROUTE => route.to_owned(),
        labels::STATUS => status.to_string(),
    )
    .increment(1);
    histogram!(
        names::HTTP_REQUEST_DURATION_SECONDS,
        labels::METHOD => method,
        labels::ROUTE => route.to_owned(),
    )
    .record(took);
}

/// A request the framework could not parse, answered with `status` (400, 414, 431) before any
/// route saw it: counted as method `OTHER`, route `unmatched` (no duration is recorded).
pub(crate) fn unparsed_request(status: u16) {
    counter!(
        names::HTTP_REQUESTS_TOTAL,
        labels::METHOD => "OTHER",
        labels::ROUTE => UNMATCHED,
        labels::STATUS => status.to_string(),
    )
    .increment(1);
}

/// A store call of `operation` ended with `error` (none: success; a timeout is a backend error).
pub(crate) fn store_call(operation: &'static str, error: Option<&StoreError>) {
    let unreachable = matches!(error, Some(StoreError::Backend(_)));
    gauge!(names::DB_UP).set(if unreachable { 0.0 } else { 1.0 });
    if unreachable {
        counter!(names::DB_ERRORS_TOTAL, labels::OPERATION => operation).increment(1);
    }
    if let Some(StoreError::StaleLease { .. }) = error {
        stale(operation);
    }
}

/// A lease holder's `operation` was refused: the lease was no longer held.
pub(crate) fn stale(operation: &'static str) {
    counter!(names::STALE_WRITES_REJECTED_TOTAL, labels::OPERATION => operation).increment(1);
}

/// An enqueue created a job.
pub(crate) fn enqueued(guard: &LabelGuard, queue: &str, kind: &str) {
    counter!(
        names::JOBS_ENQUEUED_TOTAL,
        labels::QUEUE => guard.queue(queue),
        labels::KIND => guard.kind(kind),
    )
    .increment(1);
}

/// An enqueue's idempotency key resolved to an existing job.
pub(crate) fn replayed(guard: &LabelGuard, queue: &str) {
    counter!(names::IDEMPOTENT_REPLAYS_TOTAL, labels::QUEUE => guard.queue(queue)).increment(1);
}

/// A job was leased over HTTP: counts the claim and how long the job waited after it was due.
pub(crate) fn claimed(guard: &LabelGuard, job: &Job) {
    let queue = guard.queue(&job.queue);
    counter!(names::JOBS_CLAIMED_TOTAL, labels::QUEUE => queue.clone()).increment(1);
    if let Some(started_at) = job.started_at {
        let waited = (started_at - job.next_run_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
        histogram!(names::JOB_WAIT_SECONDS, labels::QUEUE => queue).record(waited);
    }
}

/// A write changed `job` (now in its new state): counts a terminal state as finished, and a job
/// queued again by a failure report (`retry`) as a retry.
pub(crate) fn changed(guard: &LabelGuard, job: &Job, retry: bool) {
    let outcome = match job.state {
        JobState::Succeeded => outcome::SUCCEEDED,
        JobState::Failed => outcome::FAILED,
        JobState::Cancelled => outcome::CANCELLED,
        JobState::Queued if retry => {
            counter!(
                names::JOB_RETRIES_TOTAL,
                labels::QUEUE => guard.queue(&job.queue),
                labels::KIND => guard.kind(&job.kind),
            )
            .increment(1);
            return;
        }
        JobState::Queued | JobState::Running => return,
    };
    counter!(
        names::JOBS_FINISHED_TOTAL,
        labels::QUEUE => guard.queue(&job.queue),
        labels::KIND => guard.kind(&job.kind),
        labels::OUTCOME => outcome,
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_templates_and_literal_segments_win() {
        let table = RouteTable::new(
            [
                "/v1/jobs",
                "/v1/jobs/batch",
                "/v1/jobs/{id}",
                "/v1/jobs/{id}/cancel",
                "/health",
            ],
            ["/docs"],
        );
        assert_eq!(table.template("/v1/jobs"), "/v1/jobs");
        assert_eq!(table.template("/v1/jobs/batch"), "/v1/jobs/batch");
        assert_eq!(table.template("/v1/jobs/42"), "/v1/jobs/{id}");
        assert_eq!(table.template("/v1/jobs/42/cancel"), "/v1/jobs/{id}/cancel");
        assert_eq!(table.template("/v1/jobs/"), UNMATCHED);
        assert_eq!(table.template("/v1/jobs/42/explode"), UNMATCHED);
        assert_eq!(table.template("/docs"), "/docs");
        assert_eq!(table.template("/docs/index.css"), "/docs");
        assert_eq!(table.template("/docsx"), UNMATCHED);
        assert_eq!(table.template("/wp-admin.php"), UNMATCHED);
        assert_eq!(table.template(""), UNMATCHED);
    }

    #[test]
    fn unknown_methods_fold_into_other() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
