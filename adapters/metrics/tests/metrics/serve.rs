//! The standalone `/metrics` endpoint of worker processes.

use std::net::SocketAddr;
use std::time::Duration;

use faultline_metrics::testing::{Exposition, LocalMetrics};
use faultline_metrics::{names, serve_metrics_on};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serves_the_exposition_at_metrics_and_nothing_else_until_shutdown() {
    let metrics = LocalMetrics::new();
    let _recording = metrics.enter();
    metrics::counter!(names::JOBS_CLAIMED_TOTAL, "queue" => "default").increment(3);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_metrics_on(
        listener,
        metrics.handle(),
        shutdown.clone(),
    ));
    // See the rustls dev-dependency in Cargo.toml.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        faultline_metrics::CONTENT_TYPE
    );
    let scrape = Exposition::parse(&response.text().await.unwrap());
    assert_eq!(
        scrape.value(names::JOBS_CLAIMED_TOTAL, &[("queue", "default")]),
        3.0
    );
    let other = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(other.status().as_u16(), 404);
    let post = client.post(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(post.status().as_u16(), 405);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops on shutdown")
        .unwrap()
        .unwrap();
}
