//! Connection hygiene over real sockets against `serve_on`: the header-read timeout (a half sent
//! head, a slow-loris trickle), the idle timeout of kept-alive connections, and the connection
//! cap (beyond it new connections wait until a served one closes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use faultline_http::{ApiConfig, StoreHealth};
use faultline_memory::MemoryStore;
use faultline_ports::ManualClock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// A complete, kept-alive request for `/health`.
const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: faultline\r\n\r\n";

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config: ApiConfig) -> Server {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let store = Arc::new(MemoryStore::new(Arc::new(ManualClock::new(Utc::now()))));
        let shutdown = CancellationToken::new();
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
            addr,
            shutdown,
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("a connection")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the server stops")
            .expect("the server task")
            .expect("the server");
    }
}

/// Reads one response (head and a `Content-Length` body) and returns its status line.
async fn response(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse().expect("a length"));
            if data.len() >= end + 4 + length {
                return head.lines().next().unwrap_or_default().to_owned();
            }
        }
        let n = stream.read(&mut chunk).await.expect("a read");
        assert!(n > 0, "closed before a whole response: {data:?}");
        data.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the server closes `stream` (end of file or a reset), failing after [`DEADLINE`].
async fn closed(stream: &mut TcpStream) {
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection");
}

/// `/health` over a fresh connection answers 200.
async fn health_answers(server: &Server) {
    let mut stream = server.connect().await;
    stream.write_all(HEALTH).await.unwrap();
    let status = tokio::time::timeout(DEADLINE, response(&mut stream))
        .await
        .expect("/health answers");
    assert_eq!(status, "http/1.1 200 ok");
}

#[tokio::test]
async fn a_half_sent_request_head_is_cut_after_the_header_read_timeout() {
    let timeout = Duration::from_millis(300);
    let server = Server::start(ApiConfig {
        header_read_timeout: timeout,
        ..ApiConfig::default()
    })
    .await;

    let started = Instant::now();
    let mut half = server.connect().await;
    half.write_all(b"GET /health HTTP/1.1\r\nHost: faultline\r\n")
        .await
        .unwrap();
    closed(&mut half).await;
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

    // A slow loris keeps the connection busy with a byte now and then: still cut.
    let started = Instant::now();
    let mut loris = server.connect().await;
    loris.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let (mut read, mut write) = loris.split();
    let trickle = async {
        loop {
            // The fault itself: a client that sends its head very slowly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let mut chunk = [0u8; 64];
    let cut = async {
        while let Ok(n) = read.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, async {
        tokio::select! {
            _ = trickle => {}
            _ = cut => {}
        }
    })
    .await
    .expect("the slow loris is disconnected");
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

    // A whole head in time is served, also as the second request of a connection that waited.
    let mut stream = server.connect().await;
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(response(&mut stream).await, "http/1.1 200 ok");
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(response(&mut stream).await, "http/1.1 200 ok");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let server = Server::start(ApiConfig {
        idle_timeout: idle,
        header_read_timeout: Duration::from_secs(30),
        ..ApiConfig::default()
    })
    .await;
    let mut stream = server.connect().await;
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(response(&mut stream).await, "http/1.1 200 ok");
    let answered = Instant::now();
    closed(&mut stream).await;
    assert!(answered.elapsed() >= idle, "{:?}", answered.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn beyond_the_connection_cap_new_connections_wait_until_one_closes() {
    let server = Server::start(ApiConfig {
        max_connections: 5,
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..ApiConfig::default()
    })
    .await;
    // Five idle kept-alive connections, each served once (so each holds its place).
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut stream = server.connect().await;
        stream.write_all(HEALTH).await.unwrap();
        assert_eq!(response(&mut stream).await, "http/1.1 200 ok");
        idle.push(stream);
    }
    // A sixth is not served while they stay...
    let mut sixth = server.connect().await;
    sixth.write_all(HEALTH).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), response(&mut sixth)).await;
    assert!(waited.is_err(), "served beyond the cap: {waited:?}");
    // ...and is as soon as one of them closes.
    drop(idle.pop());
    let status = tokio::time::timeout(DEADLINE, response(&mut sixth))
        .await
        .expect("served once a place is free");
    assert_eq!(status, "http/1.1 200 ok");
    // With the idle ones gone, /health answers on new connections.
    drop(sixth);
    idle.clear();
    for _ in 0..5 {
        health_answers(&server).await;
    }
    server.stop().await;
}

/// Sends `request` on a fresh connection (write errors ignored: the server may stop reading an
/// oversized head) and reads until the server closes the connection.
async fn answer_to(server: &Server, request: &[u8]) -> String {
    let mut stream = server.connect().await;
    for chunk in request.chunks(16 * 1024) {
        if stream.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server answers and closes the connection");
    String::from_utf8(data).expect("a text answer")
}

#[tokio::test]
async fn requests_the_server_cannot_parse_get_problem_bodies_and_a_closed_connection() {
    let server = Server::start(ApiConfig::default()).await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let big_head = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> =
        vec![
        ("a bad request line", b"HELLO\r\n\r\n".to_vec(), 400, "bad-request"),
        (
            "a bad Content-Length",
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
            "bad-request",
        ),
        (
            "two different Content-Lengths",
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                .to_vec(),
            400,
            "bad-request",
        ),
        (
            "a space in a header name",
            b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec(),
            400,
            "bad-request",
        ),
        ("an overlong URI", long_uri.into_bytes(), 414, "uri-too-long"),
        ("an oversized head", big_head.into_bytes(), 431, "headers-too-large"),
    ];
    for (what, request, status, problem_type) in cases {
        let answer = answer_to(&server, &request).await;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: no whole answer: {answer:?}"));
        let head = head.to_lowercase();
        assert!(
            head.starts_with(&format!("http/1.1 {status} ")),
            "{what}: {head}"
        );
        assert!(
            head.contains("content-type: application/problem+json"),
            "{what}: {head}"
        );
        assert!(head.contains("connection: close"), "{what}: {head}");
        let problem: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
        assert_eq!(
            problem["type"],
            format!("https://faultline.dev/problems/{problem_type}"),
            "{what}: {problem}"
        );
        assert_eq!(problem["status"], status, "{what}: {problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {problem}"
        );
    }
    // A well-formed request on the same server is answered as before.
    health_answers(&server).await;
    server.stop().await;
}
