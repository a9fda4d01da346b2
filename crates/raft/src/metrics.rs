//! A Raft node's figures for `GET /metrics`, read from openraft's own metrics when
//! scraped: the term, who leads, how far the log and the state machine are, and, on
//! the leader, how far behind each follower is.

use keel_serve::http::Prometheus;

use crate::Raft;

/// Appends the node's Raft figures to `out`. Leader changes show as changes of
/// `keel_raft_current_leader` (PromQL `changes()`), elections as rises of
/// `keel_raft_term`.
pub fn render_metrics(raft: &Raft, out: &mut Prometheus) {
    let metrics = raft.metrics().borrow().clone();
    let last_log = metrics.last_log_index.unwrap_or(0);
    let is_leader = metrics.current_leader == Some(metrics.id);
    out.family(
        "keel_raft_term",
        "gauge",
        "The node's current Raft term (it rises with every election).",
    )
    .sample(&[], metrics.current_term)
    .family(
        "keel_raft_current_leader",
        "gauge",
        "The id of the node this node knows as leader; 0 while it knows none.",
    )
    .sample(&[], metrics.current_leader.unwrap_or(0))
    .family(
        "keel_raft_has_leader",
        "gauge",
        "1 while this node knows a leader, 0 otherwise (elections, lost quorum, partitions).",
    )
    .sample(&[], u8::from(metrics.current_leader.is_some()))
    .family(
        "keel_raft_is_leader",
        "gauge",
        "1 on the leader, 0 on the other nodes.",
    )
    .sample(&[], u8::from(is_leader))
    .family(
        "keel_raft_last_log_index",
        "gauge",
        "The index of the last entry in this node's Raft log.",
    )
    .sample(&[], last_log)
    .family(
        "keel_raft_applied_index",
        "gauge",
        "The index of the last entry this node's state machine applied.",
    )
    .sample(&[], metrics.last_applied.map_or(0, |id| id.index));
    out.family(
        "keel_raft_replication_lag_entries",
        "gauge",
        "On the leader: entries of its log each follower has not yet acknowledged.",
    );
    if let Some(replication) = metrics.replication.as_ref().filter(|_| is_leader) {
        for (peer, matched) in replication {
            if *peer == metrics.id {
                continue;
            }
            let behind = match matched {
                Some(matched) => last_log.saturating_sub(matched.index),
                None => last_log + 1,
            };
            let peer = peer.to_string();
            out.sample(&[("peer", &peer)], behind);
        }
    }
}
