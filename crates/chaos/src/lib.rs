//! keel-chaos owns keel's fault-injection suite: what clients did to a cluster while
//! faults were injected (a [`History`]), what each node holds once the faults are
//! healed ([`FinalState`]), and the [`check`] that judges them.
//!
//! ```text
//!  clients ──ops──> History (JSON lines: invoked, then ok / fail / unknown)
//!  nodes after heal ──> FinalState (each node's records, in offset order)
//!  check(history, final state) ──> Verdict { counts, violations }
//! ```
//!
//! [`run`] drives a 3-node cluster of real `keel log serve` (or `keel registry
//! serve`) processes, each in its own network namespace (or, where namespaces
//! cannot be made, on 127.0.0.1), through a schedule of [`Nemesis`] faults
//! (processes killed or paused, the network partitioned, files damaged) while
//! clients write and read linearizably (appends as idempotent or plain producers;
//! registrations, deregistrations and `?consistent` lookups), then heals, reads
//! every node and checks ([`check`], [`check_registry`]).
//!
//! The checker is pure: it reads a recorded history and the nodes' contents and says
//! what the guarantees forbid and happened anyway.
//! - every acknowledged append is on every node, exactly once, at the offset its
//!   acknowledgement gave;
//! - every node holds the same records in the same order, at dense offsets;
//! - no node holds a value no client ever sent;
//! - a linearizable read sees every append acknowledged before the read began.

mod checker;
mod cluster;
mod history;
mod nemesis;
mod net;
mod registry_check;
mod registry_workload;
mod runner;

pub use checker::{Counts, Verdict, Violation, check};
pub use cluster::{Network, Service};
pub use history::{FinalState, History, HistoryError, Op, OpKind, Outcome, RegistryState};
pub use nemesis::{Kind, Nemesis};
pub use registry_check::check_registry;
pub use runner::{Event, Report, RunConfig, quantile, run, summary};

/// Whether this machine can give each node its own network namespace (root,
/// iproute2, a kernel that allows it); why not, when it cannot.
///
/// # Errors
///
/// The reason namespaces cannot be made here.
pub fn namespaces_available() -> Result<(), String> {
    net::Net::available()
}
