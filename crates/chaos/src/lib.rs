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
//! [`run`] drives a 3-node log cluster of real `keel log serve` processes on loopback
//! through a schedule of [`Nemesis`] faults (kill the leader, a random node, a
//! majority; pause the leader) while clients append as idempotent producers and
//! read linearizably, then heals, reads every node and checks.
//!
//! The checker is pure: it reads a recorded history and the nodes' contents and says
//! what the guarantees forbid and happened anyway.
//! - every acknowledged append is on every node, exactly once, at the offset its
//!   acknowledgement gave;
//! - every node holds the same records in the same order, at dense offsets;
//! - no node holds a value no client ever sent;
//! - a linearizable read sees every append acknowledged before the read began.

mod checker;
mod history;
mod runner;

pub use checker::{Counts, Verdict, Violation, check};
pub use history::{FinalState, History, HistoryError, Op, OpKind, Outcome};
pub use runner::{Event, Nemesis, Report, RunConfig, run, summary};
