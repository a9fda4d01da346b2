//! The SDK for writing keel services: one call runs a service that registers
//! itself, stays registered, knows where its dependencies are, and leaves cleanly.
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

mod discovery;
mod logship;
mod runner;

pub use discovery::{Discovery, Picked, Policy, ServiceInstance};
pub use logship::{LogLayer, LogShipping, log_shipping};
pub use runner::{Service, ServiceConfig, ServiceError};
