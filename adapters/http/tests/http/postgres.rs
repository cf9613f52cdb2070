//! The API over PostgreSQL and real HTTP on a random port: the worker cycle, health, graceful
//! shutdown, and 100 concurrent enqueues with one idempotency key creating exactly one job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use faultline_http::{ApiConfig, StoreHealth, problem_types as types};
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

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(&body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
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
    use faultline_ports::{JobStore, ListParams};
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
