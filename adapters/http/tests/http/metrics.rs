//! The API's metrics and `GET /metrics`: requests by route template (never a raw path),
//! enqueues and replays, the HTTP worker protocol's claims, retries, terminal outcomes and stale
//! writes, store errors, label folding, and an exposition that passes `promtool check metrics`
//! (also over real HTTP on PostgreSQL). Every test records into a recorder of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use faultline_http::{ApiConfig, StoreHealth};
use faultline_metrics::testing::{Exposition, LocalMetrics, assert_promtool_accepts_metrics};
use faultline_metrics::{LabelGuard, QueueSampler, names, render_fn};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use poem::http::Method;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::common::{Harness, Mode, send};

fn harness(metrics: &LocalMetrics, config: ApiConfig) -> Harness {
    Harness::with_config(ApiConfig {
        metrics: Some(render_fn(metrics.handle())),
        ..config
    })
}

fn requests(m: &Exposition, method: &str, route: &str, status: &str) -> f64 {
    m.value(
        names::HTTP_REQUESTS_TOTAL,
        &[("method", method), ("route", route), ("status", status)],
    )
}

#[tokio::test]
async fn requests_are_counted_by_route_template_never_by_raw_path() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let h = harness(
        &metrics,
        ApiConfig {
            api_tokens: vec!["t".into()],
            ..ApiConfig::default()
        },
    );
    let job = h.enqueue(json!({"kind": "k", "payload": 1})).await;
    h.get(&format!("/v1/jobs/{}", job["id"]))
        .await
        .assert_status(200);
    h.get("/v1/jobs/123456").await.assert_status(404);
    h.get("/v1/jobs/123457").await.assert_status(404);
    h.get("/no/such/route/42").await.assert_status(404);
    send(h.anonymous(Method::GET, "/v1/jobs/99"))
        .await
        .assert_status(401);
    h.get("/health").await.assert_status(200);
    h.post_empty("/v1/queues/emails/pause")
        .await
        .assert_status(200);
    h.post_empty("/v1/queues/bad%07name/resume")
        .await
        .assert_status(422);
    h.get("/v1/workers").await.assert_status(200);

    let m = metrics.scrape();
    assert_eq!(requests(&m, "POST", "/v1/queues/{name}/pause", "200"), 1.0);
    assert_eq!(requests(&m, "POST", "/v1/queues/{name}/resume", "422"), 1.0);
    assert_eq!(requests(&m, "GET", "/v1/workers", "200"), 1.0);
    assert_eq!(requests(&m, "POST", "/v1/jobs", "201"), 1.0);
    assert_eq!(requests(&m, "GET", "/v1/jobs/{id}", "200"), 1.0);
    assert_eq!(requests(&m, "GET", "/v1/jobs/{id}", "404"), 2.0);
    assert_eq!(
        requests(&m, "GET", "/v1/jobs/{id}", "401"),
        1.0,
        "refused before routing, still labelled with its route"
    );
    assert_eq!(requests(&m, "GET", "unmatched", "404"), 1.0);
    assert_eq!(requests(&m, "GET", "/health", "200"), 1.0);
    for route in m.label_values(names::HTTP_REQUESTS_TOTAL, "route") {
        assert!(
            !route
                .split('/')
                .any(|segment| !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())),
            "{route}"
        );
        assert!(
            !route.contains("emails") && !route.contains("bad"),
            "{route}"
        );
    }
    assert_eq!(
        m.value(
            "faultline_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/v1/jobs/{id}")]
        ),
        4.0
    );

    // /metrics needs no token and serves the exposition text.
    let reply = send(h.anonymous(Method::GET, "/metrics")).await;
    reply.assert_status(200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/plain; version=0.0.4")),
        "{reply:?}"
    );
    let served = Exposition::parse(&reply.text);
    assert_eq!(requests(&served, "GET", "/v1/jobs/{id}", "404"), 2.0);
    assert!(
        served
            .described
            .contains(&names::HTTP_REQUESTS_TOTAL.to_owned())
    );
    assert_eq!(requests(&metrics.scrape(), "GET", "/metrics", "200"), 1.0);
}

#[tokio::test]
async fn without_a_renderer_metrics_is_not_found() {
    let h = Harness::new();
    let detail = h
        .get("/metrics")
        .await
        .assert_problem(404, faultline_http::problem_types::NOT_FOUND);
    assert!(!detail.is_empty());
}

#[tokio::test]
async fn enqueues_and_idempotent_replays_are_counted_singly_and_in_batches() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let h = harness(&metrics, ApiConfig::default());
    let keyed = json!({"kind": "mail", "queue": "q", "payload": 1, "idempotency_key": "k1"});
    h.post("/v1/jobs", keyed.clone()).await.assert_status(201);
    let m = metrics.scrape();
    assert_eq!(
        m.value(
            names::JOBS_ENQUEUED_TOTAL,
            &[("queue", "q"), ("kind", "mail")]
        ),
        1.0
    );
    assert_eq!(m.value(names::IDEMPOTENT_REPLAYS_TOTAL, &[]), 0.0);

    h.post("/v1/jobs", keyed.clone()).await.assert_status(200);
    let m = metrics.scrape();
    assert_eq!(m.value(names::JOBS_ENQUEUED_TOTAL, &[]), 1.0);
    assert_eq!(
        m.value(names::IDEMPOTENT_REPLAYS_TOTAL, &[("queue", "q")]),
        1.0
    );

    let batch = json!({"jobs": [
        {"kind": "sms", "queue": "q", "payload": 2},
        keyed,
        {"kind": "mail", "queue": "q", "payload": "different", "idempotency_key": "k1"},
        {"kind": "sms", "queue": "r", "payload": 3},
    ]});
    h.post("/v1/jobs/batch", batch).await.assert_status(200);
    let m = metrics.scrape();
    assert_eq!(
        m.value(
            names::JOBS_ENQUEUED_TOTAL,
            &[("queue", "q"), ("kind", "sms")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            names::JOBS_ENQUEUED_TOTAL,
            &[("queue", "r"), ("kind", "sms")]
        ),
        1.0
    );
    assert_eq!(m.value(names::JOBS_ENQUEUED_TOTAL, &[]), 3.0);
    assert_eq!(m.value(names::IDEMPOTENT_REPLAYS_TOTAL, &[]), 2.0);
}

#[tokio::test]
async fn the_worker_protocol_counts_claims_retries_outcomes_and_stale_writes() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let h = harness(&metrics, ApiConfig::default());
    let finished = |m: &Exposition, outcome: &str| {
        m.value(
            names::JOBS_FINISHED_TOTAL,
            &[("queue", "w"), ("kind", "k"), ("outcome", outcome)],
        )
    };
    let stale = |m: &Exposition, operation: &str| {
        m.value(
            names::STALE_WRITES_REJECTED_TOTAL,
            &[("operation", operation)],
        )
    };

    // A retry, then a terminal failure.
    h.enqueue(json!({"kind": "k", "queue": "w", "payload": 1, "max_attempts": 2}))
        .await;
    h.clock.advance_ms(3_000);
    let first = h.lease_one("w").await;
    let id = first["id"].as_i64().unwrap();
    let m = metrics.scrape();
    assert_eq!(m.value(names::JOBS_CLAIMED_TOTAL, &[("queue", "w")]), 1.0);
    assert_eq!(
        m.value(
            "faultline_job_wait_seconds_bucket",
            &[("queue", "w"), ("le", "2.5")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "faultline_job_wait_seconds_bucket",
            &[("queue", "w"), ("le", "5")]
        ),
        1.0,
        "waited 3 s"
    );
    h.post(
        &format!("/v1/jobs/{id}/fail"),
        json!({"lease_token": first["lease_token"], "error": "flaky", "retry_after_seconds": 1}),
    )
    .await
    .assert_status(200);
    let m = metrics.scrape();
    assert_eq!(
        m.value(names::JOB_RETRIES_TOTAL, &[("queue", "w"), ("kind", "k")]),
        1.0
    );
    assert_eq!(m.value(names::JOBS_FINISHED_TOTAL, &[]), 0.0);
    h.clock.advance_ms(1_000);
    let second = h.lease_one("w").await;
    h.post(
        &format!("/v1/jobs/{id}/fail"),
        json!({"lease_token": second["lease_token"], "error": "again"}),
    )
    .await
    .assert_status(200);
    let m = metrics.scrape();
    assert_eq!(m.value(names::JOBS_CLAIMED_TOTAL, &[("queue", "w")]), 2.0);
    assert_eq!(finished(&m, "failed"), 1.0);
    assert_eq!(m.value(names::JOB_RETRIES_TOTAL, &[]), 1.0);

    // Every lease-holder write with the old token is stale.
    for (action, body) in [
        ("heartbeat", json!({"lease_token": first["lease_token"]})),
        ("complete", json!({"lease_token": first["lease_token"]})),
        (
            "fail",
            json!({"lease_token": first["lease_token"], "error": "x"}),
        ),
        (
            "snooze",
            json!({"lease_token": first["lease_token"], "delay_seconds": 1}),
        ),
    ] {
        h.post(&format!("/v1/jobs/{id}/{action}"), body)
            .await
            .assert_status(409);
    }
    let m = metrics.scrape();
    for operation in ["heartbeat", "complete", "fail", "snooze"] {
        assert_eq!(stale(&m, operation), 1.0, "{operation}");
    }
    assert_eq!(m.value(names::DB_ERRORS_TOTAL, &[]), 0.0, "not DB errors");

    // A success, and a queued job cancelled at once.
    h.enqueue(json!({"kind": "k", "queue": "w", "payload": 2}))
        .await;
    let leased = h.lease_one("w").await;
    h.post(
        &format!("/v1/jobs/{}/complete", leased["id"]),
        json!({"lease_token": leased["lease_token"]}),
    )
    .await
    .assert_status(200);
    let queued = h
        .enqueue(json!({"kind": "k", "queue": "w", "payload": 3}))
        .await;
    h.post_empty(&format!("/v1/jobs/{}/cancel", queued["id"]))
        .await
        .assert_status(200);
    let m = metrics.scrape();
    assert_eq!(finished(&m, "succeeded"), 1.0);
    assert_eq!(finished(&m, "cancelled"), 1.0);
    assert_eq!(m.value(names::JOBS_FINISHED_TOTAL, &[]), 3.0);
}

#[tokio::test]
async fn store_errors_are_counted_by_operation_and_db_up_follows() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let h = harness(&metrics, ApiConfig::default());
    h.store.set_mode(Mode::Fail);
    h.post("/v1/jobs", json!({"kind": "k", "payload": 1}))
        .await
        .assert_status(503);
    h.get("/v1/queues").await.assert_status(503);
    let m = metrics.scrape();
    assert_eq!(
        m.value(names::DB_ERRORS_TOTAL, &[("operation", "enqueue")]),
        1.0
    );
    assert_eq!(
        m.value(names::DB_ERRORS_TOTAL, &[("operation", "queue_stats")]),
        1.0
    );
    assert_eq!(m.value(names::DB_UP, &[]), 0.0);
    assert_eq!(requests(&m, "POST", "/v1/jobs", "503"), 1.0);

    h.store.set_mode(Mode::Pass);
    h.get("/v1/jobs/77").await.assert_status(404);
    let m = metrics.scrape();
    assert_eq!(m.value(names::DB_UP, &[]), 1.0, "a refusal is an answer");
    assert_eq!(m.value(names::DB_ERRORS_TOTAL, &[]), 2.0);
}

#[tokio::test]
async fn queue_and_kind_labels_beyond_the_cap_fold_into_other() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let h = harness(
        &metrics,
        ApiConfig {
            metric_labels: LabelGuard::new(2),
            ..ApiConfig::default()
        },
    );
    for i in 0..5 {
        h.enqueue(
            json!({"kind": format!("kind-{i}"), "queue": format!("queue-{i}"), "payload": i}),
        )
        .await;
    }
    let m = metrics.scrape();
    assert_eq!(
        m.label_values(names::JOBS_ENQUEUED_TOTAL, "queue"),
        vec!["other", "queue-0", "queue-1"]
    );
    assert_eq!(
        m.label_values(names::JOBS_ENQUEUED_TOTAL, "kind"),
        vec!["kind-0", "kind-1", "other"]
    );
    assert_eq!(
        m.value(
            names::JOBS_ENQUEUED_TOTAL,
            &[("queue", "other"), ("kind", "other")]
        ),
        3.0
    );
}

#[tokio::test]
async fn pg_an_api_process_exposition_over_http_passes_promtool() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    let db = TestDb::fresh().await;
    let store = Arc::new(PgStore::new(db.pool().clone()));
    let labels = LabelGuard::default();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("a free port");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let (_never, wake) = watch::channel(0);
    let server = tokio::spawn(faultline_http::serve_on(
        listener,
        store.clone(),
        wake,
        StoreHealth::new(store.clone()),
        ApiConfig {
            metrics: Some(render_fn(metrics.handle())),
            metric_labels: labels.clone(),
            ..ApiConfig::default()
        },
        shutdown.clone(),
    ));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    for i in 0..3 {
        let status = post(
            "/v1/jobs",
            json!({"kind": "k", "queue": "pg", "payload": 1, "idempotency_key": "same"}),
        )
        .await
        .unwrap()
        .status();
        assert_eq!(status.as_u16(), if i == 0 { 201 } else { 200 });
    }
    post(
        "/v1/jobs",
        json!({"kind": "k", "queue": "pg", "payload": "other"}),
    )
    .await
    .unwrap();
    let leased: serde_json::Value = post(
        "/v1/leases",
        json!({"worker_id": "w", "queues": ["pg"], "limit": 1}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let job = &leased["jobs"][0];
    post(
        &format!("/v1/jobs/{}/fail", job["id"]),
        json!({"lease_token": job["lease_token"], "error": "e", "retryable": false}),
    )
    .await
    .unwrap();
    let mut sampler = QueueSampler::new(store.clone(), labels);
    sampler.sample_once().await.unwrap();

    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = Exposition::parse(&text);
    assert_eq!(m.value(names::JOBS_ENQUEUED_TOTAL, &[("queue", "pg")]), 2.0);
    assert_eq!(
        m.value(names::IDEMPOTENT_REPLAYS_TOTAL, &[("queue", "pg")]),
        2.0
    );
    assert_eq!(
        m.value(names::QUEUE_DEPTH, &[("queue", "pg"), ("state", "queued")]),
        1.0
    );
    // The failed job is history, not depth: no gauge for terminal states.
    assert!(!m.has(names::QUEUE_DEPTH, &[("queue", "pg"), ("state", "failed")]));
    assert_eq!(m.value(names::DB_UP, &[]), 1.0);
    assert!(m.has("faultline_http_request_duration_seconds_bucket", &[]));
    assert_promtool_accepts_metrics(&text);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
