//! Every request header the API interprets is either used or refused with a 400 problem, never
//! silently ignored: `Idempotency-Key` (visible ASCII only, once), `Content-Type` (one readable
//! value) and `Content-Length` (one number); a non-ASCII bearer token is a wrong token (401).

use faultline_http::{ApiConfig, problem_types as types};
use poem::http::{HeaderValue, Method};
use serde_json::json;

use crate::common::{Harness, job_count, send};

fn raw(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).expect("a header value")
}

#[tokio::test]
async fn a_non_ascii_idempotency_key_is_refused_and_creates_nothing() {
    let h = Harness::new();
    for _ in 0..3 {
        let reply = send(
            h.request(Method::POST, "/v1/jobs")
                .header("idempotency-key", raw("commande-été-7".as_bytes()))
                .body_json(&json!({"kind": "k", "payload": 1})),
        )
        .await;
        let detail = reply.assert_problem(400, types::BAD_REQUEST);
        assert!(detail.contains("Idempotency-Key"), "{detail}");
    }
    assert_eq!(job_count(&h.store.inner).await, 0, "nothing was created");
}

#[tokio::test]
async fn unusable_idempotency_keys_are_refused() {
    let h = Harness::new();
    let cases: [(&str, Vec<HeaderValue>); 5] = [
        ("latin-1 byte", vec![raw(b"caf\xe9")]),
        ("control character", vec![raw(b"a\tb")]),
        ("empty", vec![raw(b"")]),
        ("too long", vec![raw("k".repeat(129).as_bytes())]),
        ("repeated", vec![raw(b"one"), raw(b"two")]),
    ];
    for (what, values) in cases {
        let mut request = h.request(Method::POST, "/v1/jobs");
        for value in values {
            request = request.header("idempotency-key", value);
        }
        let reply = send(request.body_json(&json!({"kind": "k", "payload": 1}))).await;
        let detail = reply.assert_problem(400, types::BAD_REQUEST);
        assert!(detail.contains("Idempotency-Key"), "{what}: {detail}");
    }
    assert_eq!(job_count(&h.store.inner).await, 0, "nothing was created");

    // A usable one (visible ASCII, spaces inside allowed) is used: the repeat replays.
    for status in [201, 200] {
        let reply = send(
            h.request(Method::POST, "/v1/jobs")
                .header("idempotency-key", "order 7/%C3%A9t%C3%A9")
                .body_json(&json!({"kind": "k", "payload": 1})),
        )
        .await;
        assert_eq!(
            reply.assert_status(status)["idempotency_key"],
            "order 7/%C3%A9t%C3%A9"
        );
    }
    assert_eq!(job_count(&h.store.inner).await, 1);
}

#[tokio::test]
async fn an_unreadable_content_type_or_length_is_refused() {
    let h = Harness::new();
    let body = json!({"kind": "k", "payload": 1}).to_string();
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .header("content-type", raw("application/jsön".as_bytes()))
            .body(body.clone()),
    )
    .await;
    let status = reply.status.as_u16();
    assert!(status == 400 || status == 415, "{reply:?}");
    assert!(reply.json["type"].is_string(), "{reply:?}");
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .header("content-type", "application/json")
            .header("content-type", "text/plain")
            .body(body.clone()),
    )
    .await;
    reply.assert_problem(400, types::BAD_REQUEST);
    let reply = send(
        h.request(Method::POST, "/v1/jobs")
            .header("content-type", "application/json")
            .header("content-length", "twelve")
            .body(body),
    )
    .await;
    reply.assert_problem(400, types::BAD_REQUEST);
    assert_eq!(job_count(&h.store.inner).await, 0, "nothing was created");
}

#[tokio::test]
async fn a_non_ascii_bearer_token_is_a_wrong_token() {
    let h = Harness::with_config(ApiConfig {
        api_tokens: vec!["s3cret".into()],
        ..ApiConfig::default()
    });
    let reply = send(
        h.anonymous(Method::GET, "/v1/jobs")
            .header("authorization", raw("Bearer s3crét".as_bytes())),
    )
    .await;
    reply.assert_problem(401, types::UNAUTHORIZED);
}
