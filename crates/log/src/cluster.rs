//! Running the log service as a node of a cluster: its Raft node, the write path
//! through it, bootstrap (`--peers`) and joining (`--join`), and readiness.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_proto::raft::v1 as pb;
use keel_raft::{Node, NodeId, NodeSettings, RaftNode, Writer};

use crate::config::LogServiceConfig;
use crate::error::LogServiceError;
use crate::replica::{Proposer, Summary, TopicMachine};
use crate::topics::Topics;

/// The Raft cluster name of log service nodes.
pub const CLUSTER_NAME: &str = "keel-log";

/// How long a write may wait to be committed before it is answered as
/// unavailable (a leader cut off from the majority never commits it).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node joins its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Static bootstrap: every node is given the same members, and they form the
    /// cluster by themselves, in any order, as often as they restart.
    Peers(BTreeMap<NodeId, String>),
    /// Grow a running cluster: ask the node at this address (any member) to add
    /// this one, which it does once this node has caught up.
    Join(String),
    /// Wait, a member of nothing, until an operator adds this node (`keel cluster
    /// add-node`).
    Wait,
}

/// A node's place in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// This node's id: unique in the cluster, never reused by a node that lost
    /// its data.
    pub node_id: NodeId,
    /// The address the other nodes reach this one at (its `--addr`).
    pub advertise: String,
    /// How it becomes a member.
    pub membership: Membership,
    /// Raft timing and snapshots.
    pub settings: NodeSettings,
}

/// Parses `--peers`: `1=host:port,2=host:port,...`.
///
/// # Errors
///
/// An entry is not `id=host:port`, an id is 0 or given twice.
pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut peers = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| format!("peer {entry:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("peer {entry:?}: the id is not a positive integer"))?;
        if id == 0 {
            return Err(format!("peer {entry:?}: node ids start at 1"));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("peer {entry:?}: the address is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(format!("node {id} is given twice in --peers"));
        }
    }
    if peers.is_empty() {
        return Err("--peers names no node".into());
    }
    Ok(peers)
}

/// What a replica's topics know of their node.
#[derive(Debug)]
pub(crate) struct Replication {
    pub(crate) proposer: Proposer,
    pub(crate) writer: Writer,
    pub(crate) node_id: NodeId,
    /// Set once the node has applied what was committed when it started.
    pub(crate) caught_up: AtomicBool,
    /// How long a leader waits for a majority to confirm it leads.
    pub(crate) lease: Duration,
}

impl Replication {
    /// Whether the node serves: it knows a leader and has caught up since start. A
    /// leader checks that a majority still follows it (a leader cut off from the
    /// others does not know it is deposed).
    pub(crate) async fn ready(&self) -> Result<(), String> {
        let raft = self.writer.raft();
        let metrics = raft.metrics().borrow().clone();
        match metrics.current_leader {
            None => return Err(format!("node {} knows no leader", self.node_id)),
            Some(leader) if leader == self.node_id => {
                match tokio::time::timeout(self.lease, raft.get_read_log_id()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        return Err(format!("node {} leads no majority: {err}", self.node_id));
                    }
                    Err(_) => {
                        return Err(format!(
                            "node {} leads, but no majority answered it within {:?}",
                            self.node_id, self.lease
                        ));
                    }
                }
            }
            Some(_) => {}
        }
        if !self.caught_up.load(Ordering::Acquire) {
            return Err(format!(
                "node {} is catching up to the commit index it learned at start",
                self.node_id
            ));
        }
        Ok(())
    }
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
    // A write waits this long for a leader: about two elections.
    let leader_wait = options.settings.election_timeout.1 * 3;
    let writer = Writer::new(node.raft.clone(), options.node_id, leader_wait);
    let proposer = Proposer::start(
        writer.clone(),
        queue_depth,
        enqueue_timeout,
        max_batch_bytes,
        COMMIT_TIMEOUT,
    );
    topics.set_replication(Replication {
        proposer,
        writer: writer.clone(),
        node_id: options.node_id,
        caught_up: AtomicBool::new(false),
        lease: options.settings.election_timeout.1,
    });
    if let Membership::Peers(peers) = &options.membership {
        let members: BTreeMap<NodeId, Node> = peers
            .iter()
            .map(|(id, addr)| (*id, Node::new(addr.clone())))
            .collect();
        if !members.contains_key(&options.node_id) {
            return Err(LogServiceError::BadRequest(format!(
                "--peers does not name this node ({})",
                options.node_id
            )));
        }
        node.bootstrap(&members)
            .await
            .map_err(|err| LogServiceError::Unavailable(format!("forming the cluster: {err}")))?;
    }
    tokio::spawn(catch_up(Arc::clone(&topics), writer));
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

/// Marks the node caught up once it has applied what the leader had committed
/// when the node started.
async fn catch_up(topics: Arc<Topics>, writer: Writer) {
    if writer.catch_up().await.is_ok() {
        if let Some(replication) = topics.replication() {
            replication.caught_up.store(true, Ordering::Release);
        }
        tracing::info!("caught up with the cluster: ready");
    }
}

impl ClusterNode {
    /// Asks the node at `addr` (any member; followed to the leader) to add this
    /// node, retrying until it is a member: a no-op for a node that is one already.
    /// Adding waits until this node has caught up, through a snapshot if needed.
    ///
    /// # Errors
    ///
    /// The cluster refused for good (this id is a member at another address).
    pub async fn join(&self, addr: &str, advertise: &str) -> Result<(), LogServiceError> {
        let id = self.raft.id;
        let is_member = || {
            self.raft
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|voter| voter == id)
        };
        let mut target = addr.to_owned();
        let mut attempt = 0u32;
        // Retried until it is a member (the cluster may not be up yet), less often
        // the longer it takes.
        let mut pause = Duration::from_millis(200);
        while !is_member() {
            attempt += 1;
            match crate::cluster::admin(&target).await {
                Ok(mut client) => {
                    let request = pb::AddNodeRequest {
                        node_id: id,
                        addr: advertise.to_owned(),
                        learner: false,
                    };
                    match client.add_node(request).await {
                        Ok(_) => {
                            tracing::info!(node = id, via = target, "joined the cluster");
                            return Ok(());
                        }
                        Err(status) if status.code() == tonic::Code::AlreadyExists => {
                            return Err(LogServiceError::BadRequest(status.message().to_owned()));
                        }
                        Err(status) => {
                            if let Some(leader) = leader_in(status.message()) {
                                target = leader;
                            }
                            tracing::info!(
                                attempt,
                                via = target,
                                reason = status.message(),
                                "join not done yet; retrying"
                            );
                        }
                    }
                }
                Err(err) => {
                    tracing::info!(attempt, via = target, reason = %err, "cannot reach the cluster yet; retrying")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        Ok(())
    }
}

/// A client of the `keel.raft.v1.Raft` service at `addr`.
///
/// # Errors
///
/// The address is malformed or does not answer.
pub async fn admin(
    addr: &str,
) -> Result<pb::raft_client::RaftClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2));
    Ok(pb::raft_client::RaftClient::new(endpoint.connect().await?))
}

/// The leader's address in a "not the leader" refusal (`... at HOST:PORT`).
pub fn leader_in(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("the leader is node ")?;
    let (_, addr) = rest.split_once(" at ")?;
    let addr = addr.trim();
    (!addr.is_empty()).then(|| addr.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_should_parse_and_bad_ones_be_named() {
        let peers = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002,3=node3:7003").expect("parses");
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[&3], "node3:7003");
        for bad in ["", "1", "0=h:1", "x=h:1", "1=h", "1=h:1,1=h:2", "1=:80"] {
            assert!(parse_peers(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_leader_address_should_be_read_from_a_refusal() {
        assert_eq!(
            leader_in("node 2 is not the leader; the leader is node 1 at 127.0.0.1:7001")
                .as_deref(),
            Some("127.0.0.1:7001")
        );
        assert_eq!(
            leader_in("node 2 is not the leader; the leader is unknown"),
            None
        );
    }
}
