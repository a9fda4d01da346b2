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

/// The file: the meta and a checksum of it, so that a flipped bit (which could
/// change the vote and still parse) is found.
#[derive(serde::Serialize, serde::Deserialize)]
struct OnDisk {
    #[serde(flatten)]
    meta: Meta,
    /// CRC-32C of the meta as compact JSON (absent in files of older versions).
    #[serde(default)]
    crc32c: Option<u32>,
}

impl Meta {
    fn checksum(&self) -> Result<u32, serde_json::Error> {
        serde_json::to_vec(self).map(|json| crc32c::crc32c(&json))
    }

    /// Reads the meta file in `dir`, or the default when there is none yet.
    ///
    /// # Errors
    ///
    /// [`RaftStoreError::Invalid`] when it does not parse or fails its checksum;
    /// I/O errors.
    pub(crate) fn load(dir: &Path) -> Result<Self, RaftStoreError> {
        let path = dir.join(META_FILE);
        let invalid = |reason: String| RaftStoreError::Invalid {
            path: path.clone(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: OnDisk = serde_json::from_slice(&bytes)
                    .map_err(|err| invalid(format!("not a raft meta file: {err}")))?;
                let sum = file
                    .meta
                    .checksum()
                    .map_err(|err| invalid(err.to_string()))?;
                match file.crc32c {
                    Some(expected) if expected != sum => Err(invalid(format!(
                        "fails its checksum (crc32c {sum:#010x}, the file says {expected:#010x})"
                    ))),
                    _ => Ok(file.meta),
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(RaftStoreError::io(path, err)),
        }
    }

    /// Why the meta file in `dir` cannot be trusted, if it cannot.
    pub(crate) fn damage(dir: &Path) -> Option<String> {
        match Self::load(dir) {
            Err(RaftStoreError::Invalid { path, reason }) => {
                Some(format!("{}: {reason}", path.display()))
            }
            _ => None,
        }
    }

    /// Replaces the meta file in `dir` with this, durably.
    pub(crate) fn store(&self, dir: &Path) -> Result<(), RaftStoreError> {
        let path = dir.join(META_FILE);
        let file = OnDisk {
            meta: self.clone(),
            crc32c: Some(self.checksum().map_err(|err| RaftStoreError::Invalid {
                path: path.clone(),
                reason: err.to_string(),
            })?),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|err| RaftStoreError::Invalid {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        write_durably(&path, &bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A flipped bit that leaves valid JSON (a vote for another node) is caught by
    /// the checksum; the fault suite's corrupt-meta flips such bits.
    #[test]
    fn a_vote_changed_on_disk_should_fail_the_checksum() {
        let dir = tempfile::tempdir().expect("temp dir");
        let meta = Meta {
            vote: Some(Vote::new(7, 2)),
            purged: None,
        };
        meta.store(dir.path()).expect("store");
        assert_eq!(Meta::load(dir.path()).expect("load"), meta);
        assert_eq!(Meta::damage(dir.path()), None);

        let path = dir.path().join(META_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        // '2' (0x32) and '3' (0x33) differ in one bit: node 2 becomes node 3.
        let flipped = text.replacen("\"node_id\": 2", "\"node_id\": 3", 1);
        assert_ne!(flipped, text, "{text}");
        std::fs::write(&path, flipped).expect("write");
        let why = Meta::damage(dir.path()).expect("damage found");
        assert!(why.contains("checksum"), "{why}");
    }

    #[test]
    fn a_meta_file_without_a_checksum_should_still_load() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(META_FILE);
        std::fs::write(&path, r#"{"vote":null,"purged":null}"#).expect("write");
        assert_eq!(Meta::load(dir.path()).expect("load"), Meta::default());
    }
}
