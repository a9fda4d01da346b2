//! A registry, backends and a gateway on 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use futures::StreamExt;
use keel_gateway::GatewayConfig;
use tokio::sync::oneshot;

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    /// The admin address, for a gateway.
    pub(crate) admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
}

impl Running {
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) async fn registry() -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let config = keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    tokio::spawn(keel_registry::run(listener, config, async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        admin: None,
        stop: Some(stop),
    }
}

pub(crate) async fn gateway(
    registry: SocketAddr,
    tune: impl FnOnce(&mut GatewayConfig),
) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let mut config = GatewayConfig {
        registry: format!("http://{registry}"),
        watch_wait: Duration::from_millis(500),
        ..GatewayConfig::default()
    };
    tune(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(keel_gateway::run(listener, admin, config, async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        admin: Some(admin_addr),
        stop: Some(stop),
    }
}

/// A backend that echoes what it got as JSON (status 201 for POST), counts its
/// requests, sleeps on `/slow`, and counts bytes on `/sink`.
pub(crate) struct Backend {
    pub(crate) running: Running,
    pub(crate) hits: Arc<AtomicU64>,
}

pub(crate) async fn backend(name: &'static str) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let app = echo_app(name, Arc::clone(&hits));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Backend {
        running: Running {
            addr,
            admin: None,
            stop: Some(stop),
        },
        hits,
    }
}

pub(crate) async fn register(registry: SocketAddr, service: &str, backend: SocketAddr) {
    let body = serde_json::json!({"name": service, "addr": backend.to_string()});
    let response = keel_serve::client::new()
        .post(format!("http://{registry}/services"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

/// Waits until the gateway routes to `service` (its table follows the registry).
pub(crate) async fn until_routed(gateway: SocketAddr, service: &str, instances: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = keel_serve::client::new();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < instances {
        assert!(
            Instant::now() < deadline,
            "the gateway never routed to {instances} instance(s) of {service}"
        );
        if let Ok(response) = client
            .get(format!("http://{gateway}/{service}/ping"))
            .send()
            .await
            && response.status().is_success()
            && let Ok(echo) = response.json::<serde_json::Value>().await
        {
            seen.insert(echo["instance"].as_str().unwrap_or_default().to_owned());
            continue;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend that reads each request and closes the connection without answering, as
/// a process crashing mid-request would; counts the requests it took.
pub(crate) async fn crashing_backend() -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&taken);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                if stream.read(&mut buf).await.unwrap_or(0) > 0 {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                // Dropped here: the connection closes with no response.
            });
        }
    });
    (addr, taken)
}

/// Waits until nothing accepts connections at `addr` any more (a stopped server has
/// closed its listener), with a deadline.
pub(crate) async fn until_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A counter of the gateway's admin `/metrics`: `name` is the sample's name with its
/// labels, as written (`keel_gateway_responses_total{class="2xx"}`).
pub(crate) async fn counter(gateway: &Running, name: &str) -> u64 {
    let admin = gateway.admin.expect("a gateway has an admin address");
    let metrics = keel_serve::client::new()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// The echo instance's app: answers every request with what it got (JSON), counting
/// it in `hits`; `/slow` answers after 3 s, `/sink` reads the body and answers its
/// length.
pub(crate) fn echo_app(name: &'static str, hits: Arc<AtomicU64>) -> axum::Router {
    let counter = hits;
    axum::Router::new().fallback(move |request: Request| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            let (parts, body) = request.into_parts();
            if parts.uri.path().ends_with("/slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            if parts.uri.path().ends_with("/sink") {
                let mut stream = body.into_data_stream();
                let mut total: u64 = 0;
                while let Some(chunk) = stream.next().await {
                    total += chunk.unwrap().len() as u64;
                }
                return total.to_string().into_response();
            }
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let status = if parts.method == axum::http::Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let echo = serde_json::json!({
                "instance": name,
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            (status, axum::Json(echo)).into_response()
        }
    })
}
