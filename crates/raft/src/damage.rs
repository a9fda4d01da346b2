//! A damaged replica: one whose Raft log or state failed its checksums and was cut
//! (or discarded). It may have lost entries it had acknowledged, so until it has
//! caught up with the leader it never votes (a vote from it could elect a node
//! that misses a committed entry) and never leads. The mark is a file, so that a
//! restart before catching up keeps it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{AtPath, RaftStoreError};

const MARK: &str = "DAMAGED";

/// The error a state machine's `open` returns (inside an `io::Error`) when its
/// files are damaged: the node then discards its state and its Raft log, and
/// re-replicates everything from the leader.
#[derive(Debug, thiserror::Error)]
#[error("damaged replica: {0}")]
pub struct Damaged(pub String);

impl Damaged {
    /// As an `io::Error`, as `StateMachine` opening returns it.
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }

    /// The damage an `io::Error` carries, if it is one.
    pub fn of(err: &std::io::Error) -> Option<&Self> {
        err.get_ref().and_then(|inner| inner.downcast_ref::<Self>())
    }
}

/// Whether a node is damaged; shared by its log store, its service and the task
/// that clears it.
#[derive(Debug, Clone)]
pub struct DamageMark {
    damaged: Arc<AtomicBool>,
    path: PathBuf,
}

impl DamageMark {
    /// The mark of the Raft log in `dir`, as the disk says.
    pub(crate) fn load(dir: &Path) -> Self {
        let path = dir.join(MARK);
        Self {
            damaged: Arc::new(AtomicBool::new(path.exists())),
            path,
        }
    }

    /// Whether the node is damaged (and so does not vote).
    pub fn is_set(&self) -> bool {
        self.damaged.load(Ordering::Acquire)
    }

    /// Marks the node damaged, durably, saying why.
    pub(crate) fn set(&self, why: &str) -> Result<(), RaftStoreError> {
        tracing::error!(
            reason = why,
            "damaged replica: it does not vote until it has caught up with the leader"
        );
        crate::meta::write_durably(&self.path, why.as_bytes())?;
        self.damaged.store(true, Ordering::Release);
        Ok(())
    }

    /// Clears the mark: the node has caught up.
    pub(crate) fn clear(&self) -> Result<(), RaftStoreError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(RaftStoreError::io(&self.path, err)),
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .at(dir)?;
        self.damaged.store(false, Ordering::Release);
        tracing::info!("the damaged replica has caught up: it votes again");
        Ok(())
    }
}
