//! The small state of a Raft node that is not in its log: the vote and how far the
//! log was purged. One JSON file, replaced atomically and durably.

use std::path::{Path, PathBuf};

use crate::error::{AtPath, RaftStoreError};
use crate::{LogId, Vote};

/// What `meta.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Meta {
    /// The latest vote this node made or saw.
    pub(crate) vote: Option<Vote>,
    /// The last entry purged from the log: every entry up to it is in a snapshot.
    pub(crate) purged: Option<LogId>,
}

impl Meta {
    /// Reads the meta file in `dir`, or the default when there is none yet.
    pub(crate) fn load(dir: &Path) -> Result<Self, RaftStoreError> {
        let path = dir.join(META_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| RaftStoreError::Invalid {
                path,
                reason: format!("not a raft meta file: {err}"),
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(RaftStoreError::io(path, err)),
        }
    }

    /// Replaces the meta file in `dir` with this, durably.
    pub(crate) fn store(&self, dir: &Path) -> Result<(), RaftStoreError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|err| RaftStoreError::Invalid {
            path: dir.join(META_FILE),
            reason: err.to_string(),
        })?;
        write_durably(&dir.join(META_FILE), &bytes)
    }
}

const META_FILE: &str = "meta.json";

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content,
/// never a mix: write a temporary file, sync it, rename it over, sync the directory.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), RaftStoreError> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).at(&tmp)?;
    file.write_all(bytes).at(&tmp)?;
    file.sync_all().at(&tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).at(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .at(dir)
}
