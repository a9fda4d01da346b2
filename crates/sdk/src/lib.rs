//! keel-sdk owns the SDK for writing keel services, also reachable as
//! `keel::service`: one call runs a service that registers itself, stays
//! registered, knows where its dependencies are, and leaves cleanly.
//!
//! ```text
//!  Service::run(router)
//!    ├─ binds, serves your router + GET /heart-beat + POST|DELETE /services
//!    ├─ registers with the registry (retrying with backoff until it answers)
//!    ├─ keeps a local table of required services: notifications + blocking watch
//!    │    (re-registers by itself if a restarted registry has forgotten it)
//!    └─ on shutdown: deregisters, stops accepting, drains in-flight requests
//!  Discovery::pick("log")  ── answered from the local table, no registry round trip
//!  log_shipping(...)        ── a tracing layer: log lines to the log service, batched
//! ```

mod logship;
mod runner;

pub use keel_registry::client::{Discovery, Picked, Policy, ServiceInstance};
pub use logship::{LogLayer, LogShipping, log_shipping};
pub use runner::{Service, ServiceConfig, ServiceError, stay_registered};

/// Completes on the first SIGINT or SIGTERM: the usual `shutdown` for
/// [`Service::run`] and the servers of the `keel` binary. Once it is awaited, later
/// signals no longer kill the process, so a second Ctrl-C cannot interrupt the final
/// deregistration or sync.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
