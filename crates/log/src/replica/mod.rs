//! A replicated log service: the topics are the state machine of a Raft group
//! (`keel-raft`), so every node holds every record at the same offset.
//!
//! ```text
//!  write (any node) ──> Proposer: one command per topic of the writes waiting
//!                          └─> Writer: leader? propose : forward to the leader (in order)
//!  Raft commits ──> TopicMachine::apply on every node ──> topic logs (no fsync)
//!                                                       └─> reply: offsets per write
//!  checkpoint (= Raft snapshot) ──> every topic synced; files + Summary
//!  read (any node) ──> the topic logs: only applied, hence committed, records
//! ```
//!
//! The Raft log's fsync is the only one on the write path; the topics are synced at
//! checkpoints, and a node that restarts cuts them back to its last checkpoint and
//! applies the Raft log from there.

mod command;
mod machine;
mod proposer;

pub(crate) use command::ProducerSeq;
pub use machine::{MAX_PRODUCERS, PRODUCER_WINDOW, ProducerState, Summary, TopicMachine};
pub(crate) use proposer::Proposer;
