//! keel's gateway: an HTTP reverse proxy that routes `/{service}/...` to a healthy
//! instance of `service`.
//!
//! ```text
//!  client ──> gateway ── pick (round-robin | random | power of two choices) ──> instance
//!               │  ^                                                    │
//!               │  └── local table, kept current by the registry's watch (no lookup per request)
//!               └── on failure: retry another instance (connect failures always,
//!                   sent requests if idempotent), eject after N failures
//! ```
//!
//! Bodies stream both ways through a keep-alive connection pool. This crate knows the
//! registry only through its client.

mod config;
mod listener;
mod proxy;
mod upstream;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::Router;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use keel_registry::client::{Discovery, RegistryClient, follow};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

pub use config::{Balance, GatewayConfig};
use proxy::Gateway;

/// Serves the gateway on `listener`, and `/healthz` and `/metrics` on `admin`, until
/// `shutdown` completes.
///
/// # Errors
///
/// An invalid config; I/O errors of the listeners.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    config.validate()?;
    let discovery = Discovery::default();
    let gateway = Arc::new(Gateway::new(config.clone(), discovery.clone()));
    let token = CancellationToken::new();
    let http = reqwest::Client::builder()
        .build()
        .map_err(|err| format!("building the registry client failed: {err}"))?;
    let watcher = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(follow(
            RegistryClient::new(&config.registry, http),
            discovery,
            None,
            config.watch_wait,
            std::time::Duration::from_secs(2),
            token.clone(),
            move |snapshot| {
                *gateway
                    .known
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = snapshot.services();
            },
        ))
    };
    let admin_app = Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/metrics",
            axum::routing::get({
                let gateway = Arc::clone(&gateway);
                move || metrics(Arc::clone(&gateway))
            }),
        );
    let admin_token = token.clone();
    let admin_server = tokio::spawn(async move {
        axum::serve(admin, admin_app)
            .with_graceful_shutdown(async move { admin_token.cancelled().await })
            .await
    });

    // Thread per core: each serving thread accepts from the same socket and drives
    // its connections, and their upstream connections, on its own runtime, so a
    // request never wakes another thread.
    let listener = listener
        .into_std()
        .map_err(|err| format!("preparing the listener failed: {err}"))?;
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut workers = FuturesUnordered::new();
    for worker in 0..config.serving_threads() {
        let (listener, gateway) = match listener.try_clone() {
            Ok(listener) => (listener, Arc::new(gateway.for_another_thread())),
            Err(err) => {
                token.cancel();
                return Err(format!("preparing the listener failed: {err}"));
            }
        };
        let (slots, stop) = (Arc::clone(&slots), token.clone());
        let (finished, finished_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("keel-gateway-{worker}"))
            .spawn(move || {
                let _ = finished.send(serve_thread(listener, gateway, slots, stop));
            });
        if let Err(err) = spawned {
            token.cancel();
            return Err(format!("starting a serving thread failed: {err}"));
        }
        workers.push(finished_rx);
    }
    let mut failure = tokio::select! {
        () = shutdown => None,
        // A serving thread that ends before shutdown has failed.
        Some(ended) = workers.next() => Some(ended.unwrap_or_else(|_| Err("a serving thread panicked".into()))),
    };
    token.cancel();
    while let Some(ended) = workers.next().await {
        if let Err(err) = ended.unwrap_or_else(|_| Err("a serving thread panicked".into())) {
            failure.get_or_insert(Err(err));
        }
    }
    let _ = watcher.await;
    let _ = admin_server.await;
    failure.unwrap_or(Ok(()))
}

/// One serving thread: a single-threaded runtime serving `listener` until `stop`.
fn serve_thread(
    listener: std::net::TcpListener,
    gateway: Arc<Gateway>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("starting a serving runtime failed: {err}"))?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)
            .map_err(|err| format!("adopting the listener failed: {err}"))?;
        let app = Router::new().fallback(proxy::handle).with_state(gateway);
        axum::serve(
            listener::Limited::new(listener, slots),
            app.into_make_service_with_connect_info::<listener::Peer>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|err| format!("serving the gateway failed: {err}"))
    })
}

async fn metrics(gateway: Arc<Gateway>) -> String {
    let stats = &gateway.stats;
    let mut out = String::from(
        "# HELP keel_gateway_requests_total Requests received.\n# TYPE keel_gateway_requests_total counter\n",
    );
    out.push_str(&format!(
        "keel_gateway_requests_total {}\n",
        stats.requests.load(Ordering::Relaxed)
    ));
    out.push_str("# HELP keel_gateway_responses_total Responses by status class.\n# TYPE keel_gateway_responses_total counter\n");
    for (class, counter) in stats.by_status.iter().enumerate().skip(1) {
        out.push_str(&format!(
            "keel_gateway_responses_total{{class=\"{class}xx\"}} {}\n",
            counter.load(Ordering::Relaxed)
        ));
    }
    out.push_str(&format!(
        "# HELP keel_gateway_retries_total Attempts on another instance.\n# TYPE keel_gateway_retries_total counter\nkeel_gateway_retries_total {}\n",
        stats.retries.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# HELP keel_gateway_ejections_total Instances ejected after consecutive failures.\n# TYPE keel_gateway_ejections_total counter\nkeel_gateway_ejections_total {}\n",
        stats.ejections.load(Ordering::Relaxed)
    ));
    out
}
