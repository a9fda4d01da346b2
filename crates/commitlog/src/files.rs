//! A segment's files on disk: creating them, opening them, and syncing the directory
//! that holds them.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::Offset;
use crate::error::{IoContext, Result};
use crate::format::{self, INDEX_MAGIC, STORE_MAGIC};
use crate::segment::{self, SegmentFiles};

/// Opens a segment file for reading and writing.
pub(crate) fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .at(path)
}

pub(crate) fn len_of(file: &File, path: &Path) -> Result<u64> {
    Ok(file.metadata().at(path)?.len())
}

/// Creates the two files of a new, empty segment and syncs the directory.
pub(crate) fn create_segment(dir: &Path, base: Offset) -> Result<SegmentFiles> {
    let (store_name, index_name) = segment::file_names(base);
    let store_path = dir.join(store_name);
    let index_path = dir.join(index_name);
    let store = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&store_path)
        .at(&store_path)?;
    let index = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&index_path)
        .at(&index_path)?;
    let written = store
        .write_all_at(&format::encode_header(STORE_MAGIC, base), 0)
        .at(&store_path)
        .and_then(|()| {
            index
                .write_all_at(&format::encode_header(INDEX_MAGIC, base), 0)
                .at(&index_path)
        })
        .and_then(|()| sync_dir(dir));
    if let Err(err) = written {
        // Leave no half-made segment behind; the caller reports `err`.
        let _ = fs::remove_file(&store_path);
        let _ = fs::remove_file(&index_path);
        return Err(err);
    }
    Ok(SegmentFiles {
        store: Arc::new(store),
        index: Arc::new(index),
        store_path,
        index_path,
    })
}

/// Syncs a directory so that file creations and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crate::fault::sync_dir(dir).at(dir)
}

/// Creates `dir` and its missing parents, and syncs the parent of each directory it
/// created, so that a crash cannot lose the new entries (and with them a log whose
/// records were acknowledged).
///
/// # Errors
///
/// [`crate::LogError::Io`] naming the directory that could not be created or synced.
pub fn create_dir_durably(dir: &Path) -> Result<()> {
    let mut created = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|path| !path.as_os_str().is_empty() && !path.exists()) {
        created.push(path);
        at = path.parent();
    }
    fs::create_dir_all(dir).at(dir)?;
    for path in created {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}
