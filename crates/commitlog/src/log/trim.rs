//! Trimming a log: dropping its oldest segments (by request, or by retention) and
//! cutting its newest records.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Active, Log, millis_since_epoch, remove_segment_files};
use crate::Offset;
use crate::error::{IoContext, LogError, Result};
use crate::format::{self, HEADER_LEN};
use crate::segment::{Segment, Tail};
use crate::{files, scan, sealer};

impl Log {
    /// Drops every sealed segment whose records all lie below `before`; the active
    /// segment is never dropped. Returns the new lowest offset (at most `before`).
    ///
    /// # Errors
    ///
    /// [`LogError::OffsetOutOfRange`] when `before` is past the next offset; I/O errors.
    pub fn truncate_prefix(&mut self, before: Offset) -> Result<Offset> {
        self.check_writable()?;
        let next = self.active.next();
        if before > next {
            return Err(LogError::OffsetOutOfRange {
                offset: before,
                lowest: self.lowest_offset(),
                next,
            });
        }
        let droppable = {
            let segments = self.shared.segments();
            let sealed = &segments[..segments.len() - 1];
            sealed.iter().take_while(|s| s.end() <= before).count()
        };
        self.drop_oldest(droppable, "truncate_prefix")?;
        Ok(self.lowest_offset())
    }

    /// Drops every record at or after `from`; the next append gets `from`. Segments
    /// after the one holding `from` are deleted, that one is cut and becomes the
    /// active segment, and all of it is synced before this returns. Readers reading
    /// the dropped records at the same time may get errors.
    ///
    /// # Errors
    ///
    /// [`LogError::OffsetOutOfRange`] unless `lowest_offset() <= from <= next_offset()`;
    /// [`LogError::Corrupt`] when a record before `from` in a sealed segment is
    /// damaged; I/O errors.
    pub fn truncate_suffix(&mut self, from: Offset) -> Result<()> {
        self.check_writable()?;
        let (lowest, next) = (self.lowest_offset(), self.active.next());
        if from < lowest || from > next {
            return Err(LogError::OffsetOutOfRange {
                offset: from,
                lowest,
                next,
            });
        }
        if from == next {
            return Ok(());
        }
        // No seal may be in flight on a segment this is about to change, nor a sync
        // from another thread.
        self.sealer.wait_idle();
        let shared = Arc::clone(&self.shared);
        let mut durable = shared.durable();
        self.check_writable()?;
        let segments: Vec<Arc<Segment>> = self.shared.segments().clone();
        let k = segments.partition_point(|s| s.base() <= from) - 1;
        let target = Arc::clone(&segments[k]);
        let keep = from - target.base();
        let files = target.open_files()?;

        // Where the kept records lie, and where the first dropped one starts.
        let (positions, new_len, index_written) = if k == segments.len() - 1 {
            let mut positions = target.positions(keep as usize + 1);
            let new_len = positions.pop().map_or(HEADER_LEN, u64::from);
            (positions, new_len, self.active.index_written.min(keep))
        } else {
            let scan = scan::scan_store(
                &files.store,
                &files.store_path,
                target.base(),
                target.store_len(),
                Some(keep),
            )?;
            if scan.positions.len() as u64 != keep {
                return Err(LogError::Corrupt {
                    path: files.store_path.clone(),
                    position: scan.valid_end,
                    reason: scan.stop.unwrap_or(crate::Corruption::MissingRecords {
                        expected: keep,
                        found: scan.positions.len() as u64,
                    }),
                });
            }
            (scan.positions, scan.valid_end, keep)
        };
        let last_timestamp_ms = if keep > 0 {
            self.read(from - 1)?.timestamp_ms
        } else {
            segments[..k].last().map_or(0, |s| s.last_timestamp_ms())
        };

        // The target becomes the active segment again: it loses its durable flag
        // (durably) before anything is cut. Then newest first, so that a crash part
        // way leaves a log without holes.
        let reactivated = k + 1 < segments.len();
        let result = (|| {
            if reactivated {
                sealer::set_durable(&files, false)?;
                files.index.sync_data().at(&files.index_path)?;
            }
            for segment in segments[k + 1..].iter().rev() {
                remove_segment_files(segment)?;
            }
            // The index first: an entry that outlived its record would vouch for a
            // record that is gone, which recovery takes for corruption.
            files
                .index
                .set_len(format::index_entry_position(index_written))
                .at(&files.index_path)?;
            files.index.sync_data().at(&files.index_path)?;
            files.store.set_len(new_len).at(&files.store_path)?;
            files.store.sync_data().at(&files.store_path)?;
            // What is left was synced: under `always` the index vouches for it.
            if self.config.sync == crate::SyncPolicy::Always {
                sealer::update_flags(&files, format::FLAG_VOUCHED, 0)?;
            } else {
                sealer::update_flags(&files, 0, format::FLAG_VOUCHED)?;
            }
            files.index.sync_data().at(&files.index_path)?;
            files::sync_dir(&self.shared.dir)
        })();
        if let Err(err) = result {
            self.failed = Some(format!("truncate_suffix({from}) failed: {err}"));
            return Err(err);
        }

        let mut index_pending = Vec::new();
        for (slot, &position) in positions.iter().enumerate().skip(index_written as usize) {
            format::encode_index_entry(&mut index_pending, slot as u32, position);
        }
        let tail = Tail {
            positions,
            store_len: new_len,
            last_timestamp_ms,
        };
        let mut active = Active::new(target.base(), files, tail, index_written, new_len);
        active.index_pending = index_pending;
        {
            let mut shared_segments = self.shared.segments_mut();
            shared_segments.truncate(k);
            shared_segments.push(Arc::clone(&active.segment));
        }
        self.shared.set_next(from);
        *durable = (*durable).min(from);
        self.active = active;
        self.last_timestamp_ms = last_timestamp_ms;
        tracing::info!(from, dropped = next - from, "truncated log suffix");
        Ok(())
    }

    /// Drops every record and starts the log over, empty, at `next`: the next append
    /// gets `next`, and `lowest_offset() == next_offset() == next`. A consensus log
    /// does this when it takes a snapshot that is newer than all it holds. Segments
    /// are deleted newest first and the new one is created after, each step synced,
    /// so that a crash part way leaves an older prefix of the log (or an empty log),
    /// never a log with a hole. Readers reading at the same time may get errors.
    ///
    /// # Errors
    ///
    /// [`LogError::Failed`] after an earlier write failure; I/O errors (the log then
    /// refuses writes until it is opened again).
    pub fn reset(&mut self, next: Offset) -> Result<()> {
        self.check_writable()?;
        if self.lowest_offset() == next && self.active.next() == next {
            return Ok(());
        }
        self.sealer.wait_idle();
        let shared = Arc::clone(&self.shared);
        let mut durable = shared.durable();
        self.check_writable()?;
        let segments: Vec<Arc<Segment>> = self.shared.segments().clone();
        let dir = self.shared.dir.clone();
        let vouched = self.config.sync == crate::SyncPolicy::Always;
        let created = (|| {
            for segment in segments.iter().rev() {
                remove_segment_files(segment)?;
            }
            files::sync_dir(&dir)?;
            let files = files::create_segment(&dir, next)?;
            if vouched {
                sealer::update_flags(&files, format::FLAG_VOUCHED, 0)?;
            }
            Ok(files)
        })();
        let files = match created {
            Ok(files) => files,
            Err(err) => {
                self.failed = Some(format!("reset({next}) failed: {err}"));
                return Err(err);
            }
        };
        let tail = Tail {
            positions: Vec::new(),
            store_len: HEADER_LEN,
            last_timestamp_ms: self.last_timestamp_ms,
        };
        let active = Active::new(next, files, tail, 0, HEADER_LEN);
        {
            let mut shared_segments = self.shared.segments_mut();
            shared_segments.clear();
            shared_segments.push(Arc::clone(&active.segment));
        }
        self.shared.set_next(next);
        // The new segment's file and the directory were synced.
        *durable = next;
        self.active = active;
        tracing::info!(next, "reset the log");
        Ok(())
    }

    /// Applies the retention limits now; see [`Log::apply_retention_at`].
    ///
    /// # Errors
    ///
    /// I/O errors while deleting segment files.
    pub fn apply_retention(&mut self) -> Result<usize> {
        self.apply_retention_at(SystemTime::now())
    }

    /// Drops the oldest sealed segments while the log is over its byte limit or
    /// their newest record is older than the age limit at `now`. Returns how many
    /// segments were dropped. Retention also runs on open and after every roll.
    ///
    /// # Errors
    ///
    /// I/O errors while deleting segment files.
    pub fn apply_retention_at(&mut self, now: SystemTime) -> Result<usize> {
        let retention = self.config.retention;
        if retention.bytes.is_none() && retention.age.is_none() {
            return Ok(0);
        }
        let cutoff_ms = retention.age.map(|age| {
            let now_ms = millis_since_epoch(now);
            now_ms.saturating_sub(age.as_millis().try_into().unwrap_or(u64::MAX))
        });
        let droppable = {
            let segments = self.shared.segments();
            let mut total: u64 = segments.iter().map(|s| s.store_len()).sum();
            let mut droppable = 0;
            for segment in &segments[..segments.len() - 1] {
                let too_big = retention.bytes.is_some_and(|limit| total > limit);
                let too_old = cutoff_ms.is_some_and(|cutoff| segment.last_timestamp_ms() < cutoff);
                if !(too_big || too_old) {
                    break;
                }
                total -= segment.store_len();
                droppable += 1;
            }
            droppable
        };
        self.drop_oldest(droppable, "retention")?;
        Ok(droppable)
    }

    /// Removes the `count` oldest segments from the log, then their files.
    pub(super) fn drop_oldest(&mut self, count: usize, why: &'static str) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let dropped: Vec<Arc<Segment>> = self.shared.segments_mut().drain(..count).collect();
        for segment in &dropped {
            remove_segment_files(segment)?;
        }
        files::sync_dir(&self.shared.dir)?;
        tracing::info!(
            why,
            segments = count,
            lowest_offset = self.lowest_offset(),
            "dropped old segments"
        );
        Ok(())
    }
}
