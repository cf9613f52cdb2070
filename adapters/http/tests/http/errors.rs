//! Bad input of every kind gets a 4xx problem, never a 500: malformed JSON, wrong types, missing
//! and unknown fields, out-of-range numbers, bad names, oversize bodies and payloads, wrong
//! content types, unknown routes and methods.

use faultline_http::{ApiConfig, PROBLEM_CONTENT_TYPE, problem_types as types};
use poem::http::Method;
use serde_json::{Value, json};

use crate::common::{Harness, send};

fn job() -> Value {
    json!({"kind": "k", "payload": {"a": 1}})
}

fn with(field: &str, value: Value) -> Value {
    let mut job = job();
    job[field] = value;
    job
}

fn without(field: &str) -> Value {
    let mut job = job();
    job.as_object_mut().unwrap().remove(field);
    job
}

#[tokio::test]
async fn bodies_that_do_not_match_the_schema_get_400() {
    let h = Harness::new();
    let cases: Vec<(&str, Value)> = vec![
        ("missing kind", without("kind")),
        ("missing payload", without("payload")),
        ("kind is a number", with("kind", json!(5))),
        ("kind is a boolean", with("kind", json!(true))),
        ("queue is a number", with("queue", json!(1))),
        ("key is a number", with("idempotency_key", json!(7))),
        ("kind is empty", with("kind", json!(""))),
        ("kind too long", with("kind", json!("k".repeat(129)))),
        ("queue too long", with("queue", json!("q".repeat(129)))),
        ("priority too big", with("priority", json!(40_000))),
        ("priority fractional", with("priority", json!(1.5))),
        ("priority a string", with("priority", json!("1"))),
        ("max_attempts zero", with("max_attempts", json!(0))),
        ("max_attempts too big", with("max_attempts", json!(1001))),
        ("negative delay", with("delay_seconds", json!(-1))),
        (
            "delay over a year",
            with("delay_seconds", json!(31_536_001)),
        ),
        ("zero timeout", with("timeout_seconds", json!(0))),
        ("run_at not a date", with("run_at", json!("tomorrow"))),
        ("jitter above 1", with("backoff", json!({"jitter": 1.5}))),
        ("unknown backoff field", with("backoff", json!({"base": 1}))),
        ("unknown field", with("surprise", json!(true))),
        ("empty key", with("idempotency_key", json!(""))),
        ("not an object", json!([1, 2])),
        ("null body", Value::Null),
    ];
    for (case, body) in cases {
        let reply = h.post("/v1/jobs", body).await;
        let detail = reply.assert_problem(400, types::BAD_REQUEST);
        assert!(!detail.is_empty(), "{case}");
    }

    for raw in ["{", "{\"kind\": \"k\", \"payload\": }", "", "nul\u{0}"] {
        let reply = send(
            h.request(Method::POST, "/v1/jobs")
                .content_type("application/json")
                .body(raw),
        )
        .await;
        reply.assert_problem(400, types::BAD_REQUEST);
    }
    assert_eq!(
        h.get("/v1/jobs").await.assert_status(200)["jobs"],
        json!([]),
        "nothing was created"
    );
}

#[tokio::test]
async fn well_formed_but_refused_requests_get_422_naming_the_field() {
    let h = Harness::new();
    let cases: Vec<(Value, &str)> = vec![
        (
            with("kind", json!("a\u{7}b")),
            "kind must not contain control characters",
        ),
        (
            with("queue", json!("line\nbreak")),
            "queue must not contain control characters",
        ),
        (
            with("idempotency_key", json!("k\u{0}")),
            "idempotency_key must not contain control characters",
        ),
        (
            with("payload", json!({"s": "nul\u{0}"})),
            "payload must not contain the NUL character",
        ),
        (
            with("payload", json!({"nul\u{0}key": 1})),
            "payload must not contain the NUL character",
        ),
        (
            json!({"kind": "k", "payload": 1, "run_at": "2030-01-01T00:00:00Z", "delay_seconds": 1}),
            "run_at and delay are mutually exclusive",
        ),
        (
            with("backoff", json!({"base_seconds": 10, "cap_seconds": 5})),
            "backoff cap must not be below the backoff base",
        ),
        (
            with("run_at", json!("0000-01-01T00:00:00Z")),
            "run_at must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z",
        ),
    ];
    for (body, expected) in cases {
        let reply = h.post("/v1/jobs", body).await;
        let detail = reply.assert_problem(422, types::INVALID_REQUEST);
        assert!(detail.starts_with(expected), "{detail:?} vs {expected:?}");
    }
}

#[tokio::test]
async fn oversize_bodies_and_payloads_get_413() {
    let h = Harness::with_config(ApiConfig {
        max_body_bytes: 1_000,
        max_payload_bytes: 300,
        ..ApiConfig::default()
    });
    // The payload limit: a body under the body limit whose payload is too large.
    let reply = h
        .post("/v1/jobs", with("payload", json!("p".repeat(400))))
        .await;
    let detail = reply.assert_problem(413, types::PAYLOAD_TOO_LARGE);
    assert_eq!(
        detail,
        "payload is 402 bytes of JSON; the limit is 300 bytes"
    );

    // The body limit, with a Content-Length header (refused before reading) ...
    let big = with("payload", json!("p".repeat(2_000))).to_string();
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .content_type("application/json")
            .header("content-length", big.len().to_string())
            .body(big.clone()),
    )
    .await;
    let detail = reply.assert_problem(413, types::BODY_TOO_LARGE);
    assert!(detail.contains("1000 bytes"), "{detail}");

    // ... and without one (read up to the limit).
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .content_type("application/json")
            .body(big),
    )
    .await;
    reply.assert_problem(413, types::BODY_TOO_LARGE);

    // Exactly at the limits is fine.
    let payload = "p".repeat(298);
    let reply = h.post("/v1/jobs", with("payload", json!(payload))).await;
    reply.assert_status(201);
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_415() {
    let h = Harness::new();
    let body = job().to_string();
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
    ] {
        let reply = send(
            h.request(Method::POST, "/v1/jobs")
                .content_type(content_type)
                .body(body.clone()),
        )
        .await;
        reply.assert_problem(415, types::UNSUPPORTED_MEDIA_TYPE);
    }
    let reply = send(h.request(Method::POST, "/v1/jobs").body(body.clone())).await;
    reply.assert_problem(415, types::UNSUPPORTED_MEDIA_TYPE);
    // A JSON media type with parameters is accepted.
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .content_type("application/json; charset=utf-8")
            .body(body),
    )
    .await;
    reply.assert_status(201);
}

#[tokio::test]
async fn unknown_routes_get_404_and_wrong_methods_405() {
    let h = Harness::new();
    for path in [
        "/v1/nope",
        "/nope",
        "/v2/jobs",
        "/metrics",
        "/v1/jobs/1/explode",
    ] {
        h.get(path).await.assert_problem(404, types::NOT_FOUND);
    }
    let reply = send(h.request(Method::DELETE, "/v1/jobs/1")).await;
    reply.assert_problem(405, types::METHOD_NOT_ALLOWED);
    let reply = send(h.request(Method::GET, "/v1/leases")).await;
    reply.assert_problem(405, types::METHOD_NOT_ALLOWED);
    let reply = send(h.request(Method::PUT, "/v1/jobs")).await;
    reply.assert_problem(405, types::METHOD_NOT_ALLOWED);
    let reply = send(h.request(Method::POST, "/health")).await;
    reply.assert_problem(405, types::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn successful_responses_are_json_and_errors_are_problems() {
    let h = Harness::new();
    let ok = h.enqueue(job()).await;
    assert!(ok["id"].is_i64());
    let reply = h.get(&format!("/v1/jobs/{}", ok["id"])).await;
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{reply:?}"
    );
    let reply = h.get("/v1/jobs/77").await;
    assert_eq!(reply.header("content-type"), Some(PROBLEM_CONTENT_TYPE));
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_arrives_gets_408_after_the_request_timeout() {
    let h = Harness::with_config(ApiConfig {
        request_timeout: std::time::Duration::from_secs(3),
        ..ApiConfig::default()
    });
    // A body whose sender stays open without sending anything.
    let (_sender, receiver) = tokio::io::duplex(64);
    let started = tokio::time::Instant::now();
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .content_type("application/json")
            .body(poem::Body::from_async_read(receiver)),
    )
    .await;
    let detail = reply.assert_problem(408, types::REQUEST_TIMEOUT);
    assert_eq!(detail, "the request body did not arrive within 3 s");
    assert_eq!(started.elapsed(), std::time::Duration::from_secs(3));
}

#[tokio::test]
async fn run_at_is_read_strictly_and_bounded() {
    let h = Harness::new();
    // Lenient forms chrono would take: refused as malformed (400), naming the field.
    for lenient in [
        " 2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z ",
        "+002024-01-01T00:00:00Z",
        "2026-01-01 00:00:00Z",
        "2026-01-01t00:00:00Z",
        "2026-12-31T23:59:60Z",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00.Z",
        "2026-01-01T00:00:00+0100",
        "2026-02-30T00:00:00Z",
    ] {
        for (path, body) in [
            ("/v1/jobs", with("run_at", json!(lenient))),
            (
                "/v1/jobs/batch",
                json!({"jobs": [with("run_at", json!(lenient))]}),
            ),
        ] {
            let detail = h
                .post(path, body)
                .await
                .assert_problem(400, types::BAD_REQUEST);
            assert!(detail.contains("run_at"), "{path} {lenient:?}: {detail}");
        }
    }
    // Well-formed but out of range: refused as invalid (422), naming the field.
    for far in [
        "0001-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "9999-12-31T23:59:59-01:00",
    ] {
        let detail = h
            .post("/v1/jobs", with("run_at", json!(far)))
            .await
            .assert_problem(422, types::INVALID_REQUEST);
        assert!(
            detail.starts_with("run_at must be between 1970"),
            "{far:?}: {detail}"
        );
        let detail = h
            .post(
                "/v1/jobs/batch",
                json!({"jobs": [with("run_at", json!(far))]}),
            )
            .await
            .assert_problem(422, types::INVALID_REQUEST);
        assert!(
            detail.starts_with("item 0: run_at must be between"),
            "{far:?}: {detail}"
        );
    }
    assert_eq!(
        h.get("/v1/jobs").await.assert_status(200)["jobs"],
        json!([]),
        "nothing was created"
    );
    // Normal values, with a fraction and an offset, and the bounds themselves, are accepted.
    for (fine, stored) in [
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00+00:00"),
        (
            "2026-06-30T12:00:00.5+02:00",
            "2026-06-30T10:00:00.500+00:00",
        ),
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00+00:00"),
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59+00:00"),
    ] {
        let job = h.enqueue(with("run_at", json!(fine))).await;
        assert_eq!(job["next_run_at"], stored, "{fine}");
    }
    let reply = h
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [with("run_at", json!("2026-01-01T00:00:00Z"))]}),
        )
        .await;
    assert_eq!(reply.assert_status(200)["results"][0]["outcome"], "created");
}
