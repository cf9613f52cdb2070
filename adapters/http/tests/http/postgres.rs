//! The API over PostgreSQL and real HTTP on a random port: the worker cycle, health, graceful
//! shutdown, 100 concurrent enqueues with one idempotency key creating exactly one job, queue
//! pause and resume (a paused queue's job is leased only after the resume), the process list
//! with its leader, the attempt history of a job, payload numbers beyond `f64` kept exact, and
//! (ignored) the known limit of an abandoned long poll.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use faultline_http::{ApiConfig, StoreHealth, problem_types as types};
use faultline_ports::{ElectParams, JobStore, ProcessSpec, QueueSlots};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest wait for anything over HTTP in these tests.
const DEADLINE: Duration = Duration::from_secs(60);

struct Server {
    base: String,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    client: reqwest::Client,
    _db: TestDb,
}

impl Server {
    async fn start(config: ApiConfig) -> Server {
        let db = TestDb::fresh().await;
        let store = Arc::new(PgStore::new(db.pool().clone()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let shutdown = CancellationToken::new();
        // No LISTEN task here: a receiver that never changes (long polls then poll).
        let (_never, wake) = watch::channel(0);
        let task = tokio::spawn(faultline_http::serve_on(
            listener,
            store.clone(),
            wake,
            StoreHealth::new(store),
            config,
            shutdown.clone(),
        ));
        Server {
            base: format!("http://{addr}"),
            shutdown,
            task,
            client: {
                // See the rustls dev-dependency in Cargo.toml.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .timeout(DEADLINE)
                    .build()
                    .expect("a client")
            },
            _db: db,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sends `body` as written (no re-encoding through a `Value`) and returns the status and the
    /// answer's text, with `Idempotency-Key: key` when given.
    async fn send_text(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> (u16, String) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("a body"))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(&body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// The store over the server's database (to register processes, elect a leader, ...).
    fn store(&self) -> PgStore {
        PgStore::new(self._db.pool().clone())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the server stops after shutdown")
            .expect("the server task did not panic")
            .expect("the server ran without error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_cycle_over_postgres_and_real_http() {
    let server = Server::start(ApiConfig::default()).await;
    let (status, health) = server.get("/health").await;
    assert_eq!(
        (status, health),
        (200, json!({"status": "ok", "database": "up"}))
    );

    let (status, job) = server
        .post(
            "/v1/jobs",
            json!({"kind": "report", "queue": "pg", "payload": {"month": 11}, "idempotency_key": "r-11"}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_i64().unwrap();

    let (status, grant) = server
        .post(
            "/v1/leases",
            json!({"worker_id": "pg-worker", "queues": ["pg"], "lease_seconds": 30}),
        )
        .await;
    assert_eq!(status, 200, "{grant}");
    let leased = &grant["jobs"][0];
    assert_eq!(leased["id"], id);
    assert_eq!(leased["attempt"], 1);
    let token = leased["lease_token"].clone();

    let (status, beat) = server
        .post(
            &format!("/v1/jobs/{id}/heartbeat"),
            json!({"lease_token": token, "extend_seconds": 45}),
        )
        .await;
    assert_eq!(status, 200, "{beat}");
    assert_eq!(beat["cancel_requested"], false);

    let (status, stale) = server
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease_token": token.as_i64().unwrap() + 1}),
        )
        .await;
    assert_eq!(status, 409, "{stale}");
    assert_eq!(stale["type"], types::STALE_LEASE);

    let (status, done) = server
        .post(
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease_token": token, "result": {"rows": 3}}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    let (status, read) = server.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(read["state"], "succeeded");
    assert_eq!(read["result"], json!({"rows": 3}));
    assert_eq!(read["lease_owner"], "pg-worker");

    let (status, queues) = server.get("/v1/queues").await;
    assert_eq!(status, 200);
    assert_eq!(queues["queues"][0]["counts"]["succeeded"], 1);

    let (status, problem) = server.get("/v1/jobs/999999").await;
    assert_eq!(
        (status, &problem["type"]),
        (404, &json!(types::JOB_NOT_FOUND))
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_enqueues_with_one_key_create_one_job() {
    let server = Server::start(ApiConfig {
        request_timeout: DEADLINE,
        ..ApiConfig::default()
    })
    .await;
    let url = format!("{}/v1/jobs", server.base);
    let body = json!({"kind": "charge", "payload": {"order": 42, "cents": 1999}}).to_string();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let request = server
            .client
            .post(&url)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-42")
            .body(body.clone());
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.expect("the server answers");
            let status = response.status().as_u16();
            let job: Value =
                serde_json::from_str(&response.text().await.expect("a body")).expect("a JSON body");
            (status, job["id"].as_i64())
        }));
    }
    let mut created = 0;
    let mut replayed = 0;
    let mut ids = Vec::new();
    for task in tasks {
        let (status, id) = task.await.expect("the request task did not panic");
        match status {
            201 => created += 1,
            200 => replayed += 1,
            other => panic!("unexpected status {other}"),
        }
        ids.push(id.expect("a job id"));
    }
    assert_eq!((created, replayed), (1, 99));
    ids.dedup();
    assert_eq!(ids.len(), 1, "every response names the same job: {ids:?}");

    let rows = job_rows(&server._db).await;
    assert_eq!(rows, 1);
    server.stop().await;
}

/// Every job in the database, through the store (SQL stays in the Postgres adapter).
async fn job_rows(db: &TestDb) -> i64 {
    use faultline_ports::ListParams;
    let store = PgStore::new(db.pool().clone());
    let page = store
        .job_list(&ListParams {
            limit: 1000,
            ..ListParams::default()
        })
        .await
        .expect("a page");
    page.jobs.len() as i64
}

/// The ids of the jobs a lease request for `queue` got, waiting up to `wait_seconds`.
async fn lease_ids(server: &Server, queue: &str, wait_seconds: f64) -> Vec<i64> {
    let (status, grant) = server
        .post(
            "/v1/leases",
            json!({"worker_id": "pg-w", "queues": [queue], "limit": 10, "wait_seconds": wait_seconds}),
        )
        .await;
    assert_eq!(status, 200, "{grant}");
    grant["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|job| job["id"].as_i64().expect("an id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_is_leased_only_after_its_resume_over_postgres() {
    let server = Arc::new(Server::start(ApiConfig::default()).await);
    let (status, job) = server
        .post(
            "/v1/jobs",
            json!({"kind": "mail", "queue": "pg-mail", "payload": {}}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_i64().unwrap();

    let (status, paused) = server.post("/v1/queues/pg-mail/pause", json!(null)).await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["name"], "pg-mail");
    assert_eq!(paused["paused"], true);
    assert!(paused["paused_at"].is_string(), "{paused}");
    let (status, again) = server.post("/v1/queues/pg-mail/pause", json!(null)).await;
    assert_eq!(
        (status, &again),
        (200, &paused),
        "pausing twice changes nothing"
    );
    // An empty queue can be paused ahead of its first job.
    let (status, idle) = server.post("/v1/queues/pg-idle/pause", json!(null)).await;
    assert_eq!((status, &idle["paused"]), (200, &json!(true)), "{idle}");

    assert_eq!(lease_ids(&server, "pg-mail", 0.0).await, Vec::<i64>::new());
    let (status, listed) = server.get("/v1/queues").await;
    assert_eq!(status, 200, "{listed}");
    let queues = listed["queues"].as_array().expect("queues");
    let names: Vec<&str> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pg-idle", "pg-mail"], "{listed}");
    assert_eq!(queues[0]["counts"]["queued"], 0);
    assert_eq!(queues[0]["paused"], true);
    assert_eq!(queues[1]["counts"]["queued"], 1);
    assert_eq!(queues[1]["paused"], true);
    assert_eq!(queues[1]["paused_at"], paused["paused_at"]);

    // A long poll that waits across the resume gets the job after it.
    let polling = {
        let server = server.clone();
        tokio::spawn(async move { lease_ids(&server, "pg-mail", 30.0).await })
    };
    let (status, resumed) = server.post("/v1/queues/pg-mail/resume", json!(null)).await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["paused_at"], paused["paused_at"]);
    let leased = tokio::time::timeout(DEADLINE, polling)
        .await
        .expect("the long poll answers")
        .expect("the poll did not panic");
    assert_eq!(leased, [id]);

    let (status, queues) = server.get("/v1/queues").await;
    assert_eq!(status, 200);
    assert_eq!(queues["queues"][1]["paused"], false);
    assert_eq!(queues["queues"][1]["counts"]["running"], 1);

    // Refused names are problems, never 500s.
    for (path, status, problem_type) in [
        ("/v1/queues/bad%00name/pause", 422, types::INVALID_REQUEST),
        ("/v1/queues/bad%1Bname/resume", 422, types::INVALID_REQUEST),
        (
            &*format!("/v1/queues/{}/pause", "x".repeat(129)),
            400,
            types::BAD_REQUEST,
        ),
    ] {
        let (got, problem) = server.post(path, json!(null)).await;
        assert_eq!(
            (got, &problem["type"]),
            (status, &json!(problem_type)),
            "{path}: {problem}"
        );
    }
    let rows = server.store().queue_list().await.expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");

    Arc::into_inner(server)
        .expect("the only owner")
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_lists_registered_processes_and_the_leader_over_postgres() {
    let server = Server::start(ApiConfig::default()).await;
    let (status, empty) = server.get("/v1/workers").await;
    assert_eq!((status, empty), (200, json!({"workers": []})));

    let store = server.store();
    for (id, role, queues) in [
        ("pg-worker-2", "worker", vec![("email", 4), ("default", 16)]),
        ("pg-api-1", "api", vec![]),
    ] {
        store
            .process_register(&ProcessSpec {
                id: id.into(),
                role: role.into(),
                host: "db-host".into(),
                pid: 31337,
                version: "9.9.9".into(),
                queues: queues
                    .into_iter()
                    .map(|(queue, slots)| QueueSlots {
                        queue: queue.into(),
                        slots,
                    })
                    .collect(),
            })
            .await
            .expect("registered");
    }
    let leadership = store
        .leader_elect(&ElectParams {
            candidate: "pg-worker-2".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("elected");

    let (status, body) = server.get("/v1/workers").await;
    assert_eq!(status, 200, "{body}");
    let workers = body["workers"].as_array().expect("workers");
    let ids: Vec<(&str, bool)> = workers
        .iter()
        .map(|w| (w["id"].as_str().unwrap(), w["leader"].as_bool().unwrap()))
        .collect();
    assert_eq!(ids, [("pg-api-1", false), ("pg-worker-2", true)]);
    assert_eq!(workers[0]["role"], "api");
    assert_eq!(workers[0]["queues"], json!([]));
    assert_eq!(workers[1]["host"], "db-host");
    assert_eq!(workers[1]["pid"], 31337);
    assert_eq!(workers[1]["version"], "9.9.9");
    assert_eq!(
        workers[1]["queues"],
        json!([{"queue": "email", "slots": 4}, {"queue": "default", "slots": 16}])
    );
    assert!(workers[1]["started_at"].is_string() && workers[1]["last_seen_at"].is_string());
    assert_eq!(body["leader"]["leader_id"], "pg-worker-2");
    assert_eq!(body["leader"]["term"], leadership.term);
    assert_eq!(body["leader"]["active"], true);
    assert!(body["leader"]["elected_at"].is_string() && body["leader"]["expires_at"].is_string());

    // A resigned leadership leads nobody.
    assert!(
        store
            .leader_resign("pg-worker-2", leadership.term)
            .await
            .expect("resign")
    );
    let (status, body) = server.get("/v1/workers").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workers"][1]["leader"], false, "{body}");
    assert_ne!(body["leader"]["active"], true, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_in_the_jobs_errors_over_postgres() {
    let server = Server::start(ApiConfig::default()).await;
    let (status, job) = server
        .post(
            "/v1/jobs",
            json!({"kind": "k", "queue": "pg-hist", "payload": 1, "max_attempts": 1}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["errors"], json!([]));
    let id = job["id"].as_i64().unwrap();
    let (status, grant) = server
        .post(
            "/v1/leases",
            json!({"worker_id": "pg-hist-worker", "queues": ["pg-hist"]}),
        )
        .await;
    assert_eq!(status, 200, "{grant}");
    let token = grant["jobs"][0]["lease_token"].clone();
    let (status, failed) = server
        .post(
            &format!("/v1/jobs/{id}/fail"),
            json!({"lease_token": token, "error": "disk full"}),
        )
        .await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["state"], "failed");

    let (status, view) = server.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["last_error"], "disk full");
    let errors = view["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{view}");
    let mut entry = errors[0].clone();
    let at = entry.as_object_mut().unwrap().remove("at").expect("a time");
    assert_eq!(
        at, view["finished_at"],
        "the failure's time is the database's"
    );
    assert_eq!(
        entry,
        json!({"attempt": 1, "worker": "pg-hist-worker", "fencing_token": token, "error": "disk full", "kind": "error"})
    );
    server.stop().await;
}

/// Sends a long-poll lease request on a raw connection and closes the connection at once (the
/// request is in the server's socket buffer, so it is read and served all the same).
async fn abandon_long_poll(server: &Server, queue: &str) {
    use tokio::io::AsyncWriteExt;
    let addr = server.base.trim_start_matches("http://");
    let body = json!({
        "queues": [queue], "worker_id": "gone", "limit": 1, "lease_seconds": 300, "wait_seconds": 30
    })
    .to_string();
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let request = format!(
        "POST /v1/leases HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("sends");
    stream.flush().await.expect("flushes");
    drop(stream);
}

/// Issue 19's "long-poll whose client has disconnected": hyper does not drop a request whose
/// client closed the connection (it saw the end of the stream while reading the request, so it
/// stops watching the socket), and writing the answer to such a peer succeeds into the socket
/// buffer. The server watches for the end of the stream itself: the wait ends, nothing is
/// leased. Before that, the abandoned request leased the job below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_whose_client_left_does_not_keep_a_lease() {
    let server = Server::start(ApiConfig {
        lease_poll_interval: Duration::from_millis(50),
        ..ApiConfig::default()
    })
    .await;
    abandon_long_poll(&server, "lp").await;
    let (status, job) = server
        .post(
            "/v1/jobs",
            json!({"kind": "k", "payload": 1, "queue": "lp"}),
        )
        .await;
    assert_eq!(status, 201);
    let path = format!("/v1/jobs/{}", job["id"]);
    // Give the abandoned request many poll intervals (and its wake-ups) to lease the job.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let (_, job) = server.get(&path).await;
        assert_ne!(job["lease_owner"], "gone", "{job}");
    }
    let (_, job) = server.get(&path).await;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    server.stop().await;
}

/// The payload numbers of issue 19: written as text (a `Value` literal could round them), with an
/// integer beyond 2^64, a decimal longer than an `f64` keeps, and an exponent form.
const EXACT_PAYLOAD: &str = r#"{"big": 18446744073709551617, "decimal": 0.1000000000000000055511151231257827, "negative": -98765432109876543210.50, "exponent": 1.5e-3}"#;

fn exact_request(payload: &str) -> String {
    format!(r#"{{"kind": "exact", "queue": "exact", "payload": {payload}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_numbers_beyond_f64_round_trip_exactly_through_postgres() {
    let server = Server::start(ApiConfig::default()).await;
    let post = reqwest::Method::POST;
    let (status, created) = server
        .send_text(post, "/v1/jobs", Some(&exact_request(EXACT_PAYLOAD)), None)
        .await;
    assert_eq!(status, 201, "{created}");
    let created: Value = serde_json::from_str(&created).expect("JSON");
    let (status, text) = server
        .send_text(
            reqwest::Method::GET,
            &format!("/v1/jobs/{}", created["id"]),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let view: Value = serde_json::from_str(&text).expect("JSON");
    // Compared as text: exactly the digits sent (the exponent form in plain decimal notation,
    // as PostgreSQL's numeric prints it; the trailing zero of the scale kept).
    let payload = &view["payload"];
    assert_eq!(payload["big"].to_string(), "18446744073709551617", "{text}");
    assert_eq!(
        payload["decimal"].to_string(),
        "0.1000000000000000055511151231257827",
        "{text}"
    );
    assert_eq!(
        payload["negative"].to_string(),
        "-98765432109876543210.50",
        "{text}"
    );
    assert_eq!(payload["exponent"].to_string(), "0.0015", "{text}");
    assert_eq!(
        created["payload"], view["payload"],
        "the 201 shows what is stored"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_differing_only_beyond_f64_are_different_idempotent_requests() {
    let server = Server::start(ApiConfig::default()).await;
    let post = || reqwest::Method::POST;
    let first = exact_request(r#"{"n": 18446744073709551617, "d": 0.10000000000000000555}"#);
    let (status, created) = server
        .send_text(post(), "/v1/jobs", Some(&first), Some("exact-1"))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = serde_json::from_str::<Value>(&created).expect("JSON")["id"].clone();
    // The same request replays (another notation of the same numbers is the same request).
    let same = exact_request(r#"{"d": 1.0000000000000000555e-1, "n": 18446744073709551617}"#);
    let (status, replay) = server
        .send_text(post(), "/v1/jobs", Some(&same), Some("exact-1"))
        .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(
        serde_json::from_str::<Value>(&replay).expect("JSON")["id"],
        id
    );
    // Both of these are the same `f64` as the first request's numbers; neither is the same request.
    for other in [
        r#"{"n": 18446744073709551616, "d": 0.10000000000000000555}"#,
        r#"{"n": 18446744073709551617, "d": 0.1}"#,
    ] {
        let (status, conflict) = server
            .send_text(
                post(),
                "/v1/jobs",
                Some(&exact_request(other)),
                Some("exact-1"),
            )
            .await;
        assert_eq!(status, 409, "{other}: {conflict}");
        let problem: Value = serde_json::from_str(&conflict).expect("JSON");
        assert_eq!(problem["type"], types::IDEMPOTENCY_CONFLICT, "{conflict}");
        assert_eq!(problem["job_id"], id, "{conflict}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_number_postgres_cannot_keep_exactly_is_a_422_not_a_503() {
    let server = Server::start(ApiConfig::default()).await;
    for payload in [
        "1e-16384",
        "1e131072",
        "[0e-99999]",
        "{\"x\": 1e2000000000}",
    ] {
        let (status, text) = server
            .send_text(
                reqwest::Method::POST,
                "/v1/jobs",
                Some(&exact_request(payload)),
                None,
            )
            .await;
        assert_eq!(status, 422, "{payload}: {text}");
        let problem: Value = serde_json::from_str(&text).expect("JSON");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("payload number"), "{payload}: {detail}");
    }
    server.stop().await;
}
