//! `keel cluster status|add-node|remove-node`: operator commands on a replicated
//! log service or registry, sent to the leader (found through any node).

use anyhow::{Context, bail};
use keel_proto::raft::v1 as pb;

use keel_raft::peer::PeerTls;

use super::{AddNodeArgs, ClusterArgs, ClusterCommand, RemoveNodeArgs};

impl ClusterArgs {
    /// Mutual TLS to the nodes, when --ca is given (a cluster on TLS takes admin
    /// calls with a client certificate only).
    fn tls(&self) -> anyhow::Result<Option<PeerTls>> {
        match (&self.ca, &self.cert, &self.key) {
            (None, ..) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(PeerTls::from_files(ca, cert, key)?)),
            (Some(_), ..) => bail!(
                "a cluster on TLS takes admin calls with a client certificate: give --cert and --key with --ca"
            ),
        }
    }
}

pub(super) async fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status(args) => status(&args).await,
        ClusterCommand::AddNode(args) => add_node(&args).await,
        ClusterCommand::RemoveNode(args) => remove_node(&args).await,
    }
}

/// The status of the first node of `addr` that answers, and that node's address.
async fn any_status(
    addr: &str,
    tls: Option<&PeerTls>,
) -> anyhow::Result<(String, pb::ClusterStatus)> {
    let mut errors = Vec::new();
    for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match keel_raft::membership::admin_over(one, tls).await {
            Ok(mut client) => match client.status(pb::ClusterStatusRequest {}).await {
                Ok(status) => return Ok((one.to_owned(), status.into_inner())),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    errors.push(format!(
                        "{one}: a single node (log service or registry), not a cluster node"
                    ));
                }
                Err(status) => errors.push(format!("{one}: {}", status.message())),
            },
            Err(err) => errors.push(format!("{one}: {err}")),
        }
    }
    bail!("no cluster node answered: {}", errors.join("; "))
}

/// The leader's address and status, found through any node of `addr`.
async fn leader_status(
    addr: &str,
    tls: Option<&PeerTls>,
) -> anyhow::Result<(String, pb::ClusterStatus)> {
    let (via, status) = any_status(addr, tls).await?;
    if status.role == "leader" {
        return Ok((via, status));
    }
    let leader = status
        .members
        .iter()
        .find(|m| m.node_id == status.leader_id)
        .map(|m| m.addr.clone())
        .with_context(|| format!("node {} at {via} knows no leader (an election is under way, or it is cut off from the majority)", status.node_id))?;
    any_status(&leader, tls).await
}

async fn status(args: &ClusterArgs) -> anyhow::Result<()> {
    let tls = args.tls()?;
    let (_, status) = match leader_status(&args.addr, tls.as_ref()).await {
        Ok(found) => found,
        // No leader: what one node knows is still worth showing.
        Err(_) => any_status(&args.addr, tls.as_ref()).await?,
    };
    print_status(&status, args.json)
}

fn print_status(status: &pb::ClusterStatus, json: bool) -> anyhow::Result<()> {
    let index = |id: &Option<pb::LogId>| id.as_ref().map(|id| id.index);
    let last = status.last_log_index;
    if json {
        let members: Vec<serde_json::Value> = status
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "node_id": m.node_id,
                    "addr": m.addr,
                    "voter": m.voter,
                    "leader": m.node_id == status.leader_id,
                    "matched": index(&m.matched),
                    "lag": lag(last, index(&m.matched)),
                })
            })
            .collect();
        let out = serde_json::json!({
            "node_id": status.node_id,
            "role": status.role,
            "leader_id": (status.leader_id != 0).then_some(status.leader_id),
            "term": status.term,
            "last_log_index": last,
            "committed": index(&status.committed),
            "applied": index(&status.applied),
            "snapshot": index(&status.snapshot),
            "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let show = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    match status.leader_id {
        0 => println!("leader:    none known (asked node {})", status.node_id),
        leader => println!("leader:    node {leader}"),
    }
    println!("term:      {}", status.term);
    println!("committed: {}", show(index(&status.committed)));
    println!(
        "applied:   {} (node {})",
        show(index(&status.applied)),
        status.node_id
    );
    println!("snapshot:  {}", show(index(&status.snapshot)));
    println!();
    println!(
        "{:<6} {:<24} {:<8} {:<8} {:>10} {:>8}",
        "NODE", "ADDRESS", "ROLE", "VOTER", "MATCHED", "LAG"
    );
    for m in &status.members {
        let role = if m.node_id == status.leader_id {
            "leader"
        } else if m.voter {
            "follower"
        } else {
            "learner"
        };
        let (matched, lag) = if status.role == "leader" {
            (show(index(&m.matched)), show(lag(last, index(&m.matched))))
        } else {
            ("?".to_owned(), "?".to_owned())
        };
        println!(
            "{:<6} {:<24} {:<8} {:<8} {:>10} {:>8}",
            m.node_id,
            m.addr,
            role,
            if m.voter { "yes" } else { "no" },
            matched,
            lag
        );
    }
    Ok(())
}

/// How many entries a member trails the leader's log by.
fn lag(last: Option<u64>, matched: Option<u64>) -> Option<u64> {
    last.map(|last| last.saturating_sub(matched.unwrap_or(0)))
}

async fn add_node(args: &AddNodeArgs) -> anyhow::Result<()> {
    let tls = args.cluster.tls()?;
    let (leader, _) = leader_status(&args.cluster.addr, tls.as_ref()).await?;
    eprintln!(
        "adding node {} at {}: it becomes a voter once it has caught up…",
        args.node_id, args.node_addr
    );
    let status = keel_raft::membership::admin_over(&leader, tls.as_ref())
        .await?
        .add_node(pb::AddNodeRequest {
            node_id: args.node_id,
            addr: args.node_addr.clone(),
            learner: args.learner,
        })
        .await
        .map_err(|status| anyhow::anyhow!("adding node {}: {}", args.node_id, status.message()))?
        .into_inner();
    print_status(&status, args.cluster.json)
}

async fn remove_node(args: &RemoveNodeArgs) -> anyhow::Result<()> {
    let tls = args.cluster.tls()?;
    let (leader, _) = leader_status(&args.cluster.addr, tls.as_ref()).await?;
    let status = keel_raft::membership::admin_over(&leader, tls.as_ref())
        .await?
        .remove_node(pb::RemoveNodeRequest {
            node_id: args.node_id,
        })
        .await
        .map_err(|status| anyhow::anyhow!("removing node {}: {}", args.node_id, status.message()))?
        .into_inner();
    print_status(&status, args.cluster.json)
}
