//! Where the writer syncs its store and its directories: through here, so that tests
//! can make a sync fail the way a failing disk does, and see which directories were
//! synced (feature `testing`: [`fail_syncs_under`], [`synced_dirs_under`]).

use std::fs::File;
use std::io;
use std::path::Path;

/// `fdatasync` of a store file, or the failure a test injected for its path.
pub(crate) fn sync_data(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(feature = "testing")]
    if injected::fails(path) {
        return Err(io::Error::from_raw_os_error(
            rustix::io::Errno::IO.raw_os_error(),
        ));
    }
    let _ = path;
    file.sync_data()
}

/// `fsync` of a directory, so that the entries created or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|dir| dir.sync_all())?;
    #[cfg(feature = "testing")]
    injected::record_dir_sync(dir);
    Ok(())
}

#[cfg(feature = "testing")]
pub use injected::{SyncFaults, fail_syncs_under, synced_dirs_under};

#[cfg(feature = "testing")]
mod injected {
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn record_dir_sync(dir: &Path) {
        SYNCED_DIRS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(dir.to_path_buf());
    }

    /// Every directory synced so far that is `dir` or under it, in the order they
    /// were synced (with repeats).
    pub fn synced_dirs_under(dir: &Path) -> Vec<PathBuf> {
        SYNCED_DIRS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|synced| synced.starts_with(dir))
            .cloned()
            .collect()
    }

    /// While held, every sync of a store file under a directory fails with `EIO`.
    #[derive(Debug)]
    #[must_use = "the fault lasts while the guard lives"]
    pub struct SyncFaults {
        dir: PathBuf,
    }

    /// Makes every store sync under `dir` fail with `EIO` (as a disk that lost the
    /// writes would) until the returned guard is dropped. Other directories, and so
    /// tests running beside this one, are not affected.
    pub fn fail_syncs_under(dir: &Path) -> SyncFaults {
        let dir = dir.to_path_buf();
        lock().push(dir.clone());
        SyncFaults { dir }
    }

    impl Drop for SyncFaults {
        fn drop(&mut self) {
            let mut failing = lock();
            if let Some(at) = failing.iter().position(|dir| *dir == self.dir) {
                failing.swap_remove(at);
            }
        }
    }

    pub(super) fn fails(path: &Path) -> bool {
        lock().iter().any(|dir| path.starts_with(dir))
    }

    fn lock() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        FAILING.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
