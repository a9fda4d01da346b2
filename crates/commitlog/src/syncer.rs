//! Syncing a log from a thread other than its writer's.

use std::sync::Arc;

use crate::error::{LogError, Result};
use crate::shared::Shared;
use crate::{Offset, fault};

/// Makes a log's published records durable from another thread while the writer
/// goes on appending: the group commit of a writer that must not wait for the disk
/// (a consensus log, whose appends must be readable at once and are reported durable
/// later). Get one with [`crate::Log::syncer`]; open the log with
/// [`crate::SyncPolicy::Never`] so the writer never syncs on its own.
///
/// A sync that fails marks the log failed: the writer's next call gets
/// [`LogError::Failed`], and the records it had not made durable are in doubt until
/// the log is opened again (recovery cuts what did not reach the disk).
#[derive(Debug, Clone)]
pub struct Syncer {
    pub(crate) shared: Arc<Shared>,
}

impl Syncer {
    /// Syncs every record published before the call, and returns the offset below
    /// which every record is durable. Syncs of several threads, and truncations of
    /// the log, take turns.
    ///
    /// # Errors
    ///
    /// [`LogError::Failed`] after an earlier failure; I/O errors (the log is then
    /// failed).
    pub fn sync(&self) -> Result<Offset> {
        let mut durable = self.shared.durable();
        if let Some(reason) = self.shared.failure() {
            return Err(LogError::Failed { reason });
        }
        let target = self.shared.next();
        if target <= *durable {
            return Ok(target);
        }
        let segments = self.shared.segments().clone();
        for segment in segments
            .iter()
            .filter(|s| s.end() > *durable && s.base() < target)
        {
            let files = segment.open_files()?;
            if let Err(source) = fault::sync_data(&files.store, &files.store_path) {
                self.shared.fail(format!(
                    "fsync of {} failed: {source}; the records from offset {} on may not be on disk; the log refuses writes until it is opened again",
                    files.store_path.display(),
                    *durable
                ));
                return Err(LogError::Io {
                    path: files.store_path.clone(),
                    source,
                });
            }
        }
        *durable = target;
        Ok(target)
    }

    /// The offset below which every record is known durable to this syncer.
    pub fn durable(&self) -> Offset {
        *self.shared.durable()
    }
}
