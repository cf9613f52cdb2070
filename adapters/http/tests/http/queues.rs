//! Queues: pause and resume (idempotent, authenticated, refused names), a paused queue's jobs
//! not leased until it is resumed, and `GET /v1/queues` listing every known queue (with a row or
//! with jobs) with its paused state.

use faultline_http::{ApiConfig, problem_types as types};
use faultline_ports::{Clock, JobStore};
use poem::http::Method;
use serde_json::{Value, json};

use crate::common::{Harness, instant, send};

/// Leases what `POST /v1/leases` hands out for `queue` right now (no waiting).
async fn lease_now(h: &Harness, queue: &str) -> Vec<Value> {
    let reply = h
        .post(
            "/v1/leases",
            json!({"worker_id": "w1", "queues": [queue], "limit": 10}),
        )
        .await;
    reply.assert_status(200)["jobs"]
        .as_array()
        .expect("jobs")
        .clone()
}

/// The `GET /v1/queues` entry of `queue`.
async fn summary(h: &Harness, queue: &str) -> Value {
    let reply = h.get("/v1/queues").await;
    let queues = reply.assert_status(200)["queues"]
        .as_array()
        .expect("queues")
        .clone();
    queues
        .into_iter()
        .find(|q| q["queue"] == queue)
        .unwrap_or_else(|| panic!("no {queue} in {reply:?}"))
}

#[tokio::test]
async fn a_paused_queue_keeps_its_jobs_until_it_is_resumed() {
    let h = Harness::new();
    let first = h
        .enqueue(json!({"kind": "k", "queue": "mail", "payload": 1}))
        .await;
    h.enqueue(json!({"kind": "k", "queue": "other", "payload": 2}))
        .await;

    let paused = h.post_empty("/v1/queues/mail/pause").await;
    let paused = paused.assert_status(200).clone();
    assert_eq!(paused["name"], "mail");
    assert_eq!(paused["paused"], true);
    let paused_at = instant(&paused["paused_at"]);
    assert_eq!(paused_at, h.clock.now());
    assert_eq!(instant(&paused["updated_at"]), paused_at);
    assert!(instant(&paused["created_at"]) <= paused_at);

    // Pausing again changes nothing.
    h.clock.advance_ms(1_000);
    let again = h.post_empty("/v1/queues/mail/pause").await;
    assert_eq!(again.assert_status(200), &paused);

    // Enqueues still succeed; nothing of the paused queue is leased, other queues are.
    let second = h
        .enqueue(json!({"kind": "k", "queue": "mail", "payload": 3}))
        .await;
    assert_eq!(lease_now(&h, "mail").await, Vec::<Value>::new());
    assert_eq!(lease_now(&h, "other").await.len(), 1);
    let listed = summary(&h, "mail").await;
    assert_eq!(listed["paused"], true);
    assert_eq!(instant(&listed["paused_at"]), paused_at);
    assert_eq!(listed["counts"]["queued"], 2);
    assert_eq!(summary(&h, "other").await["paused"], false);

    h.clock.advance_ms(1_000);
    let resumed = h.post_empty("/v1/queues/mail/resume").await;
    let resumed = resumed.assert_status(200).clone();
    assert_eq!(resumed["paused"], false);
    // The last pause stays on record; the change is dated.
    assert_eq!(instant(&resumed["paused_at"]), paused_at);
    assert_eq!(instant(&resumed["updated_at"]), h.clock.now());
    assert_eq!(resumed["created_at"], paused["created_at"]);
    let again = h.post_empty("/v1/queues/mail/resume").await;
    assert_eq!(again.assert_status(200), &resumed);

    let leased: Vec<Value> = lease_now(&h, "mail")
        .await
        .iter()
        .map(|job| job["id"].clone())
        .collect();
    assert_eq!(leased, [first["id"].clone(), second["id"].clone()]);
    assert_eq!(summary(&h, "mail").await["paused"], false);
}

#[tokio::test]
async fn queues_without_jobs_are_listed_once_they_have_a_row() {
    let h = Harness::new();
    h.enqueue(json!({"kind": "k", "queue": "b-busy", "payload": 1}))
        .await;
    h.post_empty("/v1/queues/c-idle/pause")
        .await
        .assert_status(200);
    h.post_empty("/v1/queues/a-new/resume")
        .await
        .assert_status(200);

    let reply = h.get("/v1/queues").await;
    let queues = reply.assert_status(200)["queues"].clone();
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-new", "b-busy", "c-idle"], "sorted by name");
    let zero = json!({"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0});
    assert_eq!(
        queues[0],
        json!({"queue": "a-new", "counts": zero, "paused": false})
    );
    assert_eq!(queues[1]["counts"]["queued"], 1);
    assert_eq!(queues[1]["paused"], false);
    assert!(queues[1].get("paused_at").is_none());
    assert_eq!(queues[2]["counts"], zero);
    assert_eq!(queues[2]["paused"], true);
    assert_eq!(instant(&queues[2]["paused_at"]), h.clock.now());
    assert!(queues[2].get("oldest_ready_at").is_none());
}

#[tokio::test]
async fn names_are_percent_decoded_and_bad_ones_refused() {
    let h = Harness::new();
    let spaced = h.post_empty("/v1/queues/mail%20eu/pause").await;
    assert_eq!(spaced.assert_status(200)["name"], "mail eu");
    let rows = h.store.inner.queue_list().await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].name.as_str(), rows[0].paused), ("mail eu", true));
    let unicode = h.post_empty("/v1/queues/%C3%A9t%C3%A9/resume").await;
    assert_eq!(unicode.assert_status(200)["name"], "été");

    for action in ["pause", "resume"] {
        let long = "q".repeat(129);
        let detail = h
            .post_empty(&format!("/v1/queues/{long}/{action}"))
            .await
            .assert_problem(400, types::BAD_REQUEST);
        assert!(detail.contains("name"), "{detail}");
        // 128 characters are fine (and counted as characters, not bytes).
        h.post_empty(&format!("/v1/queues/{}/{action}", "é".repeat(128)))
            .await
            .assert_status(200);
        for control in ["a%07b", "%0A", "tab%09"] {
            let detail = h
                .post_empty(&format!("/v1/queues/{control}/{action}"))
                .await
                .assert_problem(422, types::INVALID_REQUEST);
            assert!(detail.contains("queue"), "{detail}");
        }
        // Not UTF-8 once decoded.
        h.post_empty(&format!("/v1/queues/%FF/{action}"))
            .await
            .assert_problem(400, types::BAD_REQUEST);
        let detail = h
            .post_empty(&format!("/v1/queues//{action}"))
            .await
            .assert_problem(400, types::BAD_REQUEST);
        assert!(detail.contains("name"), "{detail}");
        h.get(&format!("/v1/queues/mail/{action}"))
            .await
            .assert_problem(405, types::METHOD_NOT_ALLOWED);
    }
    let names: Vec<String> = h
        .store
        .inner
        .queue_list()
        .await
        .expect("rows")
        .into_iter()
        .map(|q| q.name)
        .collect();
    // Byte order: "ét" before "éé".
    assert_eq!(
        names,
        ["mail eu".to_owned(), "été".to_owned(), "é".repeat(128)]
    );
}

#[tokio::test]
async fn pausing_needs_a_token_like_every_write() {
    let h = Harness::with_config(ApiConfig {
        api_tokens: vec!["t0ken".into()],
        ..ApiConfig::default()
    });
    for path in ["/v1/queues/mail/pause", "/v1/queues/mail/resume"] {
        send(h.anonymous(Method::POST, path))
            .await
            .assert_problem(401, types::UNAUTHORIZED);
    }
    send(h.anonymous(Method::GET, "/v1/workers"))
        .await
        .assert_problem(401, types::UNAUTHORIZED);
    assert_eq!(h.store.inner.queue_list().await.expect("rows"), []);
    h.post_empty("/v1/queues/mail/pause")
        .await
        .assert_status(200);
    assert!(h.store.inner.queue_list().await.expect("rows")[0].paused);
}

/// `PUT /v1/queues/{name}/limits` with `body`.
async fn put_limits(h: &Harness, queue: &str, body: Value) -> crate::common::Reply {
    send(
        h.request(Method::PUT, &format!("/v1/queues/{queue}/limits"))
            .body_json(&body),
    )
    .await
}

#[tokio::test]
async fn max_running_bounds_what_lease_requests_get_and_shows_in_the_queue_list() {
    let h = Harness::new();
    for n in 0..5 {
        h.enqueue(json!({"kind": "k", "queue": "mail", "payload": n}))
            .await;
    }
    h.clock.advance_ms(1_000);
    let set = put_limits(&h, "mail", json!({"max_running": 2})).await;
    let set = set.assert_status(200).clone();
    assert_eq!(set["name"], "mail");
    assert_eq!(set["max_running"], 2);
    assert_eq!(instant(&set["updated_at"]), h.clock.now());

    let leased = lease_now(&h, "mail").await;
    assert_eq!(leased.len(), 2, "{leased:?}");
    assert!(lease_now(&h, "mail").await.is_empty(), "the bound is taken");
    let listed = summary(&h, "mail").await;
    assert_eq!(listed["max_running"], 2, "{listed}");
    assert_eq!(listed["free_slots"], 0, "{listed}");
    assert_eq!(listed["counts"]["running"], 2, "{listed}");

    // A completion frees a slot.
    let job = &leased[0];
    let done = h
        .post(
            &format!("/v1/jobs/{}/complete", job["id"]),
            json!({"lease_token": job["lease_token"]}),
        )
        .await;
    done.assert_status(200);
    assert_eq!(lease_now(&h, "mail").await.len(), 1);

    // Null (or an absent field) removes the bound; the list then shows none.
    let open = put_limits(&h, "mail", json!({"max_running": null})).await;
    let open = open.assert_status(200).clone();
    assert!(open.get("max_running").is_none(), "{open}");
    assert_eq!(lease_now(&h, "mail").await.len(), 2);
    let listed = summary(&h, "mail").await;
    assert!(listed.get("max_running").is_none(), "{listed}");
    assert!(listed.get("free_slots").is_none(), "{listed}");
    put_limits(&h, "fresh", json!({})).await.assert_status(200);
}

#[tokio::test]
async fn bad_limits_are_refused_with_problems_and_change_nothing() {
    let h = Harness::new();
    put_limits(&h, "mail", json!({"max_running": 3}))
        .await
        .assert_status(200);
    for body in [
        json!({"max_running": 0}),
        json!({"max_running": -1}),
        json!({"max_running": 1_000_001}),
        json!({"max_running": "3"}),
        json!({"max_running": 2.5}),
        json!({"max_runing": 3}),
        json!([3]),
    ] {
        put_limits(&h, "mail", body.clone())
            .await
            .assert_problem(400, types::BAD_REQUEST);
    }
    put_limits(&h, "bad%07name", json!({"max_running": 1}))
        .await
        .assert_problem(422, types::INVALID_REQUEST);
    let text = send(
        h.request(Method::PUT, "/v1/queues/mail/limits")
            .content_type("text/plain")
            .body("max_running=1"),
    )
    .await;
    text.assert_problem(415, types::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(summary(&h, "mail").await["max_running"], 3);
}
