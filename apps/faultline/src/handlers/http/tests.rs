//! Tests of the `http` handler against a tiny HTTP server on 127.0.0.1 (a tokio `TcpListener`
//! that records each request and sends a canned response), one per response class.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use faultline_worker::{Handler, JobContext, Outcome};
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BODY_LIMIT, HttpHandler, MAX_RETRY_AFTER, client, header_text, retry_after};

/// Longest wait for a request the server must receive.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the test server does with each connection.
#[derive(Debug, Clone)]
enum Behaviour {
    /// Reads the request, then answers with this status line, extra headers and body.
    Reply {
        status: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Reads the request and never answers (the connection stays open).
    Hang,
    /// Writes these bytes as soon as the client sent anything, without parsing it.
    Blurt(&'static [u8]),
}

fn reply(status: &'static str, body: &str) -> Behaviour {
    Behaviour::Reply {
        status,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

/// One request as the server received it.
#[derive(Debug)]
struct Request {
    /// The request line, e.g. `POST /hook HTTP/1.1`.
    line: String,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Server {
    url: Url,
    requests: mpsc::UnboundedReceiver<Request>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (sender, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream, behaviour.clone(), sender.clone()));
            }
        });
        Server {
            url: Url::parse(&format!("http://127.0.0.1:{port}/hook")).expect("url"),
            requests,
        }
    }

    async fn request(&mut self) -> Request {
        tokio::time::timeout(DEADLINE, self.requests.recv())
            .await
            .expect("no request before the deadline")
            .expect("server gone")
    }
}

async fn handle(
    mut stream: TcpStream,
    behaviour: Behaviour,
    sender: mpsc::UnboundedSender<Request>,
) {
    if let Behaviour::Blurt(bytes) = behaviour {
        let mut first = [0_u8; 4096];
        let _ = stream.read(&mut first).await;
        let _ = stream.write_all(bytes).await;
        // Closing with unread input would reset the connection: drain until the client closes.
        let mut rest = [0_u8; 1024];
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        return;
    }
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let _ = sender.send(request);
    match behaviour {
        Behaviour::Reply {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        }
        Behaviour::Blurt(_) => {}
        Behaviour::Hang => {
            // Hold the connection until the client gives up (EOF) or the test ends.
            let mut rest = [0_u8; 64];
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        }
    }
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut data = Vec::new();
    let mut buf = [0_u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Request {
        line,
        headers,
        body,
    })
}

fn job(payload: Value) -> JobContext {
    JobContext {
        id: 42,
        queue: "mail".into(),
        kind: "send-email".into(),
        payload,
        attempt: 2,
        max_attempts: 5,
        fencing_token: 9,
        lease_expires_at: Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap(),
        cancel: CancellationToken::new(),
    }
}

fn handler(url: &Url) -> HttpHandler {
    handler_with_timeout(url, Duration::from_secs(30))
}

fn handler_with_timeout(url: &Url, timeout: Duration) -> HttpHandler {
    HttpHandler::new(client(timeout).expect("client"), url.clone())
}

/// Runs one job against a server answering with `behaviour`; returns the outcome and the request.
async fn exchange(behaviour: Behaviour) -> (Outcome, Request) {
    let mut server = Server::start(behaviour).await;
    let outcome = handler(&server.url).run(job(json!({"to": "a@b.c"}))).await;
    (outcome, server.request().await)
}

fn retry(outcome: &Outcome) -> (&str, Option<Duration>) {
    match outcome {
        Outcome::Retry { error, delay } => (error, *delay),
        other => panic!("expected a retry, got {other:?}"),
    }
}

fn failure(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Fail { error } => error,
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

#[tokio::test]
async fn posts_the_payload_with_the_job_headers() {
    let payload = json!({"to": "a@b.c", "n": [1, 2.5, null], "nested": {"k": "v"}});
    let mut server = Server::start(reply("200 OK", "")).await;
    handler(&server.url).run(job(payload.clone())).await;
    let request = server.request().await;

    assert_eq!(request.line, "POST /hook HTTP/1.1");
    let sent: Value = serde_json::from_slice(&request.body).expect("the body is JSON");
    assert_eq!(sent, payload);
    let expected = [
        ("content-type", "application/json"),
        ("idempotency-key", "42:9"),
        ("faultline-job-id", "42"),
        ("faultline-queue", "mail"),
        ("faultline-kind", "send-email"),
        ("faultline-attempt", "2"),
        ("faultline-max-attempts", "5"),
        ("faultline-fencing-token", "9"),
        ("faultline-lease-expires-at", "2030-01-02T03:04:05+00:00"),
    ];
    for (name, value) in expected {
        assert_eq!(request.header(name), Some(value), "header {name}");
    }
    assert!(
        request
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("faultline/"))
    );
}

#[tokio::test]
async fn a_2xx_with_a_json_body_completes_with_that_json() {
    let (outcome, _) = exchange(reply("200 OK", r#"{"id": "msg-1", "queued": true}"#)).await;
    assert_eq!(
        outcome,
        Outcome::Complete(Some(json!({"id": "msg-1", "queued": true})))
    );
}

#[tokio::test]
async fn a_2xx_with_another_body_completes_with_the_text() {
    let (outcome, _) = exchange(reply("201 Created", "created <b>ok</b>")).await;
    assert_eq!(outcome, Outcome::Complete(Some(json!("created <b>ok</b>"))));
}

#[tokio::test]
async fn a_2xx_without_a_body_completes_without_a_result() {
    let (outcome, _) = exchange(reply("204 No Content", "")).await;
    assert_eq!(outcome, Outcome::Complete(None));
}

#[tokio::test]
async fn a_large_body_is_cut_to_the_limit() {
    let big = format!(r#"{{"data": "{}"}}"#, "x".repeat(3 * BODY_LIMIT));
    let (outcome, _) = exchange(reply("200 OK", &big)).await;
    match outcome {
        // Cut JSON no longer parses: it is kept as text.
        Outcome::Complete(Some(Value::String(text))) => {
            assert_eq!(text.len(), BODY_LIMIT);
            assert!(big.starts_with(&text));
        }
        other => panic!("{other:?}"),
    }
    let (outcome, _) = exchange(reply("500 Internal Server Error", &big)).await;
    let (error, _) = retry(&outcome);
    assert!(error.len() < BODY_LIMIT + 200, "{} bytes", error.len());
    assert!(
        error.ends_with(&format!("[truncated at {BODY_LIMIT} bytes]")),
        "{error}"
    );
}

#[tokio::test]
async fn json_with_nul_characters_is_kept_as_storable_text() {
    let (outcome, _) = exchange(reply("200 OK", r#"{"a": "x\u0000y"}"#)).await;
    match outcome {
        Outcome::Complete(Some(Value::String(text))) => assert!(!text.contains('\0')),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_408_is_retried_with_the_jobs_backoff() {
    let (outcome, _) = exchange(reply("408 Request Timeout", "slow down")).await;
    let (error, delay) = retry(&outcome);
    assert_eq!(delay, None);
    assert!(
        error.contains("HTTP 408 Request Timeout: slow down"),
        "{error}"
    );
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after() {
    let behaviour = Behaviour::Reply {
        status: "429 Too Many Requests",
        headers: vec![("retry-after", "7".to_owned())],
        body: b"quota".to_vec(),
    };
    let (outcome, _) = exchange(behaviour).await;
    let (error, delay) = retry(&outcome);
    assert_eq!(delay, Some(Duration::from_secs(7)));
    assert!(error.contains("HTTP 429"), "{error}");
}

#[tokio::test]
async fn a_503_honours_an_http_date_retry_after() {
    let in_an_hour = (Utc::now() + chrono::Duration::hours(1))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let behaviour = Behaviour::Reply {
        status: "503 Service Unavailable",
        headers: vec![("retry-after", in_an_hour)],
        body: Vec::new(),
    };
    let (outcome, _) = exchange(behaviour).await;
    let (_, delay) = retry(&outcome);
    let delay = delay.expect("a delay");
    assert!(
        delay > Duration::from_secs(3_500) && delay <= Duration::from_secs(3_600),
        "{delay:?}"
    );
}

#[tokio::test]
async fn a_500_is_retried_and_keeps_the_body_in_the_error() {
    let (outcome, _) = exchange(reply("500 Internal Server Error", "db down")).await;
    let (error, delay) = retry(&outcome);
    assert_eq!(delay, None);
    assert!(
        error.contains("HTTP 500 Internal Server Error: db down"),
        "{error}"
    );
    assert!(error.contains("/hook"), "{error}");
}

#[tokio::test]
async fn a_404_fails_permanently() {
    let (outcome, _) = exchange(reply("404 Not Found", "no such hook")).await;
    let error = failure(&outcome);
    assert!(
        error.contains("HTTP 404 Not Found: no such hook"),
        "{error}"
    );
}

#[tokio::test]
async fn a_400_fails_permanently() {
    let (outcome, _) = exchange(reply("400 Bad Request", r#"{"error": "bad to"}"#)).await;
    let error = failure(&outcome);
    assert!(
        error.contains(r#"HTTP 400 Bad Request: {"error": "bad to"}"#),
        "{error}"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_fails_permanently() {
    let behaviour = Behaviour::Reply {
        status: "302 Found",
        headers: vec![("location", "http://127.0.0.1:1/elsewhere".to_owned())],
        body: Vec::new(),
    };
    let (outcome, _) = exchange(behaviour).await;
    assert!(failure(&outcome).contains("HTTP 302"));
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let url = Url::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
    let outcome = handler(&url).run(job(json!({}))).await;
    let (error, delay) = retry(&outcome);
    assert_eq!(delay, None);
    assert!(error.contains("could not connect"), "{error}");
    assert!(error.contains("Connection refused"), "{error}");
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_is_retried() {
    let mut server = Server::start(Behaviour::Hang).await;
    let handler = handler_with_timeout(&server.url, Duration::from_millis(300));
    let outcome = handler.run(job(json!({}))).await;
    server.request().await;
    let (error, delay) = retry(&outcome);
    assert_eq!(delay, None);
    assert!(error.contains("timed out"), "{error}");
}

#[tokio::test]
async fn cancellation_stops_the_request() {
    let mut server = Server::start(Behaviour::Hang).await;
    let job = job(json!({}));
    let cancel = job.cancel.clone();
    let handler = handler(&server.url);
    let run = tokio::spawn(async move { handler.run(job).await });
    server.request().await; // the request is in flight
    cancel.cancel();
    let outcome = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the handler ignored its cancellation")
        .expect("join");
    assert!(retry(&outcome).0.contains("cancelled"));
}

#[tokio::test]
async fn credentials_and_queries_of_the_url_never_reach_errors() {
    let mut server = Server::start(reply("500 Internal Server Error", "")).await;
    let port = server.url.port().unwrap();
    let url = Url::parse(&format!(
        "http://user:s3cret@127.0.0.1:{port}/hook?token=t0ken"
    ))
    .unwrap();
    let outcome = handler(&url).run(job(json!({}))).await;
    server.request().await;
    let (error, _) = retry(&outcome);
    assert!(
        error.contains(&format!("http://127.0.0.1:{port}/hook")),
        "{error}"
    );
    assert!(
        !error.contains("s3cret") && !error.contains("t0ken"),
        "{error}"
    );

    drop(server);
    let refused = handler(&url).run(job(json!({}))).await;
    let (error, _) = retry(&refused);
    assert!(
        !error.contains("s3cret") && !error.contains("t0ken"),
        "{error}"
    );
}

#[tokio::test]
async fn https_endpoints_speak_tls() {
    // A server that answers in plain HTTP as soon as a client sends anything: over http that is a
    // success; over https the TLS handshake fails (so the client speaks TLS: the rustls provider
    // is installed), and the failure is retried.
    let server = Server::start(Behaviour::Blurt(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ))
    .await;
    let port = server.url.port().unwrap();
    let plain = handler(&server.url).run(job(json!({}))).await;
    assert_eq!(plain, Outcome::Complete(None));

    let url = Url::parse(&format!("https://127.0.0.1:{port}/hook")).unwrap();
    let outcome = handler(&url).run(job(json!({}))).await;
    let (error, _) = retry(&outcome);
    assert!(error.starts_with("POST https://127.0.0.1"), "{error}");
    assert!(error.contains("could not connect"), "{error}");
    assert!(error.contains("corrupt message"), "a TLS error: {error}");
}

#[tokio::test]
async fn names_that_are_not_ascii_are_percent_encoded_in_headers() {
    let mut server = Server::start(reply("200 OK", "")).await;
    let mut job = job(json!({}));
    job.queue = "files 50%".into();
    job.kind = "résumé-→".into();
    let outcome = handler(&server.url).run(job).await;
    assert_eq!(outcome, Outcome::Complete(None));
    let request = server.request().await;
    assert_eq!(request.header("faultline-queue"), Some("files 50%25"));
    assert_eq!(
        request.header("faultline-kind"),
        Some("r%C3%A9sum%C3%A9-%E2%86%92")
    );
    assert_eq!(header_text("plain-Kind_1.v2"), "plain-Kind_1.v2");
}

#[test]
fn retry_after_takes_seconds_or_an_http_date() {
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let header = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        retry_after(&headers, now)
    };
    assert_eq!(header("0"), Some(Duration::ZERO));
    assert_eq!(header(" 120 "), Some(Duration::from_secs(120)));
    assert_eq!(
        header("Sun, 01 Mar 2026 12:00:30 GMT"),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        header("Sun, 01 Mar 2026 11:00:00 GMT"),
        Some(Duration::ZERO),
        "a date in the past: retry now"
    );
    assert_eq!(header("99999999999"), Some(MAX_RETRY_AFTER));
    assert_eq!(header("soon"), None);
    assert_eq!(header("-5"), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}
