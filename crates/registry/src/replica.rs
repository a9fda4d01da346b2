//! The registry as a node of a Raft cluster (`keel registry serve --node-id`).
//!
//! - Every change (registration, deregistration, TTL heartbeat, health verdict,
//!   reaping) is a [`Command`], encoded as JSON in a Raft entry; every node applies
//!   the committed ones to its [`RegistryState`] in the same order, so every node
//!   answers lookups and watches from the same state.
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

use keel_raft::membership::{self, ClusterOptions, Readiness};
use keel_raft::{Checkpoint, LogId, RaftNode, Reply, StateMachine, WriteError, Writer};
use serde::{Deserialize, Serialize};

use crate::config::RegistryConfig;
use crate::error::{RegistryError, Result};
use crate::registry::{Applied, Registry, Required};
use crate::state::{Command, RegistryState};

/// The Raft cluster name of registry nodes.
pub const CLUSTER_NAME: &str = "keel-registry";

/// How long a change may wait to be committed before it is answered as
/// unavailable (a leader cut off from the majority never commits it).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a linearizable read may wait for its barrier.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The leader's answer to a command, as it travels back to the node that proposed
/// it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Applied; for a registration, the answer to it.
    Applied { required: Option<Required> },
    /// The command named an instance that is not registered.
    UnknownInstance { name: String, id: String },
    /// The command could not be read (written by an incompatible version).
    Unreadable { reason: String },
}

/// What a cluster node's registry knows of its Raft node.
#[derive(Debug)]
pub(crate) struct Replication {
    writer: Writer,
    pub(crate) readiness: Readiness,
}

impl Replication {
    /// Proposes `command` and waits for the leader's answer.
    pub(crate) async fn propose(&self, command: &Command) -> Result<Applied> {
        let bytes = serde_json::to_vec(command).map_err(|err| {
            RegistryError::Unavailable(format!("cannot encode the change: {err}"))
        })?;
        let written = tokio::time::timeout(
            COMMIT_TIMEOUT,
            self.writer.write(keel_raft::Command(bytes.into())),
        )
        .await
        .map_err(|_| {
            RegistryError::Unavailable(format!(
                "the change was not committed within {COMMIT_TIMEOUT:?}; it may still be"
            ))
        })?
        .map_err(unavailable)?;
        match serde_json::from_slice(&written.0) {
            Ok(Outcome::Applied { required }) => Ok(Applied {
                events: Vec::new(),
                required,
            }),
            Ok(Outcome::UnknownInstance { name, id }) => {
                Err(RegistryError::UnknownInstance { name, id })
            }
            Ok(Outcome::Unreadable { reason }) => Err(RegistryError::Unavailable(format!(
                "the leader could not read the change: {reason}"
            ))),
            Err(err) => Err(RegistryError::Unavailable(format!(
                "the leader's answer is unreadable: {err}"
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

/// The registry as openraft's state machine: applies committed commands to the
/// live [`Registry`].
struct RegistryMachine {
    registry: Arc<Registry>,
}

impl StateMachine for RegistryMachine {
    fn apply(&mut self, log_id: &LogId, command: &keel_raft::Command) -> io::Result<Reply> {
        let outcome = match serde_json::from_slice::<Command>(&command.0) {
            Err(err) => {
                tracing::error!(index = log_id.index, error = %err, "an unreadable registry change; skipped");
                Outcome::Unreadable {
                    reason: err.to_string(),
                }
            }
            Ok(command) => match self.registry.apply(command) {
                Ok(applied) => Outcome::Applied {
                    required: applied.required,
                },
                Err(RegistryError::UnknownInstance { name, id }) => {
                    Outcome::UnknownInstance { name, id }
                }
                Err(other) => Outcome::Unreadable {
                    reason: other.to_string(),
                },
            },
        };
        let bytes = serde_json::to_vec(&outcome).map_err(io::Error::other)?;
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
    let writer = Writer::new(node.raft.clone(), options.node_id, options.leader_wait());
    registry.set_replication(Replication {
        readiness: Readiness::start(writer.clone(), options.node_id, &options.settings),
        writer,
    });
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
