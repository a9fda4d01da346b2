//! keel-sdk owns the SDK for writing keel services, also reachable as
//! `keel::service`: one call runs a service that registers itself, stays
//! registered, knows where its dependencies are, and leaves cleanly.
//!
//! ```text
//!  Service::run(router)
//!    ├─ binds, serves your router + GET /heart-beat + GET /readyz + POST|DELETE /services
//!    ├─ registers with the registry (retrying with backoff until it answers), once
//!    │    its Readiness says ready (at once without one)
//!    ├─ keeps a local table of required services: notifications + blocking watch
//!    │    (re-registers by itself if a restarted registry has forgotten it)
//!    └─ on shutdown: deregisters, stops accepting, drains in-flight requests
//!  Discovery::pick("log")  ── answered from the local table, no registry round trip
//!  log_shipping(...)        ── a tracing layer: log lines to the log service, batched
//!  log_shipping_discovered  ── the same, to whichever `log` instance discovery offers
//! ```

mod logship;
mod readiness;
mod runner;

pub use keel_log_client::{Shipper, new_producer_id};
pub use keel_registry::client::{
    Discovery, Picked, Policy, RegistryClient, ServiceInstance, Snapshot, WatchedInstance,
};
pub use logship::{LogLayer, LogShipping, log_shipping, log_shipping_discovered};
pub use readiness::Readiness;
pub use runner::{SdkError, Service, ServiceConfig, stay_registered};

/// Completes on the first SIGINT or SIGTERM: the usual `shutdown` for
/// [`Service::run`] and the servers of the `keel` binary. The handlers are installed
/// when this is called, not when the future is first polled, so call it before
/// announcing the server (a signal that arrives in between is not lost, and does not
/// kill the process). From then on signals no longer kill the process, so a second
/// Ctrl-C cannot interrupt the final deregistration or sync. Must be called within a
/// tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Ok(mut interrupt), Err(err)) => {
                    tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                    interrupt.recv().await;
                }
                (Err(err), _) => {
                    tracing::warn!(error = %err, "cannot listen for SIGINT; waiting for Ctrl-C another way");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
