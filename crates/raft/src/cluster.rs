//! Operator commands on a running cluster: its status as one node sees it, and
//! adding and removing members. Membership changes only when an operator asks,
//! never because a node looks dead: a node that is down is still a member, and its
//! place in the majority waits for it.

use std::collections::{BTreeMap, BTreeSet};

use keel_proto::raft::v1 as pb;
use openraft::{ChangeMembers, ServerState};
use tonic::Status;

use crate::{Node, NodeId, Raft, wire};

/// What node `raft` knows of the cluster now; `damaged`: whether its replica is
/// damaged and catching up.
pub fn status(raft: &Raft, damaged: bool) -> pb::ClusterStatus {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let matched = metrics.replication.clone().unwrap_or_default();
    let members = membership
        .nodes()
        .map(|(id, node)| pb::Member {
            node_id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
            matched: matched
                .get(id)
                .copied()
                .flatten()
                .as_ref()
                .map(wire::log_id_to),
        })
        .collect();
    let role = match metrics.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    // The leader's committed index is what it has matched on a majority; others
    // know the applied index, which trails it a little.
    let committed = (metrics.state == ServerState::Leader)
        .then(|| committed(&voters, &matched, metrics.last_applied.as_ref()))
        .flatten();
    pb::ClusterStatus {
        node_id: metrics.id,
        leader_id: metrics.current_leader.unwrap_or(0),
        term: metrics.current_term,
        role: role.to_owned(),
        last_log_index: metrics.last_log_index,
        committed: committed
            .or(metrics.last_applied)
            .as_ref()
            .map(wire::log_id_to),
        applied: metrics.last_applied.as_ref().map(wire::log_id_to),
        snapshot: metrics.snapshot.as_ref().map(wire::log_id_to),
        members,
        damaged,
    }
}

/// The highest log id a majority of voters has matched, at least `applied`.
fn committed(
    voters: &BTreeSet<NodeId>,
    matched: &BTreeMap<NodeId, Option<crate::LogId>>,
    applied: Option<&crate::LogId>,
) -> Option<crate::LogId> {
    let mut ids: Vec<Option<crate::LogId>> = voters
        .iter()
        .map(|id| matched.get(id).copied().flatten())
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let majority = ids.get(voters.len() / 2).copied().flatten();
    majority.max(applied.copied())
}

/// Refuses an operator command on a node that does not lead, naming the leader.
fn leading(raft: &Raft) -> Result<(), Status> {
    let metrics = raft.metrics().borrow().clone();
    if metrics.state == ServerState::Leader {
        return Ok(());
    }
    let leader = metrics.current_leader.map(|id| {
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&id)
            .map_or_else(String::new, |node| node.addr.clone());
        format!("node {id} at {addr}")
    });
    Err(Status::failed_precondition(format!(
        "node {} is not the leader; the leader is {}",
        metrics.id,
        leader
            .as_deref()
            .unwrap_or("unknown (an election is under way)")
    )))
}

/// Adds node `id` at `addr`: as a learner, waiting until it has caught up (through
/// a snapshot if the log no longer holds all it needs), then, unless `learner`, as
/// a voter.
///
/// # Errors
///
/// This node does not lead; the change was refused (the node is already a member
/// at another address, a membership change is under way).
pub async fn add_node(raft: &Raft, id: NodeId, addr: &str, learner: bool) -> Result<(), Status> {
    leading(raft)?;
    if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
        return Err(Status::invalid_argument(format!(
            "node address {addr:?} is not host:port"
        )));
    }
    let known = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .cloned();
    match known {
        Some(node) if node.addr != addr => {
            return Err(Status::already_exists(format!(
                "node {id} is a member at {}; remove it first (a node that lost its data rejoins under a new id)",
                node.addr
            )));
        }
        Some(_) => {}
        None => {
            raft.add_learner(id, Node::new(addr), true)
                .await
                .map_err(|err| Status::failed_precondition(err.to_string()))?;
        }
    }
    if !learner {
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|err| Status::failed_precondition(err.to_string()))?;
    }
    Ok(())
}

/// Removes node `id` from the cluster, voter or learner.
///
/// # Errors
///
/// This node does not lead; `id` is not a member; the change was refused.
pub async fn remove_node(raft: &Raft, id: NodeId) -> Result<(), Status> {
    leading(raft)?;
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&id).is_none() {
        return Err(Status::not_found(format!("node {id} is not a member")));
    }
    let change = if membership.voter_ids().any(|voter| voter == id) {
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    raft.change_membership(change, false)
        .await
        .map_err(|err| Status::failed_precondition(err.to_string()))?;
    Ok(())
}
