//! What every replicated keel service does the same way around its Raft node: how a
//! node becomes a member (`--peers`, `--join`, or waiting to be added), whether it
//! is ready to serve, and the admin client that `keel cluster` and joining use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_proto::raft::v1 as pb;

use crate::{Node, NodeId, NodeSettings, RaftNode, Writer};

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

impl ClusterOptions {
    /// How long a write waits for a leader to be known: about two elections.
    pub fn leader_wait(&self) -> Duration {
        self.settings.election_timeout.1 * 3
    }
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

/// Forms the cluster from `--peers` (a no-op for a node that is a member already,
/// or for the other ways of joining).
///
/// # Errors
///
/// `--peers` does not name this node, or the membership cannot be written.
pub async fn form(node: &RaftNode, options: &ClusterOptions) -> Result<(), String> {
    let Membership::Peers(peers) = &options.membership else {
        return Ok(());
    };
    let members: BTreeMap<NodeId, Node> = peers
        .iter()
        .map(|(id, addr)| (*id, Node::new(addr.clone())))
        .collect();
    if !members.contains_key(&options.node_id) {
        return Err(format!(
            "--peers does not name this node ({})",
            options.node_id
        ));
    }
    let initialized = node
        .raft
        .is_initialized()
        .await
        .map_err(|err| format!("forming the cluster: {err}"))?;
    if !initialized
        && let Some(peer) = remembered_by(options.node_id, peers, node.tls.as_ref()).await
    {
        // Its data is gone (a wiped or replaced disk) but the cluster counts on it:
        // a vote from it now could be a second vote in a term it voted in before.
        tracing::error!(
            node = options.node_id,
            by = peer,
            "this node's data directory is empty, but the running cluster counts it as a member: it lost its data; it takes everything from the leader again and does not vote until it has"
        );
        return node
            .mark_damaged(&format!(
                "empty data directory, but node {peer} counts this node as a member: its data was lost"
            ))
            .map_err(|err| format!("marking the node damaged: {err}"));
    }
    node.bootstrap(&members)
        .await
        .map_err(|err| format!("forming the cluster: {err}"))
}

/// The first peer that says a cluster with `id` as a member has committed entries
/// (so `id` once held them), if any answers within a second.
async fn remembered_by(
    id: NodeId,
    peers: &BTreeMap<NodeId, String>,
    tls: Option<&crate::peer::PeerTls>,
) -> Option<NodeId> {
    for (peer, addr) in peers.iter().filter(|(peer, _)| **peer != id) {
        let ask = async {
            let mut client = admin_over(addr, tls).await.ok()?;
            client
                .status(pb::ClusterStatusRequest {})
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(1), ask).await else {
            continue;
        };
        // Index 0 is the membership every node writes at start; a leader commits
        // from 1 on.
        if status.last_log_index.is_some_and(|last| last >= 1)
            && status.members.iter().any(|member| member.node_id == id)
        {
            return Some(*peer);
        }
    }
    None
}

/// Whether a node may serve: it knows a leader and has applied what was committed
/// when it started (`GET /readyz`).
#[derive(Debug)]
pub struct Readiness {
    writer: Writer,
    node_id: NodeId,
    caught_up: Arc<AtomicBool>,
    /// How long a leader waits for a majority to confirm it leads.
    lease: Duration,
}

impl Readiness {
    /// Watches node `node_id` through `writer`; catching up starts at once, in the
    /// background.
    pub fn start(writer: Writer, node_id: NodeId, settings: &NodeSettings) -> Self {
        let caught_up = Arc::new(AtomicBool::new(false));
        let (flag, catching_up) = (Arc::clone(&caught_up), writer.clone());
        tokio::spawn(async move {
            if catching_up.catch_up().await.is_ok() {
                flag.store(true, Ordering::Release);
                tracing::info!("caught up with the cluster: ready");
            }
        });
        Self {
            writer,
            node_id,
            caught_up,
            lease: settings.election_timeout.1,
        }
    }

    /// Whether the node has applied what was committed when it started.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Whether the node serves: it knows a leader and has caught up since start. A
    /// leader checks that a majority still follows it (a leader cut off from the
    /// others does not know it is deposed).
    ///
    /// # Errors
    ///
    /// Why it does not serve yet.
    pub async fn ready(&self) -> Result<(), String> {
        let raft = self.writer.raft();
        let metrics = raft.metrics().borrow().clone();
        if let Err(fatal) = &metrics.running_state {
            return Err(format!("node {}'s Raft stopped: {fatal}", self.node_id));
        }
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
        if !self.caught_up() {
            return Err(format!(
                "node {} is catching up to the commit index it learned at start",
                self.node_id
            ));
        }
        Ok(())
    }
}

/// Asks the node at `addr` (any member; followed to the leader) to add `node`,
/// reachable at `advertise`, retrying until it is a member: a no-op for a node that
/// is one already. Adding waits until the node has caught up, through a snapshot if
/// needed.
///
/// # Errors
///
/// The cluster refused for good (this id is a member at another address).
pub async fn join(node: &RaftNode, addr: &str, advertise: &str) -> Result<(), String> {
    let id = node.id;
    let is_member = || {
        node.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|voter| voter == id)
    };
    let mut target = addr.to_owned();
    let mut attempt = 0u32;
    // Retried until it is a member (the cluster may not be up yet), less often the
    // longer it takes.
    let mut pause = Duration::from_millis(200);
    while !is_member() {
        attempt += 1;
        match admin_over(&target, node.tls.as_ref()).await {
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
                        return Err(status.message().to_owned());
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
                tracing::info!(attempt, via = target, reason = %err, "cannot reach the cluster yet; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

/// A client of the `keel.raft.v1.Raft` service at `addr` (`host:port`, or an
/// `http://` URL).
///
/// # Errors
///
/// The address is malformed or does not answer.
pub async fn admin(
    addr: &str,
) -> Result<pb::raft_client::RaftClient<tonic::transport::Channel>, tonic::transport::Error> {
    admin_over(addr, None).await
}

/// As [`admin`], over mutual TLS with `tls` when given.
///
/// # Errors
///
/// As [`admin`].
pub async fn admin_over(
    addr: &str,
    tls: Option<&crate::peer::PeerTls>,
) -> Result<pb::raft_client::RaftClient<tonic::transport::Channel>, tonic::transport::Error> {
    let endpoint = crate::peer::endpoint(addr, tls)?.connect_timeout(Duration::from_secs(2));
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
