//! [`Log`]: the single writer of a log directory, and the way to open one.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::commit_log::CommitLog;
use crate::error::{IoContext, LogError, Result};
use crate::format::{self, HEADER_LEN};
use crate::reader::Reader;
use crate::recovery::{self, RecoveryReport};
use crate::sealer::{self, Sealer};
use crate::segment::{Segment, SegmentFiles, Tail};
use crate::shared::Shared;
use crate::{LogConfig, Offset, Record, SyncPolicy};

/// Name of the lock file that keeps a second writer out of a directory.
const LOCK_FILE: &str = "LOCK";
/// Pending index entries of the active segment are written out at this size.
const INDEX_FLUSH_BYTES: usize = 64 * 1024;

/// A durable, segmented, append-only log of records in one directory.
///
/// `Log` is the only writer (writes take `&mut self`); hand [`Log::reader`] handles
/// to other threads for concurrent reads. A directory is locked while a `Log` has it
/// open.
///
/// ```
/// use keel_commitlog::{Log, LogConfig, LogError};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let mut log = Log::open(dir.path(), LogConfig::default())?;
/// assert_eq!(log.append(b"hello")?, 0);
/// assert_eq!(log.append_batch(&[b"a", b"b"])?, 1..3);
/// assert_eq!(&log.read(0)?.value[..], b"hello");
/// assert!(matches!(log.read(3), Err(LogError::OffsetOutOfRange { offset: 3, lowest: 0, next: 3 })));
/// log.close()?;
///
/// let log = Log::open(dir.path(), LogConfig::default())?;
/// assert_eq!(log.next_offset(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    config: LogConfig,
    active: Active,
    /// Newest timestamp written; appends never go below it.
    last_timestamp_ms: u64,
    /// When the store was last synced (for `SyncPolicy::Interval`).
    last_sync: Instant,
    /// Why writes are refused, after a failure that leaves the disk state unknown.
    failed: Option<String>,
    /// Whether the filesystem can preallocate (`fallocate`); learnt on first use.
    can_preallocate: bool,
    report: RecoveryReport,
    /// Reused buffers for encoding a batch.
    frames: Vec<u8>,
    positions: Vec<u32>,
    /// Makes rolled segments durable in the background.
    sealer: Sealer,
    closed: bool,
    /// Held for the directory lock; released on drop.
    _lock: File,
}

/// The writer's view of the active segment.
#[derive(Debug)]
struct Active {
    segment: Arc<Segment>,
    files: SegmentFiles,
    base: Offset,
    count: u64,
    store_len: u64,
    /// Entries already in the index file.
    index_written: u64,
    /// Encoded entries not yet written to the index file.
    index_pending: Vec<u8>,
    /// Length of the store file: `store_len` plus zero-filled space allocated
    /// ahead of the writer (see [`LogConfig::preallocate_bytes`]).
    allocated: u64,
    /// Whether the store has writes that were not synced.
    dirty: bool,
}

impl Active {
    /// The active segment over `files`, whose store file is `allocated` bytes long.
    fn new(
        base: Offset,
        files: SegmentFiles,
        tail: Tail,
        index_written: u64,
        allocated: u64,
    ) -> Self {
        let count = tail.positions.len() as u64;
        let store_len = tail.store_len;
        Self {
            segment: Arc::new(Segment::active(base, files.clone(), tail)),
            files,
            base,
            count,
            store_len,
            index_written,
            index_pending: Vec::new(),
            allocated: allocated.max(store_len),
            dirty: false,
        }
    }

    /// Cuts the zero-filled space after the last record, so the store file ends at
    /// its last frame, as a sealed or closed store must.
    fn trim(&mut self) -> Result<()> {
        if self.allocated > self.store_len {
            self.files
                .store
                .set_len(self.store_len)
                .at(&self.files.store_path)?;
            self.allocated = self.store_len;
            self.dirty = true;
        }
        Ok(())
    }

    fn next(&self) -> Offset {
        self.base + self.count
    }

    /// Whether one more frame of `frame_len` bytes fits, given `extra` records of
    /// `extra_bytes` already planned for this segment. An empty segment takes any
    /// record, so a record larger than `segment_bytes` still has a home.
    fn fits(&self, config: &LogConfig, extra: usize, extra_bytes: u64, frame_len: u64) -> bool {
        let count = self.count + extra as u64;
        count == 0
            || (self.store_len + extra_bytes + frame_len <= config.segment_bytes
                && count < config.segment_max_records)
    }
}

impl Log {
    /// Opens the log in `dir`, creating the directory and an empty log if needed,
    /// and recovers from whatever a crash left behind (see [`Log::recovery`]).
    ///
    /// # Errors
    ///
    /// [`LogError::InvalidConfig`] for a config out of range; [`LogError::Locked`] when
    /// another `Log` has the directory; [`LogError::Corrupt`] for damage inside a
    /// sealed segment; I/O errors.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self> {
        config.validate()?;
        let dir = dir.as_ref();
        fs::create_dir_all(dir).at(dir)?;
        let lock = lock_dir(dir)?;
        let opened = recovery::open_dir(dir)?;

        let last_timestamp_ms = opened
            .sealed
            .last()
            .map_or(0, |segment| segment.last_timestamp_ms())
            .max(opened.active.tail.last_timestamp_ms);
        let written = opened.active.tail.positions.len() as u64;
        let active = Active::new(
            opened.active.base,
            opened.active.files,
            opened.active.tail,
            written,
            opened.active.allocated,
        );
        let next = active.next();
        let mut segments = opened.sealed;
        segments.push(Arc::clone(&active.segment));
        let shared = Arc::new(Shared::new(dir.to_path_buf(), segments, next));
        let sealer = Sealer::start(dir)?;

        let mut log = Self {
            shared,
            config,
            active,
            last_timestamp_ms,
            last_sync: Instant::now(),
            failed: None,
            can_preallocate: true,
            report: opened.report,
            frames: Vec::new(),
            positions: Vec::new(),
            sealer,
            closed: false,
            _lock: lock,
        };
        log.apply_retention()?;
        tracing::info!(
            dir = %dir.display(),
            segments = log.report.segments,
            lowest_offset = log.lowest_offset(),
            next_offset = log.next_offset(),
            clean = log.report.is_clean(),
            "opened log"
        );
        Ok(log)
    }

    /// What opening the log found and repaired.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// A handle for reading from other threads.
    pub fn reader(&self) -> Reader {
        Reader::new(Arc::clone(&self.shared))
    }

    /// The lowest offset the log still holds.
    pub fn lowest_offset(&self) -> Offset {
        self.shared.lowest()
    }

    /// The offset the next append will get.
    pub fn next_offset(&self) -> Offset {
        self.active.next()
    }

    /// Bytes of all store files together (what byte retention counts).
    pub fn size_bytes(&self) -> u64 {
        self.reader().size_bytes()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.reader().segment_count()
    }

    /// Reads the record at `offset`.
    ///
    /// # Errors
    ///
    /// See [`Reader::read`].
    pub fn read(&self, offset: Offset) -> Result<Record> {
        self.shared.read(offset)
    }

    /// Reads a chunk of records from `from` on; see [`Reader::read_chunk`].
    ///
    /// # Errors
    ///
    /// See [`Reader::read`].
    pub fn read_chunk(&self, from: Offset, max_bytes: usize) -> Result<Vec<Record>> {
        self.shared.read_chunk(from, max_bytes)
    }

    /// Appends one record and returns its offset. Under [`SyncPolicy::Always`] the
    /// record is on disk when this returns.
    ///
    /// # Errors
    ///
    /// [`LogError::RecordTooLarge`]; [`LogError::Failed`] after an earlier write
    /// failure; I/O errors (nothing of the record is kept).
    pub fn append(&mut self, value: &[u8]) -> Result<Offset> {
        self.append_batch(&[value]).map(|range| range.start)
    }

    /// Appends records in order, with one write and at most one sync per segment the
    /// batch lands in (a batch is split only where the active segment rolls). This is
    /// how callers group commits: collect the waiting appends, append them as one
    /// batch, acknowledge them all.
    ///
    /// # Errors
    ///
    /// [`LogError::RecordTooLarge`] when any value is over the limit (nothing is
    /// appended); [`LogError::Failed`] after an earlier write failure; I/O errors.
    pub fn append_batch<V: AsRef<[u8]>>(&mut self, values: &[V]) -> Result<Range<Offset>> {
        self.check_writable()?;
        let max = self.config.max_record_bytes;
        if let Some(big) = values.iter().find(|v| v.as_ref().len() as u64 > max) {
            return Err(LogError::RecordTooLarge {
                len: big.as_ref().len(),
                max: max as u32,
            });
        }
        let first = self.active.next();
        if values.is_empty() {
            return Ok(first..first);
        }
        if self.active.index_pending.len() >= INDEX_FLUSH_BYTES {
            self.flush_index()?;
        }
        let timestamp_ms = self.timestamp();

        let mut rest = values;
        while let Some(head) = rest.first() {
            if !self
                .active
                .fits(&self.config, 0, 0, format::frame_len(head.as_ref().len()))
            {
                self.roll()?;
            }
            let taken = self.encode_part(rest, timestamp_ms);
            self.write_part(timestamp_ms)?;
            rest = &rest[taken..];
        }
        if let SyncPolicy::Interval(every) = self.config.sync
            && self.last_sync.elapsed() >= every
        {
            self.sync_store()?;
        }
        Ok(first..self.active.next())
    }

    /// Forces every appended record to disk, whatever the sync policy.
    ///
    /// # Errors
    ///
    /// I/O errors; after a failed sync the log refuses writes ([`LogError::Failed`]).
    pub fn sync(&mut self) -> Result<()> {
        self.check_writable()?;
        self.flush_index()?;
        self.sync_store()
    }

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
        // No seal may be in flight on a segment this is about to change.
        self.sealer.wait_idle();
        self.check_writable()?;
        let segments: Vec<Arc<Segment>> = self.shared.segments().clone();
        let k = segments.partition_point(|s| s.base() <= from) - 1;
        let target = Arc::clone(&segments[k]);
        let keep = from - target.base();
        let files = target.files().clone();

        // Where the kept records lie, and where the first dropped one starts.
        let (positions, new_len, index_written) = if k == segments.len() - 1 {
            let mut positions = target.positions(keep as usize + 1);
            let new_len = positions.pop().map_or(HEADER_LEN, u64::from);
            (positions, new_len, self.active.index_written.min(keep))
        } else {
            let scan = recovery::scan_store(
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
                remove_segment_files(segment.files())?;
            }
            files.store.set_len(new_len).at(&files.store_path)?;
            files
                .index
                .set_len(format::index_entry_position(index_written))
                .at(&files.index_path)?;
            files.store.sync_data().at(&files.store_path)?;
            files.index.sync_data().at(&files.index_path)?;
            recovery::sync_dir(&self.shared.dir)
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
        self.active = active;
        self.last_timestamp_ms = last_timestamp_ms;
        tracing::info!(from, dropped = next - from, "truncated log suffix");
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

    /// Flushes and syncs everything and releases the directory.
    ///
    /// # Errors
    ///
    /// I/O errors of the final sync; [`LogError::Failed`] when an earlier failure
    /// left unsynced data in an unknown state.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Drops the log the way a killed process would: pending index entries are
    /// lost and nothing is synced. For crash tests.
    #[cfg(feature = "testing")]
    pub fn kill(mut self) {
        self.closed = true;
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.sealer.finish();
        self.check_writable()?;
        self.flush_index()?;
        self.active
            .files
            .index
            .sync_data()
            .at(&self.active.files.index_path)?;
        self.active.trim()?;
        self.sync_store()
    }

    fn check_writable(&mut self) -> Result<()> {
        if self.failed.is_none() {
            self.failed = self.sealer.error();
        }
        match &self.failed {
            Some(reason) => Err(LogError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A timestamp for new records: now, but never before the newest record.
    fn timestamp(&mut self) -> u64 {
        self.last_timestamp_ms = millis_since_epoch(SystemTime::now()).max(self.last_timestamp_ms);
        self.last_timestamp_ms
    }

    /// Encodes the longest prefix of `values` that fits in the active segment into
    /// `self.frames`/`self.positions`; returns how many records it took (at least one).
    fn encode_part<V: AsRef<[u8]>>(&mut self, values: &[V], timestamp_ms: u64) -> usize {
        self.frames.clear();
        self.positions.clear();
        let next = self.active.next();
        for value in values {
            let value = value.as_ref();
            let frame_len = format::frame_len(value.len());
            let planned = self.positions.len();
            if planned > 0
                && !self
                    .active
                    .fits(&self.config, planned, self.frames.len() as u64, frame_len)
            {
                break;
            }
            self.positions
                .push((self.active.store_len + self.frames.len() as u64) as u32);
            format::encode_frame(&mut self.frames, next + planned as u64, timestamp_ms, value);
        }
        self.positions.len()
    }

    /// Writes the encoded part to the store, syncs it if the policy says so, and
    /// publishes it to readers.
    fn write_part(&mut self, timestamp_ms: u64) -> Result<()> {
        self.preallocate(self.active.store_len + self.frames.len() as u64);
        let active = &mut self.active;
        if let Err(source) = active
            .files
            .store
            .write_all_at(&self.frames, active.store_len)
        {
            // Cut a partial write (and any preallocated space) so the file ends at the
            // last whole record.
            active.allocated = active.store_len;
            if let Err(undo) = active.files.store.set_len(active.store_len) {
                self.failed = Some(format!(
                    "write to {} failed and could not be undone: {undo}",
                    active.files.store_path.display()
                ));
            }
            return Err(LogError::Io {
                path: active.files.store_path.clone(),
                source,
            });
        }
        active.dirty = true;
        if self.config.sync == SyncPolicy::Always {
            self.sync_store()?;
        }

        let active = &mut self.active;
        let store_len = active.store_len + self.frames.len() as u64;
        active
            .segment
            .publish(&self.positions, store_len, timestamp_ms);
        for (i, &position) in self.positions.iter().enumerate() {
            format::encode_index_entry(
                &mut active.index_pending,
                (active.count + i as u64) as u32,
                position,
            );
        }
        active.count += self.positions.len() as u64;
        active.store_len = store_len;
        self.shared.set_next(active.next());
        tracing::trace!(
            next_offset = active.next(),
            records = self.positions.len(),
            "appended"
        );
        Ok(())
    }

    /// Extends the store file, zero-filled, so that it holds at least `end` bytes:
    /// by `preallocate_bytes` at a time, never past the segment size unless one
    /// record is larger. A write inside the file's length then changes no metadata
    /// but the extent state, and its sync is cheaper. A filesystem that cannot
    /// preallocate, or a full disk, leaves the write to extend the file itself.
    fn preallocate(&mut self, end: u64) {
        let chunk = self.config.preallocate_bytes;
        let active = &mut self.active;
        if chunk == 0 || !self.can_preallocate || end <= active.allocated {
            return;
        }
        let target = (active.allocated + chunk)
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

    fn sync_store(&mut self) -> Result<()> {
        if !self.active.dirty {
            return Ok(());
        }
        let files = &self.active.files;
        let started = Instant::now();
        if let Err(source) = files.store.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages; a
            // later fsync could succeed without them. Only recovery can tell.
            self.failed = Some(format!(
                "fsync of {} failed: {source}",
                files.store_path.display()
            ));
            return Err(LogError::Io {
                path: files.store_path.clone(),
                source,
            });
        }
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "synced store"
        );
        self.active.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn flush_index(&mut self) -> Result<()> {
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
    /// complete, to the sealer. The writer does not wait for the old segment's sync;
    /// recovery copes with a sealed segment that a crash caught before its seal.
    fn roll(&mut self) -> Result<()> {
        self.flush_index()?;
        self.active.trim()?;
        let base = self.active.next();
        // Create the new segment first: if that fails, the old one stays active and
        // must not have been flagged durable.
        let new_files = recovery::create_segment(&self.shared.dir, base)?;
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

    /// Removes the `count` oldest segments from the log, then their files.
    fn drop_oldest(&mut self, count: usize, why: &'static str) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let dropped: Vec<Arc<Segment>> = self.shared.segments_mut().drain(..count).collect();
        for segment in &dropped {
            remove_segment_files(segment.files())?;
        }
        recovery::sync_dir(&self.shared.dir)?;
        tracing::info!(
            why,
            segments = count,
            lowest_offset = self.lowest_offset(),
            "dropped old segments"
        );
        Ok(())
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::warn!(dir = %self.shared.dir.display(), error = %err, "closing log on drop failed");
        }
    }
}

impl CommitLog for Log {
    fn append(&mut self, value: &[u8]) -> Result<Offset> {
        Log::append(self, value)
    }

    fn append_batch(&mut self, values: &[&[u8]]) -> Result<Range<Offset>> {
        Log::append_batch(self, values)
    }

    fn read(&self, offset: Offset) -> Result<Record> {
        Log::read(self, offset)
    }

    fn read_chunk(&self, from: Offset, max_bytes: usize) -> Result<Vec<Record>> {
        Log::read_chunk(self, from, max_bytes)
    }

    fn lowest_offset(&self) -> Offset {
        Log::lowest_offset(self)
    }

    fn next_offset(&self) -> Offset {
        Log::next_offset(self)
    }

    fn sync(&mut self) -> Result<()> {
        Log::sync(self)
    }

    fn truncate_prefix(&mut self, before: Offset) -> Result<Offset> {
        Log::truncate_prefix(self, before)
    }

    fn truncate_suffix(&mut self, from: Offset) -> Result<()> {
        Log::truncate_suffix(self, from)
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .at(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LogError::Locked { path }),
        Err(TryLockError::Error(source)) => Err(LogError::Io { path, source }),
    }
}

/// Removes a segment's store, then its index: a crash in between leaves an index
/// with no store, which the next open removes.
fn remove_segment_files(files: &SegmentFiles) -> Result<()> {
    fs::remove_file(&files.store_path).at(&files.store_path)?;
    fs::remove_file(&files.index_path).at(&files.index_path)
}

fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis().try_into().unwrap_or(u64::MAX))
}
