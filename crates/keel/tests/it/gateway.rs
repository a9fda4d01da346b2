//! The gateway together with the log service: its access log reaches a topic.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::support::{eventually, start_log_service};

/// A registry that never checks health on its own within a test.
async fn start_registry() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(keel_registry::run(listener, config, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// A backend that answers every path with 200.
async fn start_backend() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "ok" });
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_should_be_in_the_access_log_topic() {
    let (log_addr, _log) = start_log_service().await;
    let (registry, _registry) = start_registry().await;
    let (echo, _echo) = start_backend().await;
    let registered = keel_serve::client::new()
        .post(format!("http://{registry}/services"))
        .json(&serde_json::json!({"name": "echo", "addr": echo.to_string()}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = listener.local_addr().unwrap();
    let config = keel_gateway::GatewayConfig {
        registry: format!("http://{registry}"),
        watch_wait: Duration::from_millis(500),
        log_service: Some(format!("http://{log_addr}")),
        ..Default::default()
    };
    let (_stop_gateway, stopped) = oneshot::channel::<()>();
    tokio::spawn(keel_gateway::run(listener, admin, config, async move {
        let _ = stopped.await;
    }));
    eventually("the gateway routes to echo", async || {
        keel_serve::client::new()
            .get(format!("http://{gateway}/echo/ping"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success())
    })
    .await;
    keel_serve::client::new()
        .get(format!("http://{gateway}/echo/logged?q=1"))
        .send()
        .await
        .unwrap();
    keel_serve::client::new()
        .get(format!("http://{gateway}/nosuch/x"))
        .send()
        .await
        .unwrap();

    let mut client = keel_log::Client::connect(&log_addr.to_string())
        .await
        .unwrap();
    let mut lines = Vec::new();
    eventually("both requests in the access topic", async || {
        lines.clear();
        let mut offset = 0;
        while let Ok(record) = client.consume("access", offset).await {
            lines.push(String::from_utf8_lossy(&record.value).into_owned());
            offset += 1;
        }
        lines.iter().any(|l| l.starts_with("GET /nosuch/x 404"))
    })
    .await;
    let logged = lines
        .iter()
        .find(|l| l.starts_with("GET /echo/logged 200"))
        .expect("the proxied request is logged");
    assert!(
        logged.contains("service=echo") && logged.contains(&format!("instance=http://{echo}")),
        "{logged}"
    );
}
