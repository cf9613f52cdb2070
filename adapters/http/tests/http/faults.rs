//! A failing or hanging database: 503 with `Retry-After` and a problem that does not leak the
//! backend's message, on every operation; `/health` says what is down; the process stays up. A
//! lease request answered 503 costs no attempt: whatever its claim leased is given back.

use std::time::Duration;

use faultline_http::{ApiConfig, problem_types as types};
use faultline_ports::JobStore;
use faultline_ports::domain::{Job, JobState};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::{FixedHealth, Harness, Mode, Reply, SECRET_BACKEND_MESSAGE};

/// One request of every operation that touches the store, for a job `id` leased with `token`.
async fn every_operation(h: &Harness, id: i64, token: i64) -> Vec<(String, Reply)> {
    let lease = json!({"lease_token": token});
    let requests: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/v1/jobs".into(),
            Some(json!({"kind": "k", "payload": 1})),
        ),
        (
            "POST",
            "/v1/jobs/batch".into(),
            Some(json!({"jobs": [{"kind": "k", "payload": 1}]})),
        ),
        ("GET", format!("/v1/jobs/{id}"), None),
        ("GET", "/v1/jobs".into(), None),
        ("POST", format!("/v1/jobs/{id}/cancel"), None),
        ("POST", format!("/v1/jobs/{id}/retry"), None),
        ("POST", format!("/v1/jobs/{id}/expire-lease"), None),
        ("GET", "/v1/queues".into(), None),
        ("POST", "/v1/queues/q/pause".into(), None),
        ("POST", "/v1/queues/q/resume".into(), None),
        ("GET", "/v1/workers".into(), None),
        (
            "POST",
            "/v1/leases".into(),
            Some(json!({"worker_id": "w", "queues": ["q"], "wait_seconds": 5})),
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/heartbeat"),
            Some(lease.clone()),
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/complete"),
            Some(lease.clone()),
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/fail"),
            Some(json!({"lease_token": token, "error": "e"})),
        ),
        (
            "POST",
            format!("/v1/jobs/{id}/snooze"),
            Some(json!({"lease_token": token, "delay_seconds": 1})),
        ),
    ];
    let mut replies = Vec::new();
    for (method, path, body) in requests {
        let reply = match (method, body) {
            ("GET", _) => h.get(&path).await,
            (_, Some(body)) => h.post(&path, body).await,
            (_, None) => h.post_empty(&path).await,
        };
        replies.push((format!("{method} {path}"), reply));
    }
    replies
}

async fn leased_job(h: &Harness) -> (i64, i64) {
    h.enqueue(json!({"kind": "k", "queue": "q", "payload": 1}))
        .await;
    let leased = h.lease_one("q").await;
    (
        leased["id"].as_i64().unwrap(),
        leased["lease_token"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn backend_errors_are_503_with_retry_after_on_every_operation() {
    let h = Harness::with_config(ApiConfig {
        retry_after: Duration::from_millis(2_500),
        ..ApiConfig::default()
    });
    let (id, token) = leased_job(&h).await;
    h.store.set_mode(Mode::Fail);
    for (request, reply) in every_operation(&h, id, token).await {
        let detail = reply.assert_problem(503, types::STORAGE_UNAVAILABLE);
        assert_eq!(reply.header("retry-after"), Some("3"), "{request}");
        assert!(!reply.text.contains("db.internal"), "{request}: {detail}");
        assert!(!detail.contains(SECRET_BACKEND_MESSAGE), "{request}");
    }
    // The process stays up and recovers with the database.
    h.store.set_mode(Mode::Pass);
    h.get(&format!("/v1/jobs/{id}")).await.assert_status(200);
}

#[tokio::test(start_paused = true)]
async fn a_hung_database_never_holds_a_request_past_the_timeout() {
    let timeout = Duration::from_secs(4);
    let h = Harness::with_config(ApiConfig {
        request_timeout: timeout,
        ..ApiConfig::default()
    });
    let (id, token) = leased_job(&h).await;
    h.store.set_mode(Mode::Hang);
    for (request, reply) in {
        let started = Instant::now();
        let replies = every_operation(&h, id, token).await;
        // Each request waited for exactly one timed-out store call.
        assert_eq!(started.elapsed(), timeout * replies.len() as u32);
        replies
    } {
        let detail = reply.assert_problem(503, types::STORAGE_UNAVAILABLE);
        assert!(
            detail.contains("did not answer within 4 s"),
            "{request}: {detail}"
        );
        assert_eq!(reply.header("retry-after"), Some("5"), "{request}");
    }
}

#[tokio::test]
async fn health_is_200_when_the_database_answers() {
    let h = Harness::new();
    let reply = h.get("/health").await;
    assert_eq!(
        reply.assert_status(200),
        &json!({"status": "ok", "database": "up"})
    );
}

#[tokio::test]
async fn health_is_503_naming_what_is_down() {
    // Through the store port (`StoreHealth`): a backend error.
    let h = Harness::new();
    h.store.set_mode(Mode::Fail);
    let reply = h.get("/health").await;
    assert_eq!(
        reply.assert_status(503),
        &json!({"status": "unavailable", "database": "down", "detail": "the database does not answer"})
    );
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json"))
    );

    // Through a caller's own check: its description is shown.
    let h = Harness::with_health(
        ApiConfig::default(),
        FixedHealth(Err("postgres: connection refused".into())),
    );
    let reply = h.get("/health").await;
    assert_eq!(
        reply.assert_status(503)["detail"],
        "postgres: connection refused"
    );
}

#[tokio::test(start_paused = true)]
async fn health_is_503_when_the_database_hangs() {
    let h = Harness::with_config(ApiConfig {
        request_timeout: Duration::from_secs(3),
        ..ApiConfig::default()
    });
    h.store.set_mode(Mode::Hang);
    let started = Instant::now();
    let reply = h.get("/health").await;
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(reply.assert_status(503)["database"], "down");
    assert_eq!(
        reply.json["detail"],
        "the database did not answer within 3 s"
    );
}

/// Polls the inner store until job `id` satisfies `done`; returns it.
async fn wait_for_job(h: &Harness, id: i64, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = h.store.inner.job_get(id).await.expect("job");
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} is not {what}: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A job of queue `q` with one attempt, whose lease request gets 503 in `mode` although its claim
/// applied (or will): the job is given back, attempt returned, and is then leased as attempt 1.
async fn lost_lease_answer_costs_no_attempt(mode: Mode) {
    let h = Harness::with_config(ApiConfig {
        request_timeout: Duration::from_millis(200),
        ..ApiConfig::default()
    });
    let job = h
        .enqueue(json!({"kind": "k", "queue": "q", "payload": 1, "max_attempts": 1}))
        .await;
    let id = job["id"].as_i64().expect("id");
    h.store.set_mode(mode);
    let mut releases = h.store.releases();
    let reply = h
        .post(
            "/v1/leases",
            json!({"worker_id": "w", "queues": ["q"], "lease_seconds": 30}),
        )
        .await;
    reply.assert_problem(503, types::STORAGE_UNAVAILABLE);
    if mode == Mode::LateClaims {
        // The claim commits only after the request gave up and a first give-back found nothing.
        tokio::time::timeout(Duration::from_secs(20), releases.changed())
            .await
            .expect("no give-back call within 20 s")
            .expect("a give-back call");
        assert_eq!(
            h.store.inner.job_get(id).await.expect("job").state,
            JobState::Queued
        );
        h.store.commit_late_claims();
        wait_for_job(&h, id, "leased late", |job| job.state == JobState::Running).await;
    }
    let back = wait_for_job(&h, id, "given back", |job| job.state == JobState::Queued).await;
    assert_eq!(back.attempts, 0, "the attempt was returned: {back:?}");
    assert!(back.errors.is_empty(), "{back:?}");
    assert_eq!(back.fencing_token, 1, "the lost lease stays fenced off");

    h.store.set_mode(Mode::Pass);
    let leased = h.lease_one("q").await;
    assert_eq!(
        (leased["id"].as_i64(), leased["attempt"].as_i64()),
        (Some(id), Some(1))
    );
}

#[tokio::test]
async fn a_lease_request_that_timed_out_after_its_claim_committed_costs_no_attempt() {
    lost_lease_answer_costs_no_attempt(Mode::LoseClaimAnswers).await;
}

#[tokio::test]
async fn a_lease_request_whose_claim_failed_after_committing_costs_no_attempt() {
    lost_lease_answer_costs_no_attempt(Mode::FailAfterClaims).await;
}

#[tokio::test]
async fn a_lease_request_whose_claim_commits_after_the_503_costs_no_attempt() {
    lost_lease_answer_costs_no_attempt(Mode::LateClaims).await;
}
