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
//! request, drives a pooled upstream connection and relays the response, with bodies
//! streaming both ways through bounded buffers. This crate knows the registry only
//! through its client.

mod chunked;
mod config;
mod connection;
mod error;
mod forward;
mod forwarded;
mod gateway;
mod http1;
mod passive;
mod relay;
mod route;
mod upstream;

#[cfg(test)]
mod fuzz_tests;

use std::future::Future;
use std::sync::{Arc, PoisonError};

use axum::serve::Listener as _;
use keel_registry::client::{Discovery, RegistryClient, follow};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Balance, GatewayConfig};
pub use error::{GatewayError, Side, UpstreamError};
use gateway::Gateway;

/// The OpenAPI document of the admin address, served at `/openapi.json` there.
const ADMIN_OPENAPI: &str = include_str!("../../../docs/api/gateway.openapi.json");

/// The admin address's routes (the OpenAPI document's paths, as a test checks).
fn admin_routes() -> keel_serve::openapi::Routes<Arc<Gateway>> {
    keel_serve::openapi::Routes::new(ADMIN_OPENAPI)
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>| {
                    std::future::ready(gateway.metrics().response())
                },
            ),
        )
}

/// Serves the gateway on `listener`, and `/healthz` and `/metrics` on `admin`, until
/// `shutdown` completes.
///
/// # Errors
///
/// [`GatewayError::InvalidConfig`] for a setting out of range;
/// [`GatewayError::RegistryClient`] and [`GatewayError::Serve`] when starting or
/// serving fails.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    config.validate()?;
    let discovery = Discovery::default();
    let gateway = Arc::new(
        Gateway::new(config.clone(), discovery.clone())
            .map_err(|err| keel_serve::InvalidConfig::new("client_tls", err.to_string()))?,
    );
    let token = CancellationToken::new();
    let http =
        keel_serve::client::with_tls(keel_serve::client::builder(), config.client_tls.as_ref())
            .map_err(|err| keel_serve::InvalidConfig::new("client_tls", err.to_string()))?
            .build()
            .map_err(GatewayError::RegistryClient)?;
    let watcher = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(follow(
            RegistryClient::new(&config.registry, http)
                .with_token(config.registry_token.as_deref()),
            discovery,
            None,
            config.watch_wait,
            std::time::Duration::from_secs(2),
            token.clone(),
            move |known| {
                gateway
                    .known
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone_from(known);
                gateway.synced.send_replace(true);
            },
        ))
    };
    let admin_app = admin_routes()
        .into_router()
        .fallback(|| async {
            keel_serve::http::ErrorBody::new(
                "not_found",
                "no such route; the admin address serves /healthz, /metrics and /openapi.json",
            )
            .response(axum::http::StatusCode::NOT_FOUND)
        })
        .with_state(Arc::clone(&gateway));
    let tls_config = config
        .tls
        .as_ref()
        .map(keel_serve::tls::server_config)
        .transpose()
        .map_err(|err| keel_serve::InvalidConfig::new("tls", err.to_string()))?;
    let tls = tls_config.as_ref().map(|server| {
        // The gateway speaks HTTP/1.1 to its clients.
        let mut front = (**server).clone();
        front.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(front))
    });
    // The admin port takes the same certificate (HTTP/1.1 and HTTP/2).
    let admin_limits = keel_serve::AppLimits {
        header_timeout: config.header_timeout,
        max_connections: Some(64),
        tls: tls_config,
    };
    let admin_server = tokio::spawn(keel_serve::serve_app(
        admin,
        admin_app,
        admin_limits,
        token.clone(),
    ));

    // Thread per core: each serving thread drives the connections handed to it, and
    // their upstream connections, on its own runtime, so a request never wakes
    // another thread.
    let options = keel_serve::Options {
        threads: config.workers,
        // A client connection may hold an upstream connection too.
        max_connections: Some(keel_serve::connections_within_fd_limit(
            config.max_connections,
            2,
            64,
            "gateway",
        )),
        shed: Arc::clone(&gateway.stats.shed),
        name: "keel-gateway".into(),
    };
    let stop = token.clone();
    let serving = keel_serve::serve(listener, options, token.clone(), move |_, handed| {
        let gateway = Arc::new(gateway.for_another_thread());
        serve_thread(gateway, handed, stop.clone(), tls.clone())
    });
    let served = keel_serve::http::serve_until(serving, shutdown, async || token.cancel()).await;
    let _ = watcher.await;
    let _ = admin_server.await;
    served.map_err(GatewayError::Serve)
}

/// Serves the connections handed to one thread, each on a task of its own, until
/// `stop` is cancelled and every connection has finished its exchange under way.
async fn serve_thread(
    gateway: Arc<Gateway>,
    mut handed: keel_serve::Handed,
    stop: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (mut connection, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = handed.accept() => accepted,
        };
        let idle = connection.take_idle();
        let gateway = Arc::clone(&gateway);
        let stop = stop.clone();
        match &tls {
            None => {
                connections.spawn(connection::serve_connection(
                    gateway, connection, peer, stop, idle,
                ));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    // Under the header deadline: a client that starts a handshake
                    // and stalls holds nothing for long.
                    let deadline = gateway.config.header_timeout;
                    match tokio::time::timeout(deadline, acceptor.accept(connection)).await {
                        Ok(Ok(stream)) => {
                            connection::serve_connection(gateway, stream, peer, stop, idle).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake not done within the header deadline"),
                    }
                });
            }
        }
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

#[cfg(test)]
mod admin_tests {
    #[test]
    fn every_admin_route_should_be_in_the_openapi_document_and_the_reverse() {
        keel_serve::openapi::path_drift(super::ADMIN_OPENAPI, super::admin_routes().paths())
            .unwrap();
    }
}
