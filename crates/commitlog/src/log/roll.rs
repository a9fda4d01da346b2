//! The active segment's files: preallocating the store ahead of the writer, syncing
//! it, flushing the index, and rolling to a new segment when the active one is full.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use super::{Active, Log};
use crate::error::{IoContext, LogError, Result};
use crate::format::{self, HEADER_LEN};
use crate::segment::{Segment, Tail};
use crate::{SyncPolicy, fault, files, sealer};

/// The first space a segment preallocates.
const MIN_PREALLOCATE: u64 = 64 * 1024;

impl Log {
    /// Extends the store file, zero-filled, so that it holds at least `end` bytes:
    /// by what it holds already (at least 64 KiB), at most `preallocate_bytes` at a
    /// time, never past the segment size unless one record is larger. A write inside the file's length then changes no metadata
    /// but the extent state, and its sync is cheaper. A filesystem that cannot
    /// preallocate, or a full disk, leaves the write to extend the file itself.
    pub(super) fn preallocate(&mut self, end: u64) {
        let chunk = self.config.preallocate_bytes;
        let active = &mut self.active;
        if chunk == 0 || !self.can_preallocate || end <= active.allocated {
            return;
        }
        // A young segment grows its space by what it holds (at least 64 KiB), up to
        // `preallocate_bytes`: a topic that took one record costs 64 KiB, not 4 MiB.
        let step = chunk.min(active.allocated.max(MIN_PREALLOCATE));
        let target = (active.allocated + step)
            .min(self.config.segment_bytes)
            .max(end);
        let grown = rustix::fs::fallocate(
            &*active.files.store,
            rustix::fs::FallocateFlags::empty(),
            active.allocated,
            target - active.allocated,
        );
        match grown {
            Ok(()) => {
                active.allocated = target;
                active.dirty = true;
            }
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                self.can_preallocate = false;
                tracing::debug!(
                    path = %active.files.store_path.display(),
                    "the filesystem cannot preallocate; store files grow with each append"
                );
            }
            Err(err) => tracing::warn!(
                path = %active.files.store_path.display(),
                error = %err,
                "preallocating store space failed; appending without it"
            ),
        }
    }

    pub(super) fn sync_store(&mut self) -> Result<()> {
        if !self.active.dirty {
            return Ok(());
        }
        let files = &self.active.files;
        let started = Instant::now();
        if let Err(source) = fault::sync_data(&files.store, &files.store_path) {
            let path = files.store_path.clone();
            let cut = self.drop_unsynced();
            self.failed = Some(format!(
                "fsync of {} failed: {source}; {cut}; the log refuses writes until it is opened again",
                path.display()
            ));
            tracing::error!(path = %path.display(), error = %source, cut, "fsync failed");
            return Err(LogError::Io { path, source });
        }
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "synced store"
        );
        self.active.dirty = false;
        self.active.synced = self.active.count;
        self.active.synced_len = self.active.store_len;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// After a failed sync, takes back every record that was not synced: from
    /// readers, and from the store file. The kernel may have dropped those pages (or
    /// kept them in memory, marked clean, never to be written): serving them, or
    /// building on them after a restart, would acknowledge records that a power loss
    /// then cuts. Says what it did.
    fn drop_unsynced(&mut self) -> String {
        let active = &mut self.active;
        let from = active.base + active.synced;
        active
            .segment
            .unpublish(active.synced as usize, active.synced_len);
        // Entries of the records taken back go too (under a policy other than
        // `always` some may be in the index file already).
        if active.index_written > active.synced {
            active.index_written = active.synced;
            let _ = active
                .files
                .index
                .set_len(format::index_entry_position(active.synced));
        }
        let kept_entries = active.synced - active.index_written;
        active
            .index_pending
            .truncate((kept_entries * format::INDEX_ENTRY_LEN) as usize);
        active.count = active.synced;
        active.store_len = active.synced_len;
        active.allocated = active.synced_len;
        self.shared.set_next(from);
        match active.files.store.set_len(active.synced_len) {
            Ok(()) => format!("the records from offset {from} on, which were not synced, were cut"),
            Err(err) => format!(
                "cutting the records from offset {from} on, which were not synced, failed too ({err}): they may reappear when the log is opened again, yet be gone from the disk"
            ),
        }
    }

    /// Writes the pending index entries. Under the `always` policy every one is of a
    /// synced record (the index vouches for them); under another, they may run ahead.
    pub(super) fn flush_index(&mut self) -> Result<()> {
        let active = &mut self.active;
        if active.index_pending.is_empty() {
            return Ok(());
        }
        active
            .files
            .index
            .write_all_at(
                &active.index_pending,
                format::index_entry_position(active.index_written),
            )
            .at(&active.files.index_path)?;
        active.index_written += (active.index_pending.len() as u64) / format::INDEX_ENTRY_LEN;
        active.index_pending.clear();
        Ok(())
    }

    /// Starts a new segment at the next offset and hands the old one, its index
    /// complete, to the sealer. The writer does not wait for the seal (the sync of the
    /// index and the durable flag); recovery copes with a sealed segment that a crash
    /// caught before its seal.
    pub(super) fn roll(&mut self) -> Result<()> {
        self.flush_index()?;
        self.active.trim()?;
        let base = self.active.next();
        // Create the new segment first: if that fails, the old one stays active and
        // must not have been flagged durable.
        let new_files = files::create_segment(&self.shared.dir, base)?;
        if self.config.sync == SyncPolicy::Always {
            // An empty index vouches for every entry it will get.
            sealer::update_flags(&new_files, format::FLAG_VOUCHED, 0)?;
        }
        let old_files = self.active.files.clone();
        let sealed = Arc::new(Segment::sealed(
            self.active.base,
            old_files.clone(),
            self.active.count,
            self.active.store_len,
            self.active.segment.last_timestamp_ms(),
        ));
        let active = Active::new(
            base,
            new_files,
            Tail {
                positions: Vec::new(),
                store_len: HEADER_LEN,
                last_timestamp_ms: 0,
            },
            0,
            HEADER_LEN,
        );
        {
            let mut segments = self.shared.segments_mut();
            if let Some(last) = segments.last_mut() {
                *last = sealed;
            }
            segments.push(Arc::clone(&active.segment));
        }
        self.active = active;
        self.sealer.seal(old_files);
        tracing::debug!(base, "rolled to a new segment");
        if let Err(err) = self.apply_retention() {
            // The roll itself succeeded; the next roll or open retries.
            tracing::warn!(error = %err, "retention after roll failed");
        }
        Ok(())
    }
}
