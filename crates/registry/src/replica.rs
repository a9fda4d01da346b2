//! The registry as a node of a Raft cluster (`keel registry serve --node-id`).
//!
//! - Every change (registration, deregistration, TTL heartbeat, health verdict,
//!   reaping) is a [`Command`], encoded as JSON; a Raft entry carries every change
//!   that was waiting when it was proposed (a JSON array), so concurrent
//!   registrations share a commit. Every node applies the committed ones to its
//!   [`RegistryState`] in the same order, so every node answers lookups and watches
//!   from the same state.
//! - A node that is not the leader forwards a write to the leader (`keel-raft`'s
//!   writer) and answers with the leader's reply, so any node takes any request.
//! - Only the leader notifies dependents and runs health checks and reaping; a new
//!   leader gives TTL instances a full TTL before it judges them, and its checks
//!   start from scratch, so nobody turns critical on a change of leader alone.
//! - A checkpoint (the Raft snapshot) is the whole state, serialized: a registry
//!   holds at most `max_instances` small entries.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use keel_raft::membership::{self, ClusterOptions, Readiness};
use keel_raft::{Checkpoint, LogId, RaftNode, Reply, StateMachine, WriteError, Writer};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::RegistryConfig;
use crate::error::{RegistryError, Result};
use crate::registry::{Applied, Registry, Required};
use crate::state::{Claim, Command, RegistryState};

/// The Raft cluster name of registry nodes.
pub const CLUSTER_NAME: &str = "keel-registry";

/// How long a change may wait to be committed before it is answered as
/// unavailable (a leader cut off from the majority never commits it).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a linearizable read may wait for its barrier.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Entries proposed and not yet answered, at most. While that many are in flight,
/// changes gather in the queue and go out together in the next entry.
const ENTRIES_IN_FLIGHT: usize = 4;

/// Changes in one entry, at most.
const MAX_CHANGES_PER_ENTRY: usize = 256;

/// Changes that may wait to be proposed; past it, a change is refused as
/// unavailable.
const QUEUE: usize = 4096;

/// The leader's answer to a command, as it travels back to the node that proposed
/// it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Applied; for a registration, the answer to it, and the instance's secret.
    Applied {
        required: Option<Required>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// The command named an instance that is not registered.
    UnknownInstance { name: String, id: String },
    /// Another principal owns the instance the command names.
    NotOwner {
        name: String,
        id: String,
        owner: String,
    },
    /// The command could not be read (written by an incompatible version).
    Unreadable { reason: String },
}

/// A change waiting to be proposed, and where its outcome goes.
struct Change {
    command: Keyed,
    outcome: oneshot::Sender<Result<Outcome>>,
}

/// A command as an entry carries it: with the client's idempotency key, if it
/// gave one (entries of earlier versions are plain commands, which still read).
#[derive(Debug, Serialize, Deserialize)]
struct Keyed {
    #[serde(flatten)]
    command: Command,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    /// Who asks, when ownership is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claim: Option<Claim>,
}

/// What a cluster node's registry knows of its Raft node.
#[derive(Debug)]
pub(crate) struct Replication {
    writer: Writer,
    queue: mpsc::Sender<Change>,
    pub(crate) readiness: Readiness,
}

impl Replication {
    /// The node's Raft handle (for its metrics).
    pub(crate) fn raft(&self) -> &keel_raft::Raft {
        self.writer.raft()
    }

    fn new(writer: Writer, readiness: Readiness) -> Self {
        let (queue, changes) = mpsc::channel(QUEUE);
        tokio::spawn(propose(writer.clone(), changes));
        Self {
            writer,
            queue,
            readiness,
        }
    }

    /// Proposes `command` (with whatever else waits) and waits for the leader's
    /// answer.
    pub(crate) async fn propose(
        &self,
        command: &Command,
        request: Option<String>,
        claim: Option<Claim>,
    ) -> Result<Applied> {
        let (outcome, answer) = oneshot::channel();
        let change = Change {
            command: Keyed {
                command: command.clone(),
                request,
                claim,
            },
            outcome,
        };
        self.queue.try_send(change).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                RegistryError::Unavailable(format!("{QUEUE} changes already wait to be proposed"))
            }
            mpsc::error::TrySendError::Closed(_) => {
                RegistryError::Unavailable("the registry is stopping".into())
            }
        })?;
        let outcome = answer
            .await
            .map_err(|_| RegistryError::Unavailable("the change was dropped".into()))??;
        match outcome {
            Outcome::Applied { required, secret } => Ok(Applied {
                events: Vec::new(),
                required,
                secret,
            }),
            Outcome::UnknownInstance { name, id } => {
                Err(RegistryError::UnknownInstance { name, id })
            }
            Outcome::NotOwner { name, id, owner } => {
                Err(RegistryError::NotOwner { name, id, owner })
            }
            Outcome::Unreadable { reason } => Err(RegistryError::Unavailable(format!(
                "the leader could not read the change: {reason}"
            ))),
        }
    }

    /// Waits until this node has applied every change acknowledged before.
    pub(crate) async fn read_barrier(&self) -> Result<()> {
        self.writer
            .read_barrier(READ_TIMEOUT)
            .await
            .map_err(unavailable)
    }
}

fn unavailable(err: WriteError) -> RegistryError {
    RegistryError::Unavailable(err.to_string())
}

/// The proposing task: every change waiting goes into one entry, with at most
/// [`ENTRIES_IN_FLIGHT`] entries awaiting their commit; runs until every sender is
/// gone.
async fn propose(writer: Writer, mut changes: mpsc::Receiver<Change>) {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = changes.recv(), if open && in_flight.len() < ENTRIES_IN_FLIGHT => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_CHANGES_PER_ENTRY {
                    let Ok(more) = changes.try_recv() else { break };
                    batch.push(more);
                }
                let (commands, outcomes): (Vec<Keyed>, Vec<_>) =
                    batch.into_iter().map(|c| (c.command, c.outcome)).unzip();
                let submitted = match serde_json::to_vec(&commands) {
                    Ok(bytes) => writer.submit(keel_raft::Command(bytes.into())).await.map_err(unavailable),
                    Err(err) => Err(RegistryError::Unavailable(format!("cannot encode the changes: {err}"))),
                };
                match submitted {
                    Ok(pending) => in_flight.push(async move {
                        let written = tokio::time::timeout(COMMIT_TIMEOUT, pending)
                            .await
                            .map_err(|_| {
                                RegistryError::Unavailable(format!(
                                    "the change was not committed within {COMMIT_TIMEOUT:?}; it may still be"
                                ))
                            })
                            .and_then(|written| written.map_err(unavailable));
                        hand_out(written, outcomes);
                    }),
                    Err(err) => hand_out(Err(err), outcomes),
                }
            }
            else => return,
        }
    }
}

/// Gives each change of an entry its outcome from the entry's reply.
fn hand_out(written: Result<Reply>, outcomes: Vec<oneshot::Sender<Result<Outcome>>>) {
    let decoded = written.and_then(|reply| {
        serde_json::from_slice::<Vec<Outcome>>(&reply.0)
            .map_err(|err| {
                RegistryError::Unavailable(format!("the leader's answer is unreadable: {err}"))
            })
            .and_then(|answers| {
                if answers.len() == outcomes.len() {
                    Ok(answers)
                } else {
                    Err(RegistryError::Unavailable(format!(
                        "the leader answered {} changes of {}",
                        answers.len(),
                        outcomes.len()
                    )))
                }
            })
    });
    match decoded {
        Ok(answers) => {
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                let _ = outcome.send(Ok(answer));
            }
        }
        Err(err) => {
            let reason = match err {
                RegistryError::Unavailable(reason) => reason,
                other => other.to_string(),
            };
            for outcome in outcomes {
                let _ = outcome.send(Err(RegistryError::Unavailable(reason.clone())));
            }
        }
    }
}

/// The registry as openraft's state machine: applies committed commands to the
/// live [`Registry`].
struct RegistryMachine {
    registry: Arc<Registry>,
}

impl RegistryMachine {
    fn apply_one(&self, keyed: Keyed) -> Outcome {
        match self
            .registry
            .apply_as(keyed.command, keyed.request, keyed.claim.as_ref())
        {
            Ok(applied) => Outcome::Applied {
                required: applied.required,
                secret: applied.secret,
            },
            Err(RegistryError::UnknownInstance { name, id }) => {
                Outcome::UnknownInstance { name, id }
            }
            Err(RegistryError::NotOwner { name, id, owner }) => {
                Outcome::NotOwner { name, id, owner }
            }
            Err(other) => Outcome::Unreadable {
                reason: other.to_string(),
            },
        }
    }
}

impl StateMachine for RegistryMachine {
    /// An entry holds the changes proposed together, as a JSON array; the reply is
    /// their outcomes, in order.
    fn apply(&mut self, log_id: &LogId, command: &keel_raft::Command) -> io::Result<Reply> {
        let outcomes: Vec<Outcome> = match serde_json::from_slice::<Vec<Keyed>>(&command.0) {
            Ok(commands) => commands.into_iter().map(|c| self.apply_one(c)).collect(),
            Err(err) => {
                tracing::error!(index = log_id.index, error = %err, "an unreadable registry entry; skipped");
                vec![Outcome::Unreadable {
                    reason: err.to_string(),
                }]
            }
        };
        let bytes = serde_json::to_vec(&outcomes).map_err(io::Error::other)?;
        Ok(Reply(bytes.into()))
    }

    fn checkpoint(&mut self) -> io::Result<Checkpoint> {
        Ok(Checkpoint {
            files: Vec::new(),
            state: self.registry.encode_state().map_err(io::Error::other)?,
        })
    }

    fn install(&mut self, _data: &Path, state: &[u8]) -> io::Result<()> {
        self.registry.replace_state(decode_state(Some(state))?);
        Ok(())
    }
}

fn decode_state(summary: Option<&[u8]>) -> io::Result<RegistryState> {
    match summary {
        None => Ok(RegistryState::default()),
        Some(bytes) => serde_json::from_slice(bytes).map_err(|err| {
            keel_raft::Damaged(format!("the registry's snapshot is unreadable: {err}")).into_io()
        }),
    }
}

/// A started registry node: its registry (written through Raft) and its Raft node.
#[derive(Debug, Clone)]
pub struct RegistryNode {
    /// The replicated registry, to serve.
    pub registry: Arc<Registry>,
    /// The Raft node, whose service is served beside the registry's HTTP API.
    pub raft: RaftNode,
    /// The HTTP client of health checks and notifications.
    pub(crate) client: reqwest::Client,
    /// Who may do what.
    pub(crate) auth: Arc<keel_auth::Authorizer>,
    /// The listener's TLS, if any.
    pub(crate) tls: Option<Arc<keel_serve::tls::ServerConfig>>,
}

/// Starts registry node `options.node_id` with its Raft state under `data_dir`:
/// opens its Raft log and the registry at its last snapshot, starts Raft, and (with
/// `--peers`) forms the cluster. With `--join`, call [`RegistryNode::join`] once
/// the node serves.
///
/// # Errors
///
/// The settings are invalid; the storage fails to open.
pub async fn start(
    config: &RegistryConfig,
    data_dir: &Path,
    options: &ClusterOptions,
) -> Result<RegistryNode> {
    let (registry, client) = crate::server::build(config)?;
    let auth = crate::server::authorizer(config)?;
    let tls = crate::server::tls(config)?;
    let opened = Arc::clone(&registry);
    let node = RaftNode::start(
        options.node_id,
        CLUSTER_NAME,
        &data_dir.join("raft"),
        &options.settings,
        move |summary| {
            opened.replace_state(decode_state(summary)?);
            Ok(RegistryMachine {
                registry: Arc::clone(&opened),
            })
        },
    )
    .await
    .map_err(|err| RegistryError::Cluster(format!("starting the Raft node: {err}")))?;
    let writer = Writer::new(node.raft.clone(), options.node_id, options.leader_wait())
        .with_tls(node.tls.clone());
    registry.set_replication(Replication::new(
        writer.clone(),
        Readiness::start(writer, options.node_id, &options.settings),
    ));
    tokio::spawn(follow_leadership(
        Arc::clone(&registry),
        node.raft.clone(),
        options.node_id,
    ));
    membership::form(&node, options)
        .await
        .map_err(RegistryError::Cluster)?;
    Ok(RegistryNode {
        registry,
        raft: node,
        client,
        auth,
        tls,
    })
}

/// Tells the registry whether this node leads, as Raft's view changes.
async fn follow_leadership(registry: Arc<Registry>, raft: keel_raft::Raft, id: keel_raft::NodeId) {
    let mut metrics = raft.metrics();
    loop {
        let leads = {
            let now = metrics.borrow_and_update();
            now.current_leader == Some(id) && now.state.is_leader()
        };
        registry.set_leading(leads);
        if metrics.changed().await.is_err() {
            registry.set_leading(false);
            return;
        }
    }
}

impl RegistryNode {
    /// Asks the node at `addr` (any member; followed to the leader) to add this
    /// node, retrying until it is a member (see [`membership::join`]).
    ///
    /// # Errors
    ///
    /// The cluster refused for good (this id is a member at another address).
    pub async fn join(&self, addr: &str, advertise: &str) -> Result<()> {
        membership::join(&self.raft, addr, advertise)
            .await
            .map_err(RegistryError::Cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries written before idempotency keys (plain commands) still read, and a
    /// keyed command round-trips.
    #[test]
    fn entries_with_and_without_idempotency_keys_should_read() {
        let old = br#"[{"deregister":{"name":"visit","id":"127.0.0.1:7"}}]"#;
        let read: Vec<Keyed> = serde_json::from_slice(old).expect("an old entry");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].request, None);
        assert!(matches!(read[0].command, Command::Deregister { .. }));

        let keyed = vec![Keyed {
            command: Command::Notified { up_to: 3 },
            request: Some("k1".into()),
            claim: None,
        }];
        let bytes = serde_json::to_vec(&keyed).expect("json");
        let back: Vec<Keyed> = serde_json::from_slice(&bytes).expect("back");
        assert_eq!(back[0].request.as_deref(), Some("k1"));
        assert_eq!(back[0].command, Command::Notified { up_to: 3 });
    }
}
