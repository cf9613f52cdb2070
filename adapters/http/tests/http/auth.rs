//! Bearer-token authentication: `/v1` needs a configured token, the operational routes stay open,
//! odd path spellings do not get around it, and without tokens everything is open.

use faultline_http::{ApiConfig, problem_types as types};
use poem::http::Method;
use serde_json::json;

use crate::common::{Harness, job_count, send};

fn with_tokens() -> Harness {
    Harness::with_config(ApiConfig {
        api_tokens: vec!["first-token".into(), "second-token".into()],
        ..ApiConfig::default()
    })
}

#[tokio::test]
async fn v1_needs_one_of_the_configured_tokens() {
    let h = with_tokens();
    let body = json!({"kind": "k", "payload": 1});

    let missing = send(h.anonymous(Method::POST, "/v1/jobs").body_json(&body)).await;
    let detail = missing.assert_problem(401, types::UNAUTHORIZED);
    assert!(detail.contains("Authorization: Bearer"), "{detail}");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"faultline\"")
    );

    for header in [
        "Bearer wrong-token",
        "Bearer first-token-and-more",
        "Bearer first-toke",
        "Basic Zmlyc3QtdG9rZW46",
        "first-token",
        "Bearer",
    ] {
        let reply = send(
            h.anonymous(Method::POST, "/v1/jobs")
                .header("authorization", header)
                .body_json(&body),
        )
        .await;
        reply.assert_problem(401, types::UNAUTHORIZED);
    }
    assert_eq!(
        job_count(&h.store.inner).await,
        0,
        "refused requests created nothing"
    );

    for token in ["first-token", "second-token"] {
        let reply = send(
            h.anonymous(Method::POST, "/v1/jobs")
                .header("authorization", format!("Bearer {token}"))
                .body_json(&body),
        )
        .await;
        reply.assert_status(201);
    }
    let reply = send(
        h.anonymous(Method::GET, "/v1/queues")
            .header("authorization", "bearer second-token"),
    )
    .await;
    reply.assert_status(200);
}

#[tokio::test]
async fn authentication_comes_before_reading_the_body_and_before_routing() {
    let h = with_tokens();
    // An unauthenticated oversize or malformed body is refused as unauthenticated.
    let reply = send(
        h.anonymous(Method::POST, "/v1/jobs")
            .content_type("application/json")
            .body("x".repeat(10 * 1024 * 1024)),
    )
    .await;
    reply.assert_problem(401, types::UNAUTHORIZED);
    // Unknown routes and odd spellings of /v1 routes do not reveal or bypass anything.
    for path in [
        "/v1/nope",
        "//v1/jobs",
        "/v1//jobs",
        "/docs/../v1/jobs",
        "/V1/jobs",
        "/",
    ] {
        let reply = send(h.anonymous(Method::GET, path)).await;
        reply.assert_problem(401, types::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn the_operational_routes_stay_open() {
    let h = with_tokens();
    send(h.anonymous(Method::GET, "/health"))
        .await
        .assert_status(200);
    send(h.anonymous(Method::GET, "/openapi.json"))
        .await
        .assert_status(200);
    let docs = send(h.anonymous(Method::GET, "/docs")).await;
    docs.assert_status(200);
    // Not served yet (observability), but open: 404, not 401.
    send(h.anonymous(Method::GET, "/metrics"))
        .await
        .assert_problem(404, types::NOT_FOUND);
}

#[tokio::test]
async fn without_tokens_v1_is_open() {
    let h = Harness::new();
    let reply = send(
        h.anonymous(Method::POST, "/v1/jobs")
            .body_json(&json!({"kind": "k", "payload": 1})),
    )
    .await;
    reply.assert_status(201);
    // A token sent anyway is ignored.
    let reply = send(
        h.anonymous(Method::GET, "/v1/queues")
            .header("authorization", "Bearer anything"),
    )
    .await;
    reply.assert_status(200);
}
