//! Jobs and queues: enqueue (single, idempotent, batch), get, list, cancel, retry, queue stats.

use chrono::TimeDelta;
use faultline_http::problem_types as types;
use faultline_ports::{Clock, JobStore};
use poem::http::Method;
use serde_json::{Value, json};

use crate::common::{Harness, instant, send};

#[tokio::test]
async fn enqueue_returns_201_with_location_and_every_field() {
    let h = Harness::new();
    let reply = h
        .post(
            "/v1/jobs",
            json!({
                "kind": "email.send",
                "payload": {"to": "a@example.com", "n": [1, 2]},
                "queue": "mail",
                "priority": -3,
                "delay_seconds": 2.5,
                "max_attempts": 7,
                "timeout_seconds": 90,
                "backoff": {"base_seconds": 0.5, "cap_seconds": 60, "jitter": 0.25},
                "idempotency_key": "order-1"
            }),
        )
        .await;
    let job = reply.assert_status(201);
    let id = job["id"].as_i64().expect("an id");
    assert_eq!(
        reply.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    assert_eq!(job["kind"], "email.send");
    assert_eq!(job["payload"], json!({"to": "a@example.com", "n": [1, 2]}));
    assert_eq!(job["queue"], "mail");
    assert_eq!(job["priority"], -3);
    assert_eq!(job["state"], "queued");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["max_attempts"], 7);
    assert_eq!(job["fencing_token"], 0);
    assert_eq!(job["cancel_requested"], false);
    assert_eq!(job["timeout_seconds"], 90.0);
    assert_eq!(
        job["backoff"],
        json!({"base_seconds": 0.5, "cap_seconds": 60.0, "jitter": 0.25})
    );
    assert_eq!(job["idempotency_key"], "order-1");
    assert_eq!(instant(&job["created_at"]), h.clock.now());
    assert_eq!(
        instant(&job["next_run_at"]),
        h.clock.now() + TimeDelta::milliseconds(2500)
    );
    assert!(job["lease_expires_at"].is_null());
    assert!(job["finished_at"].is_null());

    let stored = h.store.inner.job_get(id).await.expect("stored");
    assert_eq!(
        (stored.next_run_at - stored.created_at).num_milliseconds(),
        2500
    );
    assert_eq!(stored.retry_policy.base_ms, 500);
    assert_eq!(stored.timeout_ms, Some(90_000));

    let read = h.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(read.assert_status(200), job);
}

#[tokio::test]
async fn enqueue_applies_the_documented_defaults() {
    let h = Harness::new();
    let job = h.enqueue(json!({"kind": "k", "payload": null})).await;
    assert_eq!(job["queue"], "default");
    assert_eq!(job["priority"], 0);
    assert_eq!(job["max_attempts"], 25);
    assert_eq!(job["payload"], Value::Null);
    assert_eq!(
        job["backoff"],
        json!({"base_seconds": 1.0, "cap_seconds": 3600.0, "jitter": 0.1})
    );
    assert!(job["timeout_seconds"].is_null());
    assert!(job["idempotency_key"].is_null());
    assert_eq!(instant(&job["next_run_at"]), instant(&job["created_at"]));
}

#[tokio::test]
async fn run_at_schedules_the_job() {
    let h = Harness::new();
    let job = h
        .enqueue(json!({"kind": "k", "payload": 1, "run_at": "2031-05-06T07:08:09.123456Z"}))
        .await;
    assert_eq!(job["next_run_at"], "2031-05-06T07:08:09.123456+00:00");
}

#[tokio::test]
async fn idempotent_enqueue_replays_with_200_and_conflicts_with_409() {
    let h = Harness::new();
    let first = h
        .post(
            "/v1/jobs",
            json!({"kind": "k", "payload": {"a": 1, "b": [1, 2]}, "idempotency_key": "key-1"}),
        )
        .await;
    let id = first.assert_status(201)["id"].clone();

    // Same request, keys in another order: the canonical payload is the same.
    let replay = h
        .post(
            "/v1/jobs",
            json!({"idempotency_key": "key-1", "payload": {"b": [1, 2], "a": 1}, "kind": "k"}),
        )
        .await;
    assert_eq!(replay.assert_status(200)["id"], id);
    assert!(replay.header("location").is_none());

    let conflict = h
        .post(
            "/v1/jobs",
            json!({"kind": "k", "payload": {"a": 2}, "idempotency_key": "key-1"}),
        )
        .await;
    let detail = conflict.assert_problem(409, types::IDEMPOTENCY_CONFLICT);
    assert!(detail.contains("key-1"), "{detail}");
    assert_eq!(conflict.json["job_id"], id);

    let other_queue = h
        .post(
            "/v1/jobs",
            json!({"kind": "k", "queue": "q2", "payload": {"a": 1, "b": [1, 2]}, "idempotency_key": "key-1"}),
        )
        .await;
    other_queue.assert_problem(409, types::IDEMPOTENCY_CONFLICT);

    let page = h.get("/v1/jobs").await;
    assert_eq!(page.assert_status(200)["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_idempotency_key_may_come_as_a_header() {
    let h = Harness::new();
    let created = send(
        h.request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", "hdr-1")
            .body_json(&json!({"kind": "k", "payload": 1})),
    )
    .await;
    let job = created.assert_status(201).clone();
    assert_eq!(job["idempotency_key"], "hdr-1");

    // Header and field agreeing: a replay.
    let same = send(
        h.request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", "hdr-1")
            .body_json(&json!({"kind": "k", "payload": 1, "idempotency_key": "hdr-1"})),
    )
    .await;
    assert_eq!(same.assert_status(200)["id"], job["id"]);

    // The field alone names the same job.
    let field = h
        .post(
            "/v1/jobs",
            json!({"kind": "k", "payload": 1, "idempotency_key": "hdr-1"}),
        )
        .await;
    assert_eq!(field.assert_status(200)["id"], job["id"]);

    let differing = send(
        h.request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", "hdr-2")
            .body_json(&json!({"kind": "k", "payload": 1, "idempotency_key": "hdr-1"})),
    )
    .await;
    let detail = differing.assert_problem(422, types::INVALID_REQUEST);
    assert!(detail.contains("Idempotency-Key"), "{detail}");

    let too_long = send(
        h.request(Method::POST, "/v1/jobs")
            .header("Idempotency-Key", "k".repeat(129))
            .body_json(&json!({"kind": "k", "payload": 1})),
    )
    .await;
    too_long.assert_problem(400, types::BAD_REQUEST);
}

#[tokio::test]
async fn batch_enqueue_reports_an_outcome_per_item() {
    let h = Harness::new();
    let existing = h
        .enqueue(json!({"kind": "k", "payload": 1, "idempotency_key": "a"}))
        .await;
    let reply = h
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"kind": "k", "payload": 2},
                {"kind": "k", "payload": 1, "idempotency_key": "a"},
                {"kind": "k", "payload": 3, "idempotency_key": "a"},
                {"kind": "k", "payload": 4, "idempotency_key": "b"},
                {"kind": "k", "payload": 4, "idempotency_key": "b"},
            ]}),
        )
        .await;
    let results = reply.assert_status(200)["results"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(results.len(), 5);
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["created", "existing", "conflict", "created", "existing"]
    );
    assert_eq!(results[1]["job_id"], existing["id"]);
    assert_eq!(results[2]["job_id"], existing["id"]);
    assert_eq!(results[4]["job_id"], results[3]["job_id"]);
    let created = h.get(&format!("/v1/jobs/{}", results[0]["job_id"])).await;
    assert_eq!(created.assert_status(200)["payload"], 2);
}

#[tokio::test]
async fn an_invalid_batch_item_refuses_the_whole_batch() {
    let h = Harness::with_config(faultline_http::ApiConfig {
        max_payload_bytes: 100,
        ..Default::default()
    });
    let invalid = h
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"kind": "ok", "payload": 1},
                {"kind": "bad\u{7}kind", "payload": 1},
            ]}),
        )
        .await;
    let detail = invalid.assert_problem(422, types::INVALID_REQUEST);
    assert_eq!(detail, "item 1: kind must not contain control characters");

    let oversize = h
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "ok", "payload": "x".repeat(200)}]}),
        )
        .await;
    let detail = oversize.assert_problem(413, types::PAYLOAD_TOO_LARGE);
    assert!(
        detail.starts_with("item 0: payload is 202 bytes"),
        "{detail}"
    );

    let page = h.get("/v1/jobs").await;
    assert_eq!(
        page.assert_status(200)["jobs"],
        json!([]),
        "nothing was created"
    );

    h.post("/v1/jobs/batch", json!({"jobs": []}))
        .await
        .assert_problem(400, types::BAD_REQUEST);
    let too_many: Vec<Value> = (0..1001)
        .map(|n| json!({"kind": "k", "payload": n}))
        .collect();
    h.post("/v1/jobs/batch", json!({ "jobs": too_many }))
        .await
        .assert_problem(400, types::BAD_REQUEST);
}

#[tokio::test]
async fn get_job_answers_404_for_unknown_and_400_for_malformed_ids() {
    let h = Harness::new();
    let missing = h.get("/v1/jobs/12345").await;
    missing.assert_problem(404, types::JOB_NOT_FOUND);
    assert_eq!(missing.json["job_id"], 12345);
    for id in ["0", "-4"] {
        h.get(&format!("/v1/jobs/{id}"))
            .await
            .assert_problem(404, types::JOB_NOT_FOUND);
    }
    for bad in ["abc", "1.5", "99999999999999999999", "%20"] {
        h.get(&format!("/v1/jobs/{bad}"))
            .await
            .assert_problem(400, types::BAD_REQUEST);
    }
}

#[tokio::test]
async fn list_jobs_filters_and_pages_newest_first() {
    let h = Harness::new();
    let mut ids = Vec::new();
    for n in 0..5 {
        let queue = if n % 2 == 0 { "even" } else { "odd" };
        let job = h
            .enqueue(json!({"kind": format!("k{}", n % 3), "queue": queue, "payload": n}))
            .await;
        ids.push(job["id"].as_i64().unwrap());
    }
    let ids_of = |reply: &Value| -> Vec<i64> {
        reply["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_i64().unwrap())
            .collect()
    };

    let first = h.get("/v1/jobs?limit=2").await;
    let first = first.assert_status(200);
    assert_eq!(ids_of(first), [ids[4], ids[3]]);
    let cursor = first["next_cursor"].as_i64().expect("a cursor");
    let second = h.get(&format!("/v1/jobs?limit=2&cursor={cursor}")).await;
    let second = second.assert_status(200);
    assert_eq!(ids_of(second), [ids[2], ids[1]]);
    let cursor = second["next_cursor"].as_i64().expect("a cursor");
    let last = h.get(&format!("/v1/jobs?limit=2&cursor={cursor}")).await;
    let last = last.assert_status(200);
    assert_eq!(ids_of(last), [ids[0]]);
    assert!(last["next_cursor"].is_null());

    let even = h.get("/v1/jobs?queue=even").await;
    assert_eq!(ids_of(even.assert_status(200)), [ids[4], ids[2], ids[0]]);
    let kind = h.get("/v1/jobs?kind=k1&queue=odd").await;
    assert_eq!(ids_of(kind.assert_status(200)), [ids[1]]);
    let queued = h.get("/v1/jobs?state=queued&limit=1000").await;
    assert_eq!(ids_of(queued.assert_status(200)).len(), 5);
    let running = h.get("/v1/jobs?state=running").await;
    assert_eq!(ids_of(running.assert_status(200)), Vec::<i64>::new());

    for bad in [
        "state=paused",
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=x",
        "queue=",
        &format!("kind={}", "k".repeat(129)),
    ] {
        h.get(&format!("/v1/jobs?{bad}"))
            .await
            .assert_problem(400, types::BAD_REQUEST);
    }
    h.get("/v1/jobs?queue=a%07b")
        .await
        .assert_problem(422, types::INVALID_REQUEST);
}

#[tokio::test]
async fn cancel_ends_queued_jobs_marks_running_ones_and_refuses_finished_ones() {
    let h = Harness::new();
    let queued = h
        .enqueue(json!({"kind": "k", "queue": "a", "payload": 1}))
        .await;
    let cancelled = h
        .post_empty(&format!("/v1/jobs/{}/cancel", queued["id"]))
        .await;
    let cancelled = cancelled.assert_status(200);
    assert_eq!(cancelled["state"], "cancelled");
    assert!(!cancelled["finished_at"].is_null());

    // A finished job cannot be cancelled.
    h.post_empty(&format!("/v1/jobs/{}/cancel", queued["id"]))
        .await
        .assert_problem(409, types::ILLEGAL_TRANSITION);

    h.enqueue(json!({"kind": "k", "queue": "b", "payload": 1}))
        .await;
    let leased = h.lease_one("b").await;
    let marked = h
        .post_empty(&format!("/v1/jobs/{}/cancel", leased["id"]))
        .await;
    let marked = marked.assert_status(200);
    assert_eq!(marked["state"], "running");
    assert_eq!(marked["cancel_requested"], true);

    // The worker learns it at its next heartbeat.
    let beat = h
        .post(
            &format!("/v1/jobs/{}/heartbeat", leased["id"]),
            json!({"lease_token": leased["lease_token"], "extend_seconds": 10}),
        )
        .await;
    assert_eq!(beat.assert_status(200)["cancel_requested"], true);

    // Its failure then ends the job cancelled rather than retried.
    let failed = h
        .post(
            &format!("/v1/jobs/{}/fail", leased["id"]),
            json!({"lease_token": leased["lease_token"], "error": "stopped"}),
        )
        .await;
    assert_eq!(failed.assert_status(200)["state"], "cancelled");

    h.post_empty("/v1/jobs/999/cancel")
        .await
        .assert_problem(404, types::JOB_NOT_FOUND);
}

#[tokio::test]
async fn retry_requeues_failed_jobs_with_a_fresh_attempt_budget() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "r", "payload": 1, "max_attempts": 2}))
        .await;
    let leased = h.lease_one("r").await;
    let id = leased["id"].clone();
    let failed = h
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease_token": leased["lease_token"], "error": "boom", "retryable": false}),
        )
        .await;
    let failed = failed.assert_status(200);
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["attempts"], 1);

    let retried = h.post_empty(&format!("/v1/jobs/{id}/retry")).await;
    let retried = retried.assert_status(200);
    assert_eq!(retried["state"], "queued");
    assert_eq!(retried["attempts"], 0);
    assert_eq!(retried["last_error"], "boom");
    assert!(retried["finished_at"].is_null());

    // The old lease stays stale; the next lease is attempt 1 again with a newer token.
    h.post(
        &format!("/v1/jobs/{id}/complete"),
        json!({"lease_token": leased["lease_token"]}),
    )
    .await
    .assert_problem(409, types::STALE_LEASE);
    let again = h.lease_one("r").await;
    assert_eq!(again["attempt"], 1);
    assert!(again["lease_token"].as_i64() > leased["lease_token"].as_i64());

    // Only failed or cancelled jobs can be retried.
    h.post_empty(&format!("/v1/jobs/{id}/retry"))
        .await
        .assert_problem(409, types::ILLEGAL_TRANSITION);
    h.post_empty("/v1/jobs/424242/retry")
        .await
        .assert_problem(404, types::JOB_NOT_FOUND);
}

#[tokio::test]
async fn queues_report_counts_by_state_and_the_oldest_ready_age() {
    let h = Harness::new();
    assert_eq!(
        h.get("/v1/queues").await.assert_status(200)["queues"],
        json!([])
    );

    h.enqueue(json!({"kind": "k", "queue": "alpha", "payload": 1}))
        .await;
    h.enqueue(json!({"kind": "k", "queue": "alpha", "payload": 2}))
        .await;
    h.enqueue(json!({"kind": "k", "queue": "beta", "payload": 3, "delay_seconds": 3600}))
        .await;
    h.lease_one("alpha").await;

    let reply = h.get("/v1/queues").await;
    let queues = reply.assert_status(200)["queues"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[0]["queue"], "alpha");
    assert_eq!(
        queues[0]["counts"],
        json!({"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0})
    );
    // The store's clock stands 60 s behind the API's: the due job has waited that long.
    assert_eq!(instant(&queues[0]["oldest_ready_at"]), h.clock.now());
    let age = queues[0]["oldest_ready_age_seconds"]
        .as_f64()
        .expect("an age");
    assert!((60.0..600.0).contains(&age), "{age}");

    // Nothing due in beta: no age.
    assert_eq!(queues[1]["queue"], "beta");
    assert_eq!(queues[1]["counts"]["queued"], 1);
    assert!(queues[1]["oldest_ready_at"].is_null());
    assert!(queues[1]["oldest_ready_age_seconds"].is_null());
}

#[tokio::test]
async fn expire_lease_ends_a_running_lease_now_and_fences_its_holder() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "x", "payload": 1, "max_attempts": 2}))
        .await;
    let leased = h.lease_one("x").await;
    let id = leased["id"].clone();
    let expired = h.post_empty(&format!("/v1/jobs/{id}/expire-lease")).await;
    let expired = expired.assert_status(200);
    assert_eq!(expired["state"], "queued", "{expired}");
    assert_eq!(expired["attempts"], 1, "the attempt counts: {expired}");
    assert!(expired["lease_expires_at"].is_null(), "{expired}");
    let errors = expired["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{expired}");
    assert_eq!(errors[0]["kind"], "lease_expired");
    assert_eq!(errors[0]["worker"], "w1");
    assert_eq!(errors[0]["fencing_token"], leased["lease_token"]);

    // The holder's next heartbeat is refused: it stops.
    h.post(
        &format!("/v1/jobs/{id}/heartbeat"),
        json!({"lease_token": leased["lease_token"], "extend_seconds": 10}),
    )
    .await
    .assert_problem(409, types::STALE_LEASE);
    // Not running any more: nothing to expire.
    let detail = h
        .post_empty(&format!("/v1/jobs/{id}/expire-lease"))
        .await
        .assert_problem(409, types::ILLEGAL_TRANSITION);
    assert!(detail.contains("queued"), "{detail}");
    // The last attempt: expiring its lease fails the job.
    h.clock.advance_ms(60_000);
    let again = h.lease_one("x").await;
    assert_eq!(again["attempt"], 2);
    let failed = h.post_empty(&format!("/v1/jobs/{id}/expire-lease")).await;
    assert_eq!(failed.assert_status(200)["state"], "failed");

    h.post_empty("/v1/jobs/424242/expire-lease")
        .await
        .assert_problem(404, types::JOB_NOT_FOUND);
    h.post_empty("/v1/jobs/abc/expire-lease")
        .await
        .assert_problem(400, types::BAD_REQUEST);
    h.store.set_mode(crate::common::Mode::Fail);
    let reply = h.post_empty(&format!("/v1/jobs/{id}/expire-lease")).await;
    reply.assert_problem(503, types::STORAGE_UNAVAILABLE);
    assert!(reply.header("retry-after").is_some(), "{reply:?}");
}
