//! `GET /v1/workers`: the registered processes, sorted by id, with the holder of an unexpired
//! maintenance leadership marked; the leadership itself, also once it lapsed.

use faultline_ports::{Clock, ElectParams, JobStore, ProcessSpec, QueueSlots};
use serde_json::json;

use crate::common::{Harness, instant};

fn spec(id: &str, role: &str, queues: &[(&str, u32)]) -> ProcessSpec {
    ProcessSpec {
        id: id.into(),
        role: role.into(),
        host: "node-1".into(),
        pid: 4242,
        version: "0.1.0".into(),
        queues: queues
            .iter()
            .map(|(queue, slots)| QueueSlots {
                queue: (*queue).into(),
                slots: *slots,
            })
            .collect(),
    }
}

#[tokio::test]
async fn workers_lists_the_processes_and_marks_the_leader() {
    let h = Harness::new();
    let reply = h.get("/v1/workers").await;
    assert_eq!(reply.assert_status(200), &json!({"workers": []}));

    let store = &h.store.inner;
    store
        .process_register(&spec("w-b", "worker", &[("email", 10), ("default", 32)]))
        .await
        .expect("registered");
    h.clock.advance_ms(500);
    store
        .process_register(&spec("a-api", "api", &[]))
        .await
        .expect("registered");
    let leadership = store
        .leader_elect(&ElectParams {
            candidate: "w-b".into(),
            ttl_ms: 10_000,
        })
        .await
        .expect("elected");

    let reply = h.get("/v1/workers").await;
    let body = reply.assert_status(200).clone();
    let workers = body["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    let api = &workers[0];
    assert_eq!(api["id"], "a-api");
    assert_eq!(api["role"], "api");
    assert_eq!(api["queues"], json!([]));
    assert_eq!(api["leader"], false);
    let worker = &workers[1];
    assert_eq!(worker["id"], "w-b");
    assert_eq!(worker["role"], "worker");
    assert_eq!(worker["host"], "node-1");
    assert_eq!(worker["pid"], 4242);
    assert_eq!(worker["version"], "0.1.0");
    assert_eq!(
        worker["queues"],
        json!([{"queue": "email", "slots": 10}, {"queue": "default", "slots": 32}])
    );
    assert_eq!(worker["leader"], true);
    assert_eq!(
        instant(&worker["started_at"]),
        h.clock.now() - chrono::TimeDelta::milliseconds(500)
    );
    assert_eq!(
        instant(&worker["last_seen_at"]),
        instant(&worker["started_at"])
    );
    assert_eq!(instant(&api["last_seen_at"]), h.clock.now());

    let leader = &body["leader"];
    assert_eq!(leader["leader_id"], "w-b");
    assert_eq!(leader["term"], leadership.term);
    assert_eq!(instant(&leader["elected_at"]), leadership.elected_at);
    assert_eq!(instant(&leader["expires_at"]), leadership.expires_at);
    assert_eq!(leader["active"], true);

    // A lapsed leadership leads nobody, but stays visible.
    h.clock.advance_ms(10_000);
    let body = h.get("/v1/workers").await.assert_status(200).clone();
    assert_eq!(body["workers"][1]["id"], "w-b");
    assert_eq!(body["workers"][1]["leader"], false);
    assert_eq!(body["leader"]["leader_id"], "w-b");
    assert_eq!(body["leader"]["active"], false);

    // The next leader is marked, and only it.
    let next = store
        .leader_elect(&ElectParams {
            candidate: "a-api".into(),
            ttl_ms: 10_000,
        })
        .await
        .expect("elected");
    assert!(next.term > leadership.term);
    let body = h.get("/v1/workers").await.assert_status(200).clone();
    let leaders: Vec<(&str, bool)> = body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["id"].as_str().unwrap(), w["leader"].as_bool().unwrap()))
        .collect();
    assert_eq!(leaders, [("a-api", true), ("w-b", false)]);
    assert_eq!(body["leader"]["term"], next.term);
    assert_eq!(body["leader"]["active"], true);
}

#[tokio::test]
async fn a_leader_that_is_not_registered_marks_no_process() {
    let h = Harness::new();
    h.store
        .inner
        .process_register(&spec("w-1", "worker", &[("default", 1)]))
        .await
        .expect("registered");
    h.store
        .inner
        .leader_elect(&ElectParams {
            candidate: "gone".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("elected");
    let body = h.get("/v1/workers").await.assert_status(200).clone();
    assert_eq!(body["workers"][0]["leader"], false);
    assert_eq!(body["leader"]["leader_id"], "gone");
    assert_eq!(body["leader"]["active"], true);
}
