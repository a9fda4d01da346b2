//! keel's consensus glue: openraft, with its log on `keel-commitlog`, snapshots made
//! of the state machine's own files, and (with the log and registry services) a
//! network over gRPC.
//!
//! ```text
//!  client write ──> Raft (openraft) ──append──> LogStore ── commitlog (entry i at offset i)
//!                        │                          └──> sync thread: one fsync per group,
//!                        │                                then "flushed" for the whole group
//!                        └──apply committed──> Machine<S> ──> S: StateMachine (no fsync)
//!                                                   └── checkpoint = snapshot: S syncs its files,
//!                                                       they are hard-linked under snapshots/
//! ```
//!
//! - **One fsync per batch.** Appends are written at once (readable on return, as
//!   openraft requires) and made durable by a sync thread that covers every append
//!   waiting with one `fdatasync`.
//! - **The state machine applies without syncing.** Its durable point is a
//!   *checkpoint*, which is also the Raft snapshot: the state machine syncs its
//!   files and lists them; openraft purges the Raft log only below a snapshot, so
//!   the log always holds what a restart must apply again.
//! - **Snapshots are files, not re-encoded records**: the files of a checkpoint are
//!   hard-linked (they only grow, so a length fixes their content) and sent in
//!   checksummed chunks.
//!
//! This crate knows no topic and no service: a state machine is anything that
//! implements [`StateMachine`] over opaque [`Command`] bytes.

pub mod cluster;
mod codec;
mod damage;
mod error;
mod log_store;
mod machine;
pub mod membership;
mod meta;
mod metrics;
mod network;
mod node;
pub mod peer;
mod service;
mod snapshot;
mod wire;
mod writer;

pub use damage::{DamageMark, Damaged};
pub use error::RaftStoreError;
pub use log_store::{LogReader, LogStore, LogStoreConfig};
pub use machine::{Checkpoint, CheckpointFile, Machine, StateMachine};
pub use metrics::render_metrics;
pub use network::{Network, NetworkFactory, SNAPSHOT_CHUNK_BYTES};
pub use node::{NodeSettings, RaftNode, StartError};
pub use service::{RaftGuard, RaftService, cluster_guard};
pub use snapshot::{Manifest, ManifestFile, SnapshotFiles, SnapshotMeta};
pub use writer::{Pending, WriteError, Writer};

/// A node's id in a cluster.
pub type NodeId = u64;

/// A node's address, as members know it.
pub type Node = openraft::BasicNode;

/// The Raft node of a keel service.
pub type Raft = openraft::Raft<TypeConfig>;

/// A Raft log entry of keel's type config.
pub type Entry = openraft::Entry<TypeConfig>;

/// A position in the Raft log.
pub type LogId = openraft::LogId<NodeId>;

/// Who a node voted for, in which term.
pub type Vote = openraft::Vote<NodeId>;

/// Where openraft's storage calls fail.
pub type StorageError = openraft::StorageError<NodeId>;

openraft::declare_raft_types!(
    /// keel's Raft types: commands and replies are bytes that the state machine
    /// encodes; snapshots are files.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFiles,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

/// A command for the state machine, encoded by it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command(pub bytes::Bytes);

/// The state machine's answer to a command, encoded by it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply(pub bytes::Bytes);
