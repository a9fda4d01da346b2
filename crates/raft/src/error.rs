//! The errors of keel's Raft storage, and their conversion to openraft's.

use std::path::PathBuf;

use crate::StorageError;

/// Why the Raft storage of a node failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    /// The commit log under the Raft log failed.
    #[error("raft log: {0}")]
    Log(#[from] keel_commitlog::LogError),
    /// A file of the Raft storage could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the Raft storage holds what this version cannot read.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A message from another node that does not make sense.
    #[error("a message from another node: {0}")]
    BadMessage(String),
    /// The state machine's files are damaged (see `Damaged`).
    #[error("{0}")]
    Damaged(String),
    /// A Raft log record that is not an entry of this format.
    #[error("raft log entry at index {index}: {reason}")]
    BadEntry {
        /// The entry's index.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl RaftStoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// As an openraft error about reading the log.
    pub(crate) fn reading_logs(self) -> StorageError {
        openraft::StorageIOError::read_logs(openraft::AnyError::new(&self)).into()
    }

    /// As an openraft error about writing the log.
    pub(crate) fn writing_logs(self) -> StorageError {
        openraft::StorageIOError::write_logs(openraft::AnyError::new(&self)).into()
    }
}

/// Extends I/O results with the path they were about.
pub(crate) trait AtPath<T> {
    fn at(self, path: &std::path::Path) -> Result<T, RaftStoreError>;
}

impl<T> AtPath<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T, RaftStoreError> {
        self.map_err(|source| RaftStoreError::io(path, source))
    }
}
