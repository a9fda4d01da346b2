//! Snapshots on disk: a directory per snapshot, holding its manifest, the state
//! machine's summary and its files (hard links to the state machine's own files,
//! which only grow, so a length fixes their content).
//!
//! ```text
//!  snapshots/
//!    CURRENT                      names the latest complete snapshot (replaced atomically)
//!    <id>/manifest.json           Raft's snapshot meta and the list of files with lengths
//!    <id>/state                   the state machine's summary (Checkpoint::state)
//!    <id>/data/<name>             the state machine's files, by their relative names
//!    incoming-<id>/               a snapshot being received from the leader
//! ```

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::error::{AtPath, RaftStoreError};
use crate::meta::write_durably;
use crate::{Node, NodeId};

/// Raft's metadata of a snapshot.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;

/// What a snapshot holds: Raft's metadata and the state machine's files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The last entry the snapshot includes, its membership and its id.
    pub meta: SnapshotMeta,
    /// The state machine's files, each with the length that belongs to the snapshot.
    pub files: Vec<ManifestFile>,
    /// The length of the state machine's summary.
    pub state_len: u64,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestFile {
    /// Its path relative to the state machine's directory ("topics/a/000.log").
    pub name: String,
    /// The bytes of it that belong to the snapshot.
    pub len: u64,
}

/// A snapshot as openraft passes it around: a directory on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The snapshot's directory.
    pub dir: PathBuf,
    /// Its manifest; `None` for a directory that is still being received.
    pub manifest: Option<Manifest>,
}

const MANIFEST: &str = "manifest.json";
const STATE: &str = "state";
const DATA: &str = "data";
const CURRENT: &str = "CURRENT";

impl SnapshotFiles {
    /// The path of a file of the snapshot, by its name in the manifest.
    pub fn data_path(&self, name: &str) -> PathBuf {
        self.dir.join(DATA).join(name)
    }

    /// The directory holding the state machine's files.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(DATA)
    }

    /// The state machine's summary.
    ///
    /// # Errors
    ///
    /// It cannot be read, or is not as long as the manifest says.
    pub fn state(&self) -> Result<Vec<u8>, RaftStoreError> {
        let path = self.dir.join(STATE);
        let state = fs::read(&path).at(&path)?;
        if let Some(manifest) = &self.manifest
            && state.len() as u64 != manifest.state_len
        {
            return Err(RaftStoreError::Invalid {
                path,
                reason: format!(
                    "{} bytes where the manifest says {}",
                    state.len(),
                    manifest.state_len
                ),
            });
        }
        Ok(state)
    }

    /// A file of the snapshot, opened and positioned at `at`, reading no further
    /// than the length the manifest gives it.
    ///
    /// # Errors
    ///
    /// The file cannot be opened.
    pub fn open_at(&self, file: &ManifestFile, at: u64) -> Result<impl Read, RaftStoreError> {
        let path = self.data_path(&file.name);
        let mut handle = fs::File::open(&path).at(&path)?;
        handle.seek(SeekFrom::Start(at)).at(&path)?;
        Ok(handle.take(file.len.saturating_sub(at)))
    }
}

/// The snapshots of one node.
#[derive(Debug, Clone)]
pub(crate) struct Snapshots {
    root: PathBuf,
}

impl Snapshots {
    pub(crate) fn open(root: &Path) -> Result<Self, RaftStoreError> {
        keel_commitlog::create_dir_durably(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory of the latest complete snapshot, if there is one.
    fn current_dir(&self) -> Result<Option<PathBuf>, RaftStoreError> {
        let path = self.root.join(CURRENT);
        match fs::read_to_string(&path) {
            Ok(id) => Ok(Some(self.root.join(id.trim()))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(RaftStoreError::io(path, err)),
        }
    }

    /// The latest complete snapshot, if there is one.
    pub(crate) fn current(&self) -> Result<Option<SnapshotFiles>, RaftStoreError> {
        let Some(dir) = self.current_dir()? else {
            return Ok(None);
        };
        let manifest_path = dir.join(MANIFEST);
        let bytes = fs::read(&manifest_path).at(&manifest_path)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|err| RaftStoreError::Invalid {
                path: manifest_path,
                reason: format!("not a snapshot manifest: {err}"),
            })?;
        Ok(Some(SnapshotFiles {
            dir,
            manifest: Some(manifest),
        }))
    }

    /// Where a snapshot is received (nothing is created).
    pub(crate) fn incoming_dir(&self, id: &str) -> SnapshotFiles {
        SnapshotFiles {
            dir: self.root.join(format!("incoming-{}", safe_id(id))),
            manifest: None,
        }
    }

    /// A directory to receive a snapshot into, created if need be.
    pub(crate) fn incoming(&self, id: &str) -> Result<SnapshotFiles, RaftStoreError> {
        let incoming = self.incoming_dir(id);
        fs::create_dir_all(incoming.data_dir()).at(&incoming.dir)?;
        Ok(incoming)
    }

    /// Makes a snapshot of `files` (each `(name, source path, len)`) and `state`,
    /// described by `meta`, and makes it the current one. Files are hard-linked where
    /// the filesystem allows and copied (`len` bytes) where not.
    pub(crate) fn create(
        &self,
        meta: SnapshotMeta,
        files: &[(String, PathBuf, u64)],
        state: &[u8],
    ) -> Result<SnapshotFiles, RaftStoreError> {
        let id = safe_id(&meta.snapshot_id);
        let building = self.root.join(format!("building-{id}"));
        if building.exists() {
            fs::remove_dir_all(&building).at(&building)?;
        }
        let data = building.join(DATA);
        fs::create_dir_all(&data).at(&data)?;
        let mut listed = Vec::with_capacity(files.len());
        for (name, source, len) in files {
            let target = data.join(checked_name(name, &building)?);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            link_or_copy(source, &target, *len)?;
            listed.push(ManifestFile {
                name: name.clone(),
                len: *len,
            });
        }
        let manifest = Manifest {
            meta,
            files: listed,
            state_len: state.len() as u64,
        };
        self.finish(&building, &manifest, state)
    }

    /// Takes a snapshot that lies elsewhere (another node's, or one received into an
    /// `incoming-` directory, whose files the receiver has checked against the
    /// manifest) and makes it the current one.
    pub(crate) fn adopt(
        &self,
        snapshot: &SnapshotFiles,
        manifest: &Manifest,
    ) -> Result<SnapshotFiles, RaftStoreError> {
        let state = snapshot.state()?;
        let received = snapshot.dir.parent() == Some(self.root.as_path())
            && snapshot
                .dir
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("incoming-"));
        if received {
            return self.finish(&snapshot.dir, manifest, &state);
        }
        let files: Vec<(String, PathBuf, u64)> = manifest
            .files
            .iter()
            .map(|file| (file.name.clone(), snapshot.data_path(&file.name), file.len))
            .collect();
        self.create(manifest.meta.clone(), &files, &state)
    }

    /// Writes the manifest and state into `staging`, syncs, moves it to its final
    /// name and points `CURRENT` at it; then drops all but this and the previous one.
    fn finish(
        &self,
        staging: &Path,
        manifest: &Manifest,
        state: &[u8],
    ) -> Result<SnapshotFiles, RaftStoreError> {
        let id = safe_id(&manifest.meta.snapshot_id);
        write_durably(&staging.join(STATE), state)?;
        let bytes = serde_json::to_vec_pretty(manifest).map_err(|err| RaftStoreError::Invalid {
            path: staging.join(MANIFEST),
            reason: err.to_string(),
        })?;
        write_durably(&staging.join(MANIFEST), &bytes)?;
        sync_tree(&staging.join(DATA))?;
        // A name no directory has: the current snapshot may carry the same id (a
        // leader sending its snapshot again), and it stays whole until `CURRENT`
        // names the new one.
        let name = (0..)
            .map(|k| {
                if k == 0 {
                    id.clone()
                } else {
                    format!("{id}.{k}")
                }
            })
            .find(|name| !self.root.join(name).exists())
            .unwrap_or(id);
        let dir = self.root.join(&name);
        fs::rename(staging, &dir).at(&dir)?;
        let previous = self.current_dir().ok().flatten();
        write_durably(&self.root.join(CURRENT), name.as_bytes())?;
        self.remove_all_but(&[Some(dir.clone()), previous]);
        Ok(SnapshotFiles {
            dir,
            manifest: Some(manifest.clone()),
        })
    }

    fn remove_all_but(&self, keep: &[Option<PathBuf>]) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if !path.is_dir() || keep.iter().flatten().any(|kept| kept == &path) {
                continue;
            }
            // A snapshot being received stays until it is adopted or replaced.
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with("incoming-"))
            {
                continue;
            }
            if let Err(err) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove an old snapshot");
            }
        }
    }
}

/// A snapshot id as a directory name: its characters other than `[A-Za-z0-9-_]`
/// become `_`.
fn safe_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A file name of a manifest, refused unless it is a plain relative path (it comes
/// from another node).
pub(crate) fn checked_name(name: &str, within: &Path) -> Result<PathBuf, RaftStoreError> {
    let path = Path::new(name);
    if name.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(RaftStoreError::Invalid {
            path: within.to_path_buf(),
            reason: format!("the snapshot names a file {name:?}, which is not a relative path"),
        });
    }
    Ok(path.to_path_buf())
}

fn link_or_copy(source: &Path, target: &Path, len: u64) -> Result<(), RaftStoreError> {
    if fs::hard_link(source, target).is_ok() {
        return Ok(());
    }
    let mut from = fs::File::open(source).at(source)?;
    let mut to = fs::File::create(target).at(target)?;
    let copied = std::io::copy(&mut (&mut from).take(len), &mut to).at(target)?;
    if copied != len {
        return Err(RaftStoreError::Invalid {
            path: source.to_path_buf(),
            reason: format!("{copied} bytes where the snapshot needs {len}"),
        });
    }
    to.sync_all().at(target)
}

/// Syncs every directory under `dir` (new links are directory entries).
fn sync_tree(dir: &Path) -> Result<(), RaftStoreError> {
    for entry in fs::read_dir(dir).at(dir)?.filter_map(Result::ok) {
        if entry.path().is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}
