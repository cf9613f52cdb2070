//! The effects ledger: an HTTP sink inside the drill process that every worker's `http` handler
//! calls (`--http-endpoint effect=http://127.0.0.1:PORT/effects/WORKER`), so each execution of a
//! job is recorded with its job id, fencing token, attempt, worker and time.
//!
//! The sink plays the job's side effect: it sleeps `{"ms": N}` of the payload, answers HTTP 500
//! for the first `{"fail": N}` calls of a job (a retryable failure), and otherwise 200 with a body
//! naming the worker, the fencing token and the call, which the worker stores as the job's result:
//! so the database says which execution's completion was accepted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use poem::http::{HeaderMap, StatusCode};
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{Data, Path};
use poem::{EndpointExt, Response, Route, Server, handler, post};
use serde_json::{Value, json};

/// The job kind that the workers run with the `http` handler, calling the sink.
pub(crate) const KIND: &str = "effect";

/// One call of a worker's `http` handler: one execution of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Effect {
    /// `Faultline-Job-Id`.
    pub(crate) job: i64,
    /// `Faultline-Fencing-Token`: which lease the execution ran under.
    pub(crate) token: i64,
    /// `Faultline-Attempt`.
    pub(crate) attempt: i32,
    /// The worker, from the URL path.
    pub(crate) worker: String,
    /// When the call arrived.
    pub(crate) at: Instant,
    /// The call's number among the job's calls (1-based).
    pub(crate) call: u32,
    /// What the sink answered (500 for a planned failure, else 200).
    pub(crate) status: u16,
}

impl Effect {
    /// Whether the sink answered with success (the effect happened and may be completed).
    pub(crate) fn succeeded(&self) -> bool {
        self.status < 300
    }
}

/// Every call the sink received, in arrival order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    effects: Vec<Effect>,
}

impl Ledger {
    /// Records a call of `job` and decides its answer: a failure while the job had fewer than
    /// `fail_first` calls before this one.
    pub(crate) fn record(
        &mut self,
        job: i64,
        token: i64,
        attempt: i32,
        worker: &str,
        at: Instant,
        fail_first: u32,
    ) -> Effect {
        let previous = self.effects.iter().filter(|e| e.job == job).count();
        let call = u32::try_from(previous).unwrap_or(u32::MAX - 1) + 1;
        let status = if call <= fail_first { 500 } else { 200 };
        let effect = Effect {
            job,
            token,
            attempt,
            worker: worker.to_owned(),
            at,
            call,
            status,
        };
        self.effects.push(effect.clone());
        effect
    }

    /// Every call, in arrival order.
    pub(crate) fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// The calls of `job`, in arrival order.
    pub(crate) fn calls(&self, job: i64) -> Vec<&Effect> {
        self.effects.iter().filter(|e| e.job == job).collect()
    }

    /// The calls per job.
    pub(crate) fn by_job(&self) -> BTreeMap<i64, Vec<&Effect>> {
        let mut jobs: BTreeMap<i64, Vec<&Effect>> = BTreeMap::new();
        for effect in &self.effects {
            jobs.entry(effect.job).or_default().push(effect);
        }
        jobs
    }

    /// Calls by `worker`.
    pub(crate) fn by_worker<'a>(&'a self, worker: &'a str) -> impl Iterator<Item = &'a Effect> {
        self.effects.iter().filter(move |e| e.worker == worker)
    }

    /// Executions beyond what each job needed: for each job, its calls minus `needed(job)` (when
    /// more). A job that needed no repeat but ran twice because its worker died counts 1.
    pub(crate) fn repeated(&self, needed: impl Fn(i64) -> usize) -> usize {
        self.by_job()
            .into_iter()
            .map(|(job, calls)| calls.len().saturating_sub(needed(job)))
            .sum()
    }

    /// The successful call of `job` under `token`: the execution whose completion the database
    /// should hold.
    pub(crate) fn success_under(&self, job: i64, token: i64) -> Option<&Effect> {
        self.effects
            .iter()
            .find(|e| e.job == job && e.token == token && e.succeeded())
    }
}

/// The payload of an `effect` job: sleep `ms`, fail the first `fail` calls.
pub(crate) fn payload(ms: u64, fail: u32) -> Value {
    if fail == 0 {
        json!({ "ms": ms })
    } else {
        json!({ "ms": ms, "fail": fail })
    }
}

/// What a stored result says about the execution it came from: `(worker, token)`.
pub(crate) fn result_origin(result: Option<&Value>) -> Option<(String, i64)> {
    let result = result?;
    Some((
        result.get("worker")?.as_str()?.to_owned(),
        result.get("token")?.as_i64()?,
    ))
}

/// The sink's shared state.
#[derive(Debug, Default)]
struct State {
    ledger: Mutex<Ledger>,
}

/// The running sink; stops when dropped.
#[derive(Debug)]
pub(crate) struct Sink {
    addr: SocketAddr,
    state: Arc<State>,
    /// The server; aborted with the sink.
    _server: super::probe::Background<()>,
}

impl Sink {
    /// Starts the sink on a free port of 127.0.0.1.
    pub(crate) async fn start() -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the effects sink")?;
        let acceptor = TcpAcceptor::from_tokio(listener).context("effects sink acceptor")?;
        let addr = acceptor
            .local_addr()
            .into_iter()
            .find_map(|addr| addr.as_socket_addr().copied())
            .context("the effects sink's address")?;
        let state = Arc::new(State::default());
        let app = Route::new()
            .at("/effects/:worker", post(receive))
            .data(state.clone());
        let server = super::probe::Background::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(app).await;
        });
        Ok(Sink {
            addr,
            state,
            _server: server,
        })
    }

    /// The URL a worker named `worker` posts its effects to.
    pub(crate) fn url_for(&self, worker: &str) -> String {
        format!("http://{}/effects/{worker}", self.addr)
    }

    /// A copy of the ledger now.
    pub(crate) fn ledger(&self) -> Ledger {
        self.state
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `worker` has called the sink `calls` times (its jobs are in the middle of
    /// their effects).
    pub(crate) async fn wait_for_calls(&self, worker: &str, calls: usize) -> anyhow::Result<()> {
        let what = format!("{worker} runs {calls} jobs");
        super::probe::wait_for(&what, Duration::from_secs(30), async || {
            let n = self.ledger().by_worker(worker).count();
            Ok(if n >= calls {
                Ok(())
            } else {
                Err(format!("{n} started"))
            })
        })
        .await
    }
}

fn header<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[handler]
async fn receive(
    Path(worker): Path<String>,
    headers: &HeaderMap,
    body: poem::Body,
    state: Data<&Arc<State>>,
) -> Response {
    let at = Instant::now();
    let (Some(job), Some(token), Some(attempt)) = (
        header::<i64>(headers, "faultline-job-id"),
        header::<i64>(headers, "faultline-fencing-token"),
        header::<i32>(headers, "faultline-attempt"),
    ) else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing Faultline-* headers".into(),
        );
    };
    let payload: Value = match body.into_json().await {
        Ok(payload) => payload,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("payload: {e}")),
    };
    let ms = payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
    let fail = payload
        .get("fail")
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let recorded = state
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(job, token, attempt, &worker, at, fail);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if recorded.succeeded() {
        let body = json!({"worker": worker, "token": token, "call": recorded.call});
        Response::builder()
            .status(StatusCode::OK)
            .content_type("application/json")
            .body(body.to_string())
    } else {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("planned failure {} of {fail} (job {job})", recorded.call),
        )
    }
}

fn text(status: StatusCode, body: String) -> Response {
    Response::builder().status(status).body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_calls_fail_as_planned_then_succeed() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        let first = ledger.record(7, 1, 1, "w1", t0, 2);
        let second = ledger.record(7, 2, 2, "w1", t0, 2);
        let other = ledger.record(8, 1, 1, "w2", t0, 0);
        let third = ledger.record(7, 3, 3, "w2", t0, 2);
        assert_eq!((first.call, first.status), (1, 500));
        assert_eq!((second.call, second.status), (2, 500));
        assert_eq!((third.call, third.status), (3, 200));
        assert_eq!((other.call, other.status), (1, 200));
        assert_eq!(ledger.calls(7).len(), 3);
        assert_eq!(ledger.by_worker("w2").count(), 2);
        assert_eq!(ledger.success_under(7, 3), Some(&third));
        assert_eq!(
            ledger.success_under(7, 2),
            None,
            "a failed call is no success"
        );
        assert_eq!(ledger.effects().len(), 4);
    }

    #[test]
    fn repeats_are_calls_beyond_what_each_job_needed() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        for (job, token) in [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (3, 2)] {
            ledger.record(job, token, 1, "w", t0, 0);
        }
        assert_eq!(ledger.repeated(|_| 1), 3);
        // Job 1 needed three calls (two planned failures): only job 3 repeated.
        assert_eq!(ledger.repeated(|job| if job == 1 { 3 } else { 1 }), 1);
        assert_eq!(
            ledger.repeated(|_| 5),
            0,
            "fewer calls than needed is no repeat"
        );
        let jobs: Vec<i64> = ledger.by_job().keys().copied().collect();
        assert_eq!(jobs, [1, 2, 3]);
    }

    #[test]
    fn results_name_the_execution_they_came_from() {
        let result = json!({"worker": "w-2.1", "token": 4, "call": 2});
        assert_eq!(result_origin(Some(&result)), Some(("w-2.1".into(), 4)));
        assert_eq!(result_origin(Some(&json!({"slept_ms": 3}))), None);
        assert_eq!(result_origin(None), None);
        assert_eq!(payload(10, 0), json!({"ms": 10}));
        assert_eq!(payload(10, 2), json!({"ms": 10, "fail": 2}));
    }

    #[tokio::test]
    async fn the_sink_records_calls_and_answers_as_planned() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sink = Sink::start().await.expect("start the sink");
        let client = reqwest::Client::new();
        let call = |token: i64| {
            client
                .post(sink.url_for("w-1"))
                .header("Faultline-Job-Id", "42")
                .header("Faultline-Fencing-Token", token.to_string())
                .header("Faultline-Attempt", token.to_string())
                .body(payload(1, 1).to_string())
                .send()
        };
        let failed = call(1).await.expect("first call");
        assert_eq!(failed.status(), 500);
        assert!(
            failed
                .text()
                .await
                .unwrap()
                .contains("planned failure 1 of 1")
        );
        let done = call(2).await.expect("second call");
        assert_eq!(done.status(), 200);
        let body: Value = serde_json::from_str(&done.text().await.unwrap()).unwrap();
        assert_eq!(result_origin(Some(&body)), Some(("w-1".into(), 2)));
        let ledger = sink.ledger();
        let calls = ledger.calls(42);
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].token, calls[0].worker.as_str()), (1, "w-1"));
        assert!(calls[0].at <= calls[1].at);
        let bad = client
            .post(sink.url_for("w-1"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400, "a call without the headers is refused");
        assert_eq!(sink.ledger().effects().len(), 2);
    }
}
