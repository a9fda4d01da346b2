//! Serving an axum app on a listener with the limits a server facing the network
//! needs, which `axum::serve` does not set: a deadline for each request head (hyper's
//! `header_read_timeout`, which needs a timer) and, optionally, a cap on open
//! connections. HTTP/1.1 and HTTP/2 (gRPC) share the listener.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The limits [`serve_app`] applies to each connection.
#[derive(Debug, Clone, Copy)]
pub struct AppLimits {
    /// How long an HTTP/1.1 request head may take to arrive before the connection is
    /// closed: a client that opens connections and sends half a head cannot hold them.
    pub header_timeout: Duration,
    /// Connections open at once; past it, the next waits in the accept backlog until
    /// one closes. `None`: no limit (the listener may have one of its own, as
    /// [`crate::serve`] does).
    pub max_connections: Option<usize>,
}

/// Serves `app` on the connections `listener` yields until `stop` is cancelled; then
/// stops accepting, lets every connection finish the request under way (HTTP/1.1) or
/// its streams (HTTP/2, after a GOAWAY), and returns once all have closed.
pub async fn serve_app<L>(mut listener: L, app: Router, limits: AppLimits, stop: CancellationToken)
where
    L: Listener,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = limits
        .max_connections
        .map(|max| Arc::new(Semaphore::new(max)));
    let connections = TaskTracker::new();
    loop {
        let slot = match &slots {
            Some(slots) => tokio::select! {
                biased;
                () = stop.cancelled() => break,
                slot = Arc::clone(slots).acquire_owned() => match slot {
                    Ok(slot) => Some(slot),
                    Err(_) => break,
                },
            },
            None => None,
        };
        let (io, _peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}
