//! Starting a Raft node: its storage, its openraft instance, and the service that
//! other nodes call.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::RaftStoreError;
use crate::{
    LogStore, LogStoreConfig, Machine, NetworkFactory, Node, NodeId, Raft, RaftService,
    StateMachine,
};

/// The timing and snapshot settings of a node; the defaults fit a LAN or one machine.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in this range (drawn once
    /// per process) starts an election, after the leader's lease (the upper bound)
    /// has run out too: failover takes the upper bound plus a draw from the range.
    pub election_timeout: (Duration, Duration),
    /// Take a snapshot (a checkpoint of the state machine) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the Raft log below a snapshot, so that a follower a little
    /// behind catches up from the log rather than from a snapshot.
    pub keep_below_snapshot: u64,
    /// How long one attempt at sending a snapshot may take; an attempt cut short
    /// is resumed by the next one.
    pub snapshot_attempt: Duration,
    /// The Raft log's storage.
    pub log: LogStoreConfig,
    /// Mutual TLS to the other nodes, when the cluster runs TLS.
    pub tls: Option<crate::peer::PeerTls>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(30),
            election_timeout: (Duration::from_millis(100), Duration::from_millis(160)),
            snapshot_every: 20_000,
            keep_below_snapshot: 5_000,
            snapshot_attempt: Duration::from_secs(30),
            log: LogStoreConfig::default(),
            tls: None,
        }
    }
}

impl NodeSettings {
    /// openraft's configuration for these settings.
    ///
    /// # Errors
    ///
    /// The settings are inconsistent (an election timeout not above the heartbeat).
    pub fn raft_config(&self, cluster: &str) -> Result<openraft::Config, String> {
        let millis = |d: Duration| d.as_millis().try_into().unwrap_or(u64::MAX);
        openraft::Config {
            cluster_name: cluster.to_owned(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_timeout.0),
            election_timeout_max: millis(self.election_timeout.1),
            install_snapshot_timeout: millis(self.snapshot_attempt),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_below_snapshot,
            // Entries carry batches already; a few per message keep messages small.
            max_payload_entries: 64,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|err| err.to_string())
    }
}

/// A running Raft node: the handle to drive it and the service to serve to peers.
#[derive(Clone)]
pub struct RaftNode {
    /// The openraft node.
    pub raft: Raft,
    /// `keel.raft.v1.Raft` for this node, to add to its gRPC server.
    pub service: RaftService,
    /// This node's id.
    pub id: NodeId,
    /// Set while this node may miss entries it acknowledged: it does not vote.
    pub damage: crate::DamageMark,
    /// Mutual TLS to the other nodes, when the cluster runs TLS.
    pub tls: Option<crate::peer::PeerTls>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Removes everything in `dir` (a damaged node's snapshots).
fn discard_dir(dir: &Path) -> Result<(), RaftStoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(RaftStoreError::io(dir, err)),
    }
}

/// Clears a damaged node's mark once it has applied everything the leader had
/// committed when asked (ReadIndex): from then on its log holds every committed
/// entry, and its vote is safe again.
async fn clear_when_caught_up(
    raft: Raft,
    id: NodeId,
    damage: crate::DamageMark,
    tls: Option<crate::peer::PeerTls>,
) {
    let writer = crate::Writer::new(raft, id, Duration::from_secs(2)).with_tls(tls);
    if writer.catch_up().await.is_ok()
        && let Err(err) = damage.clear()
    {
        tracing::error!(error = %err, "cannot clear the damage mark");
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings do not make a valid Raft configuration.
    #[error("raft settings: {0}")]
    Settings(String),
    /// The node's storage failed to open.
    #[error(transparent)]
    Storage(#[from] RaftStoreError),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

impl RaftNode {
    /// Opens node `id`'s storage under `dir` (`dir/log`, `dir/snapshots`) and starts
    /// it; `open` builds the state machine from the latest snapshot's summary.
    ///
    /// # Errors
    ///
    /// See [`StartError`].
    pub async fn start<S: StateMachine>(
        id: NodeId,
        cluster: &str,
        dir: &Path,
        settings: &NodeSettings,
        mut open: impl FnMut(Option<&[u8]>) -> io::Result<S>,
    ) -> Result<Self, StartError> {
        let config = Arc::new(
            settings
                .raft_config(cluster)
                .map_err(StartError::Settings)?,
        );
        let snapshots = dir.join("snapshots");
        let log_dir = dir.join("log");
        if let Some(why) = crate::meta::Meta::damage(&log_dir) {
            // The vote cannot be trusted, nor where the log starts: start empty, take
            // everything from the leader again, and do not vote until then.
            tracing::error!(
                reason = why,
                "the raft metadata is damaged: discarding this node's state to re-replicate it"
            );
            discard_dir(&log_dir)?;
            discard_dir(&snapshots)?;
            keel_commitlog::create_dir_durably(&log_dir).map_err(RaftStoreError::from)?;
            crate::DamageMark::load(&log_dir).set(&why)?;
        }
        let machine = match Machine::open(&snapshots, &mut open) {
            Err(RaftStoreError::Damaged(why)) => {
                // Its files cannot be trusted, nor the log that replays onto them:
                // start empty, and take everything from the leader again.
                tracing::error!(
                    reason = why,
                    "the state machine is damaged: discarding this node's state to re-replicate it"
                );
                LogStore::discard(&log_dir, &why)?;
                discard_dir(&snapshots)?;
                Machine::open(&snapshots, &mut open)?
            }
            other => other?,
        };
        let log = LogStore::open(&log_dir, &settings.log)?;
        let damage = log.damage();
        let network = NetworkFactory {
            tls: settings.tls.clone(),
            ..NetworkFactory::default()
        };
        let raft = Raft::new(id, config, network, log, machine)
            .await
            .map_err(|err| StartError::Raft(err.to_string()))?;
        let service = RaftService::new(raft.clone(), &snapshots).with_damage(damage.clone());
        if damage.is_set() {
            tokio::spawn(clear_when_caught_up(
                raft.clone(),
                id,
                damage.clone(),
                settings.tls.clone(),
            ));
        }
        Ok(Self {
            raft,
            service,
            id,
            damage,
            tls: settings.tls.clone(),
        })
    }

    /// Marks this node damaged (see [`crate::DamageMark`]): it refuses votes until
    /// it has caught up with a leader, which a task started here watches for.
    ///
    /// # Errors
    ///
    /// The mark cannot be written.
    pub fn mark_damaged(&self, why: &str) -> Result<(), RaftStoreError> {
        if !self.damage.is_set() {
            self.damage.set(why)?;
            tokio::spawn(clear_when_caught_up(
                self.raft.clone(),
                self.id,
                self.damage.clone(),
                self.tls.clone(),
            ));
        }
        Ok(())
    }

    /// Forms a cluster of `members` unless this node's log says it is in one: every
    /// member may call this with the same list, in any order, as often as it
    /// restarts (openraft makes the same first entry on each).
    ///
    /// # Errors
    ///
    /// openraft refused for a reason other than "already initialized".
    pub async fn bootstrap(&self, members: &BTreeMap<NodeId, Node>) -> Result<(), StartError> {
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|err| StartError::Raft(err.to_string()))?
        {
            return Ok(());
        }
        match self.raft.initialize(members.clone()).await {
            Ok(()) => Ok(()),
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => Ok(()),
            Err(err) => Err(StartError::Raft(err.to_string())),
        }
    }
}
