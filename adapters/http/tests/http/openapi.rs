//! The OpenAPI document: what the server serves is what `docs/openapi.json` holds (set
//! `UPDATE_OPENAPI=1` to rewrite the file), it declares the problem responses and the bearer
//! scheme everywhere they apply, and Swagger UI is served.

use std::path::PathBuf;

use faultline_http::PROBLEM_CONTENT_TYPE;
use serde_json::Value;

use crate::common::Harness;

/// Set to rewrite `docs/openapi.json` from the served document.
const UPDATE_ENV: &str = "UPDATE_OPENAPI";

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[tokio::test]
async fn the_served_document_is_the_committed_one() {
    let h = Harness::new();
    let reply = h.get("/openapi.json").await;
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json"))
    );
    let served = reply.text.clone();
    assert_eq!(served, faultline_http::openapi_json());
    let served = format!("{served}\n");

    let path = committed_path();
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::write(&path, &served).expect("docs/openapi.json is writable");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == served,
        "docs/openapi.json differs from the served document; regenerate it with \
         `UPDATE_OPENAPI=1 cargo nextest run -p faultline-http --test http the_served_document_is_the_committed_one` \
         and review the diff"
    );
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            ops.push((path.clone(), method.clone(), op));
        }
    }
    ops
}

#[test]
fn every_v1_operation_declares_bearer_auth_and_problem_responses() {
    let doc: Value = serde_json::from_str(&faultline_http::openapi_json()).expect("JSON");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let ops = operations(&doc);
    assert_eq!(
        ops.len(),
        18,
        "{:?}",
        ops.iter().map(|o| (&o.0, &o.1)).collect::<Vec<_>>()
    );
    for (path, method, op) in ops {
        let name = format!("{method} {path}");
        assert!(op["operationId"].is_string(), "{name}");
        if path.starts_with("/v1/") {
            assert_eq!(
                op["security"],
                serde_json::json!([{"bearerAuth": []}]),
                "{name}"
            );
            let responses = op["responses"].as_object().unwrap();
            for status in ["401", "503", "4XX", "5XX"] {
                assert!(responses.contains_key(status), "{name} lacks {status}");
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"][PROBLEM_CONTENT_TYPE]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{name} {status}"
                    );
                }
            }
            let has_503_retry_after = responses["503"]["headers"]
                .as_object()
                .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("retry-after")));
            assert!(has_503_retry_after, "{name}");
            assert!(!responses.contains_key("default"), "{name}");
        } else {
            assert_eq!(path, "/health");
            assert!(op.get("security").is_none(), "{name}");
        }
    }
}

#[tokio::test]
async fn swagger_ui_is_served_at_docs() {
    let h = Harness::new();
    let reply = h.get("/docs").await;
    reply.assert_status(200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/html"))
    );
    assert!(
        reply.text.contains("swagger"),
        "{}",
        &reply.text[..200.min(reply.text.len())]
    );
}
