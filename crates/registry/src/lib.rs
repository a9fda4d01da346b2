//! keel's service registry: who is running where, whether it is healthy, and who
//! needs to know.
//!
//! - [`Registration`] parses what instances send, in the canonical shape and in both
//!   dialects of the original system.
//! - [`RegistryState`] is the pure state machine: [`Command`]s in, availability
//!   [`Event`]s out, no I/O, no clock, so that it can be replicated.
//!
//! - [`run`] serves it: the HTTP API (`POST`/`DELETE /services`, discovery, watches),
//!   active health checks by a bounded pool, and notifications to dependents, each
//!   dependent with its own ordered queue, outside any lock.
//! - [`replica`] and [`run_node`] run it as a node of a Raft cluster: every change
//!   committed by a majority before it is acknowledged, lookups from every node, and
//!   health checks and notifications from the leader alone.
//!
//! This crate knows nothing of the log service or the gateway.

mod checker;
pub mod client;
mod config;
mod error;
mod http;
mod notifier;
mod pacer;
mod registration;
mod registry;
pub mod replica;
mod resolver;
mod server;
mod state;

#[cfg(test)]
mod fuzz_tests;

pub use config::RegistryConfig;
pub use error::{RegistryClientError, RegistryError, Result};
pub use notifier::INDEX_HEADER;
pub use registration::{
    MAX_META_BYTES, MAX_NAME, MAX_REQUIRED, MAX_URL, Registration, base_url, parse_identity,
    validate_service_name,
};
pub use registry::{Applied, Change, Registry, Required};
pub use server::{run, run_node};
pub use state::{
    Claim, Command, Delta, Event, Health, Instance, MAX_OUTBOX, Notice, Owner, RegistryState,
};
