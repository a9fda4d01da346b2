//! Memory under a large body, in a test binary of its own: the process's RSS must not
//! include the allocations of other tests running at the same time (the tests here
//! take turns).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "it/support.rs"]
#[allow(dead_code)]
mod support;

use reqwest::StatusCode;

use axum::body::Body;
use support::{backend, gateway, register, registry, until_routed};

/// Held by each test for its whole run: one at a time, so each reads its own growth.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_should_stream_through_without_buffering() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let registry = registry().await;
    let sink = backend("a").await;
    register(registry.addr, "upload", sink.running.addr).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    until_routed(gateway.addr, "upload", 1).await;
    let before = rss_bytes();
    let size = 100 * 1024 * 1024;
    let response = keel_serve::client::new()
        .post(format!("http://{}/upload/sink", gateway.addr))
        .body(reqwest::Body::wrap_stream(futures::StreamExt::map(
            streamed_body(size).into_data_stream(),
            |chunk| chunk.map_err(std::io::Error::other),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        size.to_string(),
        "every byte arrived"
    );
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 40 * 1024 * 1024,
        "memory grew by {} MiB for a 100 MiB body",
        grown >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_chunked_answer_should_stream_through_without_buffering() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let registry = registry().await;
    let size: u64 = 100 * 1024 * 1024;
    // A source whose answer has no length: it streams chunked through the gateway.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { streamed_body(size) });
    tokio::spawn(async move { axum::serve(listener, app).await });
    register(registry.addr, "download", source).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while keel_serve::client::new()
        .get(format!("http://{}/download/", gateway.addr))
        .send()
        .await
        .map_or(true, |r| r.status() != StatusCode::OK)
    {
        assert!(std::time::Instant::now() < deadline, "never routed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let before = rss_bytes();
    let mut response = keel_serve::client::new()
        .get(format!("http://{}/download/", gateway.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("chunked")
    );
    let mut received: u64 = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        assert!(
            chunk.iter().all(|&b| b == b'z'),
            "the data arrives unchanged"
        );
        received += chunk.len() as u64;
    }
    assert_eq!(received, size, "every byte arrived");
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 40 * 1024 * 1024,
        "memory grew by {} MiB for a 100 MiB answer",
        grown >> 20
    );
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn streamed_body(bytes: u64) -> Body {
    let chunk = bytes::Bytes::from(vec![b'z'; 64 * 1024]);
    let chunks = bytes / chunk.len() as u64;
    Body::from_stream(futures::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    ))
}
