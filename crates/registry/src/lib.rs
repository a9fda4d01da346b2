//! keel's service registry: who is running where, whether it is healthy, and who
//! needs to know.
//!
//! - [`Registration`] parses what instances send, in the canonical shape and in both
//!   dialects of the original system.
//! - [`RegistryState`] is the pure state machine: [`Command`]s in, availability
//!   [`Event`]s out, no I/O, no clock, so that it can be replicated.
//!
//! The HTTP API, the health checker, the notifier and the SDK's client are built
//! around it. This crate knows nothing of the log service or the gateway.

mod error;
mod registration;
mod state;

pub use error::{RegistryError, Result};
pub use registration::{MAX_NAME, Registration, base_url, parse_identity, validate_service_name};
pub use state::{Command, Event, Health, Instance, RegistryState};
