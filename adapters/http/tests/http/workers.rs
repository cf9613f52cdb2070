//! The worker protocol: lease, heartbeat, complete, fail, snooze, stale tokens, long polling.

use std::time::Duration;

use chrono::TimeDelta;
use faultline_http::{ApiConfig, problem_types as types};
use faultline_ports::{Clock, JobStore};
use serde_json::json;
use tokio::time::Instant;

use crate::common::{Harness, instant};

#[tokio::test]
async fn a_worker_leases_heartbeats_and_completes_a_job() {
    let h = Harness::new();
    let job = h
        .enqueue(
            json!({"kind": "resize", "queue": "img", "payload": {"w": 10}, "timeout_seconds": 5}),
        )
        .await;
    let reply = h
        .post(
            "/v1/leases",
            json!({"worker_id": "w-7", "queues": ["img"], "kinds": ["resize"], "limit": 5, "lease_seconds": 12.5}),
        )
        .await;
    let jobs = reply.assert_status(200)["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    let leased = &jobs[0];
    assert_eq!(leased["id"], job["id"]);
    assert_eq!(leased["kind"], "resize");
    assert_eq!(leased["queue"], "img");
    assert_eq!(leased["payload"], json!({"w": 10}));
    assert_eq!(leased["attempt"], 1);
    assert_eq!(leased["max_attempts"], 25);
    assert_eq!(leased["lease_token"], 1);
    assert_eq!(leased["timeout_seconds"], 5.0);
    assert_eq!(
        instant(&leased["lease_expires_at"]),
        h.clock.now() + TimeDelta::milliseconds(12_500)
    );
    let id = leased["id"].as_i64().unwrap();
    let token = leased["lease_token"].clone();

    let view = h.get(&format!("/v1/jobs/{id}")).await;
    let view = view.assert_status(200);
    assert_eq!(view["state"], "running");
    assert_eq!(view["lease_owner"], "w-7");

    h.clock.advance_ms(1_000);
    let beat = h
        .post(
            &format!("/v1/jobs/{id}/heartbeat"),
            json!({"lease_token": token, "extend_seconds": 60}),
        )
        .await;
    let beat = beat.assert_status(200);
    assert_eq!(beat["cancel_requested"], false);
    assert_eq!(
        instant(&beat["lease_expires_at"]),
        h.clock.now() + TimeDelta::seconds(60)
    );

    let done = h
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease_token": token, "result": {"ok": true}}),
        )
        .await;
    let done = done.assert_status(200);
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["result"], json!({"ok": true}));
    assert_eq!(instant(&done["finished_at"]), h.clock.now());

    // The lease is gone now: every lease-holder write is a stale-lease conflict.
    for (action, body) in [
        ("heartbeat", json!({"lease_token": token})),
        ("complete", json!({"lease_token": token})),
        ("fail", json!({"lease_token": token, "error": "late"})),
        ("snooze", json!({"lease_token": token, "delay_seconds": 1})),
    ] {
        let reply = h.post(&format!("/v1/jobs/{id}/{action}"), body).await;
        let detail = reply.assert_problem(409, types::STALE_LEASE);
        assert!(detail.contains(&format!("job {id}")), "{action}: {detail}");
        assert_eq!(reply.json["job_id"], id);
    }

    // Nothing left to lease.
    let empty = h
        .post("/v1/leases", json!({"worker_id": "w-7", "queues": ["img"]}))
        .await;
    assert_eq!(empty.assert_status(200)["jobs"], json!([]));
}

#[tokio::test]
async fn a_wrong_token_or_an_unknown_job_is_a_stale_lease() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "q", "payload": 1}))
        .await;
    let leased = h.lease_one("q").await;
    let id = leased["id"].as_i64().unwrap();
    let wrong = leased["lease_token"].as_i64().unwrap() + 1;
    h.post(
        &format!("/v1/jobs/{id}/complete"),
        json!({"lease_token": wrong}),
    )
    .await
    .assert_problem(409, types::STALE_LEASE);
    h.post("/v1/jobs/9999/heartbeat", json!({"lease_token": 1}))
        .await
        .assert_problem(409, types::STALE_LEASE);
    // The rightful holder is unaffected.
    let view = h.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(view.assert_status(200)["state"], "running");
}

#[tokio::test]
async fn failures_retry_with_the_given_delay_until_the_budget_is_spent() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "f", "payload": 1, "max_attempts": 2}))
        .await;
    let first = h.lease_one("f").await;
    let id = first["id"].as_i64().unwrap();
    let retried = h
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease_token": first["lease_token"], "error": "flaky", "retry_after_seconds": 2.5}),
        )
        .await;
    let retried = retried.assert_status(200);
    assert_eq!(retried["state"], "queued");
    assert_eq!(retried["attempts"], 1);
    assert_eq!(retried["last_error"], "flaky");
    assert_eq!(
        instant(&retried["next_run_at"]),
        h.clock.now() + TimeDelta::milliseconds(2_500)
    );

    // Not due yet, then due.
    let early = h
        .post("/v1/leases", json!({"worker_id": "w", "queues": ["f"]}))
        .await;
    assert_eq!(early.assert_status(200)["jobs"], json!([]));
    h.clock.advance_ms(2_500);
    let second = h.lease_one("f").await;
    assert_eq!(second["attempt"], 2);

    // The last attempt fails for good, retryable or not; the error is kept (cut when huge).
    let long_error = "e".repeat(70_000);
    let failed = h
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease_token": second["lease_token"], "error": long_error}),
        )
        .await;
    let failed = failed.assert_status(200);
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["last_error"].as_str().unwrap().len(), 65_536);
}

#[tokio::test]
async fn a_permanent_failure_ends_the_job_at_once() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "p", "payload": 1}))
        .await;
    let leased = h.lease_one("p").await;
    let failed = h
        .post(
            &format!("/v1/jobs/{}/fail", leased["id"]),
            json!({"lease_token": leased["lease_token"], "error": "bad input\u{0}", "retryable": false}),
        )
        .await;
    let failed = failed.assert_status(200);
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["attempts"], 1);
    // NUL cannot be stored in PostgreSQL text: it is replaced.
    assert_eq!(failed["last_error"], "bad input\u{FFFD}");
}

#[tokio::test]
async fn snooze_gives_the_attempt_back() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "s", "payload": 1}))
        .await;
    let leased = h.lease_one("s").await;
    let snoozed = h
        .post(
            &format!("/v1/jobs/{}/snooze", leased["id"]),
            json!({"lease_token": leased["lease_token"], "delay_seconds": 30}),
        )
        .await;
    let snoozed = snoozed.assert_status(200);
    assert_eq!(snoozed["state"], "queued");
    assert_eq!(snoozed["attempts"], 0);
    assert_eq!(
        instant(&snoozed["next_run_at"]),
        h.clock.now() + TimeDelta::seconds(30)
    );
}

#[tokio::test]
async fn lease_requests_are_validated() {
    let h = Harness::new();
    for bad in [
        json!({"queues": ["q"]}),
        json!({"worker_id": "w"}),
        json!({"worker_id": "w", "queues": []}),
        json!({"worker_id": "w", "queues": [""]}),
        json!({"worker_id": "w", "queues": ["q"], "limit": 0}),
        json!({"worker_id": "w", "queues": ["q"], "limit": 1001}),
        json!({"worker_id": "w", "queues": ["q"], "lease_seconds": 0}),
        json!({"worker_id": "w", "queues": ["q"], "lease_seconds": 31_536_001}),
        json!({"worker_id": "w", "queues": ["q"], "wait_seconds": 30.5}),
        json!({"worker_id": "w", "queues": ["q"], "wait_seconds": -1}),
        json!({"worker_id": "w", "queues": ["q"], "kinds": "k"}),
        json!({"worker_id": 1, "queues": ["q"]}),
        json!({"worker_id": "w", "queues": [1]}),
        json!({"worker_id": "w", "queues": ["q"], "surprise": 1}),
    ] {
        h.post("/v1/leases", bad.clone())
            .await
            .assert_problem(400, types::BAD_REQUEST);
    }
    let detail = h
        .post(
            "/v1/leases",
            json!({"worker_id": "w", "queues": ["a\u{1b}b"]}),
        )
        .await
        .assert_problem(422, types::INVALID_REQUEST);
    assert_eq!(detail, "queue must not contain control characters");
    h.post("/v1/leases", json!({"worker_id": "w\n", "queues": ["q"]}))
        .await
        .assert_problem(422, types::INVALID_REQUEST);
}

#[tokio::test]
async fn lease_holder_writes_are_validated() {
    let h = Harness::with_config(ApiConfig {
        max_payload_bytes: 64,
        ..ApiConfig::default()
    });
    h.enqueue(json!({"kind": "k", "queue": "v", "payload": 1}))
        .await;
    let leased = h.lease_one("v").await;
    let id = leased["id"].as_i64().unwrap();
    let token = leased["lease_token"].clone();
    for (action, body) in [
        ("heartbeat", json!({"lease_token": "x"})),
        (
            "heartbeat",
            json!({"lease_token": token, "extend_seconds": 0}),
        ),
        ("heartbeat", json!({})),
        ("complete", json!({"result": 1})),
        ("fail", json!({"lease_token": token})),
        ("fail", json!({"lease_token": token, "error": 500})),
        (
            "fail",
            json!({"lease_token": token, "error": "e", "retry_after_seconds": -1}),
        ),
        ("snooze", json!({"lease_token": token})),
        (
            "snooze",
            json!({"lease_token": token, "delay_seconds": 31_536_001}),
        ),
    ] {
        h.post(&format!("/v1/jobs/{id}/{action}"), body.clone())
            .await
            .assert_problem(400, types::BAD_REQUEST);
    }
    h.post(
        &format!("/v1/jobs/{id}/complete"),
        json!({"lease_token": token, "result": {"text": "nul\u{0}"}}),
    )
    .await
    .assert_problem(422, types::INVALID_REQUEST);
    let detail = h
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease_token": token, "result": "r".repeat(100)}),
        )
        .await
        .assert_problem(413, types::PAYLOAD_TOO_LARGE);
    assert_eq!(detail, "result is 102 bytes of JSON; the limit is 64 bytes");
    // None of it touched the lease.
    let done = h
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease_token": token}),
        )
        .await;
    assert_eq!(done.assert_status(200)["state"], "succeeded");
}

/// Long-poll config: the poll interval is far beyond any wait, so only a wake-up (or the end of
/// the wait) can end a poll early.
fn long_poll_config() -> ApiConfig {
    ApiConfig {
        lease_poll_interval: Duration::from_secs(3600),
        ..ApiConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_wakes_up_when_a_job_arrives() {
    let h = Harness::with_config(long_poll_config());
    let mut claims = h.store.claims();
    let started = Instant::now();
    let request = h.post(
        "/v1/leases",
        json!({"worker_id": "w", "queues": ["lp"], "wait_seconds": 30}),
    );
    let enqueue_then_wake = async {
        // Wait until the request has made its first (empty) claim and is waiting.
        claims.changed().await.expect("a claim");
        h.store
            .inner
            .job_enqueue(&faultline_ports::domain::JobSpec::new("k", json!(1)).queue("lp"))
            .await
            .expect("enqueued");
        h.wake.send_modify(|n| *n += 1);
    };
    let (reply, ()) = tokio::join!(request, enqueue_then_wake);
    let jobs = reply.assert_status(200)["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1, "{reply:?}");
    // Paused time only moves when everything waits: the wake-up ended the poll, not the deadline.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(*claims.borrow(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_answers_empty_at_the_deadline_and_claims_again_on_its_poll_interval() {
    let h = Harness::with_config(ApiConfig {
        lease_poll_interval: Duration::from_secs(2),
        ..ApiConfig::default()
    });
    let started = Instant::now();
    let reply = h
        .post(
            "/v1/leases",
            json!({"worker_id": "w", "queues": ["lp"], "wait_seconds": 7}),
        )
        .await;
    assert_eq!(reply.assert_status(200)["jobs"], json!([]));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    // Claims at 0, 2, 4, 6 and at the deadline (7).
    assert_eq!(*h.store.claims().borrow(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_job_that_becomes_due_by_the_clock_is_found_by_polling() {
    let h = Harness::with_config(ApiConfig {
        lease_poll_interval: Duration::from_secs(1),
        ..ApiConfig::default()
    });
    h.enqueue(json!({"kind": "k", "queue": "later", "payload": 1, "delay_seconds": 5}))
        .await;
    let mut claims = h.store.claims();
    let request = h.post(
        "/v1/leases",
        json!({"worker_id": "w", "queues": ["later"], "wait_seconds": 30}),
    );
    let advance_store_clock = async {
        claims.changed().await.expect("a first claim");
        // The store's clock passes the due time; no wake-up is sent.
        h.clock.advance_ms(5_000);
    };
    let started = Instant::now();
    let (reply, ()) = tokio::join!(request, advance_store_clock);
    assert_eq!(
        reply.assert_status(200)["jobs"].as_array().unwrap().len(),
        1
    );
    assert!(
        started.elapsed() <= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_long_poll_at_once() {
    let h = Harness::with_config(long_poll_config());
    let mut claims = h.store.claims();
    let started = Instant::now();
    let request = h.post(
        "/v1/leases",
        json!({"worker_id": "w", "queues": ["lp"], "wait_seconds": 30}),
    );
    let shut_down = async {
        claims.changed().await.expect("a claim");
        h.shutdown.cancel();
    };
    let (reply, ()) = tokio::join!(request, shut_down);
    assert_eq!(reply.assert_status(200)["jobs"], json!([]));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn every_failed_attempt_is_kept_in_the_jobs_errors() {
    let h = Harness::new();
    let job = h
        .enqueue(json!({
            "kind": "k",
            "queue": "hist",
            "payload": 1,
            "backoff": {"base_seconds": 0, "cap_seconds": 0, "jitter": 0}
        }))
        .await;
    let id = job["id"].as_i64().unwrap();
    assert_eq!(job["errors"], json!([]));

    // Attempt 1 fails by report.
    let leased = h.lease_one("hist").await;
    let failed = h
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease_token": leased["lease_token"], "error": "upstream said no"}),
        )
        .await;
    let failed = failed.assert_status(200).clone();
    assert_eq!(failed["state"], "queued");
    let errors = failed["errors"].as_array().expect("errors").clone();
    assert_eq!(errors.len(), 1, "{failed}");
    assert_eq!(instant(&errors[0]["at"]), h.clock.now());
    let mut entry = errors[0].clone();
    entry.as_object_mut().unwrap().remove("at");
    assert_eq!(
        entry,
        json!({
            "attempt": 1,
            "worker": "w1",
            "fencing_token": leased["lease_token"],
            "error": "upstream said no",
            "kind": "error"
        })
    );

    // Attempt 2 ends by an expired lease, rescued by the store.
    let second = h.lease_one("hist").await;
    h.clock.advance_ms(31_000);
    let rescued = h.store.inner.job_rescue_expired(10).await.expect("rescue");
    assert_eq!(rescued.len(), 1);

    let view = h.get(&format!("/v1/jobs/{id}")).await;
    let view = view.assert_status(200).clone();
    let errors = view["errors"].as_array().expect("errors").clone();
    assert_eq!(errors.len(), 2, "oldest first: {view}");
    assert_eq!(errors[0]["error"], "upstream said no");
    assert_eq!(errors[1]["attempt"], 2);
    assert_eq!(errors[1]["kind"], "lease_expired");
    assert_eq!(errors[1]["worker"], "w1");
    assert_eq!(errors[1]["fencing_token"], second["lease_token"]);
    assert_eq!(instant(&errors[1]["at"]), h.clock.now());
    assert_eq!(view["last_error"], errors[1]["error"]);

    // Every job view carries them: the list too.
    let page = h.get("/v1/jobs?queue=hist").await;
    assert_eq!(page.assert_status(200)["jobs"][0]["errors"], view["errors"]);
}
