//! The state machine side: [`StateMachine`] is what a keel service implements;
//! [`Machine`] adapts it to openraft, keeping the applied log id and membership, and
//! turning the state machine's checkpoints into snapshots.

use std::io;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};

use crate::error::RaftStoreError;
use crate::snapshot::{SnapshotMeta, Snapshots};
use crate::{Command, Entry, LogId, Node, NodeId, Reply, SnapshotFiles, StorageError, TypeConfig};

/// A deterministic state machine that Raft replicates.
///
/// Every node applies the same commands in the same order and must reach the same
/// state: `apply` may not read clocks, random numbers or anything local. It need not
/// sync: the Raft log holds every command since the last [`StateMachine::checkpoint`],
/// and a node that restarts applies them again, from the state of that checkpoint.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies one committed command and answers it.
    ///
    /// # Errors
    ///
    /// Only for a failure of local storage; the node then stops. A command that the
    /// state machine refuses is answered, not failed.
    fn apply(&mut self, log_id: &LogId, command: &Command) -> io::Result<Reply>;

    /// Makes everything applied so far durable and describes it: the files that hold
    /// it (which from now on may only grow past the given lengths) and a summary from
    /// which the state machine reopens to exactly this state.
    ///
    /// # Errors
    ///
    /// Syncing or listing the files failed.
    fn checkpoint(&mut self) -> io::Result<Checkpoint>;

    /// Replaces the whole state with a snapshot's: its files (by their names) under
    /// `data`, and its summary.
    ///
    /// # Errors
    ///
    /// Reading or moving the files failed; the node then stops.
    fn install(&mut self, data: &Path, state: &[u8]) -> io::Result<()>;
}

/// A state machine's durable point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The files that hold the state.
    pub files: Vec<CheckpointFile>,
    /// A summary from which the state machine reopens to this state.
    pub state: Vec<u8>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFile {
    /// Its path relative to the state machine's directory, as it is installed on
    /// other nodes.
    pub name: String,
    /// Where it is on this node.
    pub path: PathBuf,
    /// The bytes of it that belong to the checkpoint.
    pub len: u64,
}

/// A [`StateMachine`] as openraft drives it.
pub struct Machine<S> {
    machine: S,
    applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    snapshots: Snapshots,
    current: Option<SnapshotFiles>,
    /// Tells snapshot ids built in the same applied state apart.
    built: u64,
}

impl<S> std::fmt::Debug for Machine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("applied", &self.applied)
            .field("membership", &self.membership)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Machine<S> {
    /// Opens the snapshots in `dir` and the state machine, which `open` builds from
    /// the latest snapshot's summary (`None` when there is no snapshot yet): the state
    /// machine must come back exactly as it was at that snapshot.
    ///
    /// # Errors
    ///
    /// The snapshot directory cannot be read, or `open` fails.
    pub fn open(
        dir: &Path,
        open: &mut impl FnMut(Option<&[u8]>) -> io::Result<S>,
    ) -> Result<Self, RaftStoreError> {
        let failed = |err: io::Error| match crate::Damaged::of(&err) {
            Some(damage) => RaftStoreError::Damaged(damage.to_string()),
            None => RaftStoreError::io(dir, err),
        };
        let snapshots = Snapshots::open(dir)?;
        let current = snapshots.current()?;
        let (machine, applied, membership) = match &current {
            Some(snapshot) => {
                let state = snapshot.state()?;
                let machine = open(Some(&state)).map_err(failed)?;
                let meta = snapshot
                    .manifest
                    .as_ref()
                    .map(|m| m.meta.clone())
                    .unwrap_or_default();
                (machine, meta.last_log_id, meta.last_membership)
            }
            None => (
                open(None).map_err(failed)?,
                None,
                StoredMembership::default(),
            ),
        };
        Ok(Self {
            machine,
            applied,
            membership,
            snapshots,
            current,
            built: 0,
        })
    }

    /// The state machine.
    pub fn state(&self) -> &S {
        &self.machine
    }

    /// The last entry applied.
    pub fn applied(&self) -> Option<LogId> {
        self.applied
    }

    fn snapshot_now(&mut self) -> Result<Snapshot<TypeConfig>, RaftStoreError> {
        let checkpoint = self
            .machine
            .checkpoint()
            .map_err(|err| RaftStoreError::io("state machine checkpoint", err))?;
        // Unique across restarts too: two snapshots of one applied state may hold
        // different files (retention ran between them), and a receiver resumes a
        // transfer by id.
        let made_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        let n = self.built;
        self.built += 1;
        let snapshot_id = match self.applied {
            Some(id) => format!(
                "{}-{}-{}-{made_ms}-{n}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("0-0-none-{made_ms}-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let files: Vec<(String, PathBuf, u64)> = checkpoint
            .files
            .into_iter()
            .map(|file| (file.name, file.path, file.len))
            .collect();
        let snapshot = self
            .snapshots
            .create(meta.clone(), &files, &checkpoint.state)?;
        tracing::info!(
            snapshot = meta.snapshot_id,
            files = files.len(),
            "made a snapshot"
        );
        self.current = Some(snapshot.clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(snapshot),
        })
    }
}

/// Builds a snapshot: the state machine's checkpoint is taken when openraft asks
/// for the builder, between two applies, so that its files and its applied log id
/// agree; building only hands it over.
pub struct SnapshotBuilder {
    made: Result<Snapshot<TypeConfig>, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        match &self.made {
            Ok(snapshot) => Ok(Snapshot {
                meta: snapshot.meta.clone(),
                snapshot: snapshot.snapshot.clone(),
            }),
            Err(reason) => Err(openraft::StorageIOError::write_snapshot(
                None,
                openraft::AnyError::error(reason),
            )
            .into()),
        }
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig> for Machine<S> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut replies = Vec::with_capacity(entries.size_hint().0);
        for entry in entries {
            let reply = match &entry.payload {
                EntryPayload::Blank => Reply::default(),
                EntryPayload::Normal(command) => {
                    self.machine.apply(&entry.log_id, command).map_err(|err| {
                        StorageError::from(openraft::StorageIOError::apply(
                            entry.log_id,
                            openraft::AnyError::new(&err),
                        ))
                    })?
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    Reply::default()
                }
            };
            self.applied = Some(entry.log_id);
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            made: self.snapshot_now().map_err(|err| err.to_string()),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFiles>, StorageError> {
        let n = self.built;
        self.built += 1;
        self.snapshots
            .incoming(&format!("local-{n}"))
            .map(Box::new)
            .map_err(|err| {
                openraft::StorageIOError::write_snapshot(None, openraft::AnyError::new(&err)).into()
            })
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFiles>,
    ) -> Result<(), StorageError> {
        if self.applied.is_some() && self.applied >= meta.last_log_id {
            // Nothing in it this machine lacks: a second copy of the snapshot it has
            // just installed (a leader that restarted replication sent it twice, and
            // openraft queued both before the first was done), whose files the first
            // install has already taken.
            tracing::info!(snapshot = meta.snapshot_id, applied = ?self.applied, "a snapshot already applied; ignored");
            return Ok(());
        }
        let installed = (|| {
            let Some(manifest) = &snapshot.manifest else {
                return Err(RaftStoreError::Invalid {
                    path: snapshot.dir.clone(),
                    reason: "a snapshot without a manifest".to_owned(),
                });
            };
            let manifest = crate::Manifest {
                meta: meta.clone(),
                ..manifest.clone()
            };
            let adopted = self.snapshots.adopt(&snapshot, &manifest)?;
            let state = adopted.state()?;
            self.machine
                .install(&adopted.data_dir(), &state)
                .map_err(|err| RaftStoreError::io(adopted.data_dir(), err))?;
            Ok(adopted)
        })();
        match installed {
            Ok(adopted) => {
                tracing::info!(snapshot = meta.snapshot_id, last = ?meta.last_log_id, "installed a snapshot");
                self.applied = meta.last_log_id;
                self.membership = meta.last_membership.clone();
                self.current = Some(adopted);
                Ok(())
            }
            Err(err) => Err(openraft::StorageIOError::write_snapshot(
                Some(meta.signature()),
                openraft::AnyError::new(&err),
            )
            .into()),
        }
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current.as_ref().and_then(|snapshot| {
            snapshot.manifest.as_ref().map(|manifest| Snapshot {
                meta: manifest.meta.clone(),
                snapshot: Box::new(snapshot.clone()),
            })
        }))
    }
}
