//! keel: the `keel` binary's commands, and the SDK for writing services against
//! keel ([`service`]).
//!
//! This crate wires the parts together: it owns the command line, configuration
//! layering (defaults, then a TOML file, then `KEEL_*` environment variables, then
//! flags) and process concerns (signals, exit codes). The parts themselves live in
//! their crates: `keel-log` (log service and client), `keel-commitlog` (storage).

pub mod cli;
pub mod up;
mod values;

/// The SDK for writing services against keel (the `keel-sdk` crate).
pub use keel_sdk as service;
