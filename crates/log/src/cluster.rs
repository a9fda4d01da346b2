//! Running the log service as a node of a cluster: its Raft node, the write path
//! through it, bootstrap (`--peers`) and joining (`--join`), and readiness.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_raft::membership::{self, Readiness};
pub use keel_raft::membership::{ClusterOptions, Membership, admin, leader_in, parse_peers};
use keel_raft::{RaftNode, Writer};

use crate::config::LogServiceConfig;
use crate::error::LogServiceError;
use crate::replica::{Proposer, Summary, TopicMachine};
use crate::topics::Topics;

/// The Raft cluster name of log service nodes.
pub const CLUSTER_NAME: &str = "keel-log";

/// How long a write may wait to be committed before it is answered as
/// unavailable (a leader cut off from the majority never commits it).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a replica's topics know of their node.
#[derive(Debug)]
pub(crate) struct Replication {
    pub(crate) proposer: Proposer,
    pub(crate) writer: Writer,
    pub(crate) readiness: Readiness,
}

/// A started cluster node: its topics (written through Raft) and its Raft node.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// The replicated topics, to serve.
    pub topics: Arc<Topics>,
    /// The Raft node, whose service is served beside `log.v1.Log`.
    pub raft: RaftNode,
}

/// Starts node `options.node_id` on `config.data_dir`: opens its Raft log and its
/// topics at their last checkpoint, starts Raft, and (with `--peers`) forms the
/// cluster. With `--join`, call [`ClusterNode::join`] once the node serves.
///
/// # Errors
///
/// The data directory holds a single node's topics; the settings are invalid; the
/// storage fails to open (a damaged replica says so).
pub async fn start(
    config: LogServiceConfig,
    options: &ClusterOptions,
) -> Result<ClusterNode, LogServiceError> {
    let raft_dir = config.data_dir.join("raft");
    refuse_single_node_data(&config.data_dir, &raft_dir)?;
    let queue_depth = config.queue_depth;
    let enqueue_timeout = config.enqueue_timeout;
    let max_batch_bytes = config.max_batch_bytes as usize;
    let mut opened: Option<Arc<Topics>> = None;
    let node = RaftNode::start(
        options.node_id,
        CLUSTER_NAME,
        &raft_dir,
        &options.settings,
        |summary| {
            let summary = summary.map(Summary::decode).transpose()?;
            let topics =
                Topics::open_replica(config.clone(), summary.as_ref()).map_err(
                    |err| match err {
                        LogServiceError::DamagedReplica { .. } => {
                            keel_raft::Damaged(err.to_string()).into_io()
                        }
                        other => std::io::Error::other(other),
                    },
                )?;
            let topics = Arc::new(topics);
            opened = Some(Arc::clone(&topics));
            Ok(TopicMachine::new(topics, summary.as_ref()))
        },
    )
    .await
    .map_err(|err| LogServiceError::Unavailable(format!("starting the Raft node: {err}")))?;
    let topics = opened
        .ok_or_else(|| LogServiceError::Unavailable("the state machine did not open".into()))?;
    let writer = Writer::new(node.raft.clone(), options.node_id, options.leader_wait())
        .with_tls(node.tls.clone());
    let proposer = Proposer::start(
        writer.clone(),
        queue_depth,
        enqueue_timeout,
        max_batch_bytes,
        COMMIT_TIMEOUT,
    );
    topics.set_replication(Replication {
        proposer,
        readiness: Readiness::start(writer.clone(), options.node_id, &options.settings),
        writer,
    });
    membership::form(&node, options)
        .await
        .map_err(LogServiceError::BadRequest)?;
    Ok(ClusterNode { topics, raft: node })
}

/// Refuses to start a cluster node on a data directory that a single node used:
/// its topics were never replicated, and a replica would discard them.
fn refuse_single_node_data(data_dir: &Path, raft_dir: &Path) -> Result<(), LogServiceError> {
    let topics = data_dir.join("topics");
    let has_topics = std::fs::read_dir(&topics).is_ok_and(|mut entries| entries.next().is_some());
    if has_topics && !raft_dir.exists() {
        return Err(LogServiceError::BadRequest(format!(
            "{} holds the topics of a single-node log service; a cluster node starts on an empty data directory (or on its own from an earlier run)",
            data_dir.display()
        )));
    }
    Ok(())
}

impl ClusterNode {
    /// Asks the node at `addr` (any member; followed to the leader) to add this
    /// node, retrying until it is a member (see [`membership::join`]).
    ///
    /// # Errors
    ///
    /// The cluster refused for good (this id is a member at another address).
    pub async fn join(&self, addr: &str, advertise: &str) -> Result<(), LogServiceError> {
        membership::join(&self.raft, addr, advertise)
            .await
            .map_err(LogServiceError::BadRequest)
    }
}
