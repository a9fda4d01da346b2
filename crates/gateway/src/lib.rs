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
//! The proxy speaks HTTP/1.1 itself (`http1`): one task per client connection reads a
//! request, drives a pooled upstream connection and relays the answer, with bodies
//! streaming both ways through bounded buffers. This crate knows the registry only
//! through its client.

mod config;
mod http1;
mod proxy;
mod upstream;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::Router;
use axum::serve::Listener as _;
use keel_registry::client::{Discovery, RegistryClient, follow};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

    // Thread per core: each serving thread drives the connections handed to it, and
    // their upstream connections, on its own runtime, so a request never wakes
    // another thread.
    let options = keel_serve::Options {
        threads: config.workers,
        max_connections: Some(config.max_connections),
        name: "keel-gateway".into(),
    };
    let stop = token.clone();
    let serving = keel_serve::serve(listener, options, token.clone(), move |_, handed| {
        let gateway = Arc::new(gateway.for_another_thread());
        serve_thread(gateway, handed, stop.clone())
    });
    tokio::pin!(serving);
    let early = tokio::select! {
        () = shutdown => None,
        // Serving ended before shutdown: a thread failed.
        served = &mut serving => Some(served),
    };
    token.cancel();
    let served = match early {
        Some(served) => served,
        None => serving.await,
    };
    let _ = watcher.await;
    let _ = admin_server.await;
    served.map_err(|err| format!("serving the gateway failed: {err}"))
}

/// Serves the connections handed to one thread, each on a task of its own, until
/// `stop` is cancelled and every connection has finished its exchange under way.
async fn serve_thread(
    gateway: Arc<Gateway>,
    mut handed: keel_serve::Handed,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (connection, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = handed.accept() => accepted,
        };
        connections.spawn(proxy::serve_connection(
            Arc::clone(&gateway),
            connection,
            peer,
            stop.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
    Ok(())
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
