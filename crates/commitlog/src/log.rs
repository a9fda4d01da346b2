//! [`Log`]: the single writer of a log directory, and the way to open one.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::commit_log::CommitLog;
use crate::error::{IoContext, LogError, Result};
use crate::format;
use crate::reader::Reader;
use crate::recovery::{self, RecoveryReport};
use crate::sealer::{self, Sealer};
use crate::segment::{Segment, SegmentFiles, Tail};
use crate::shared::Shared;
use crate::syncer::Syncer;
use crate::{LogConfig, Offset, Record, SyncPolicy};

mod roll;
mod trim;

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
    /// Records whose frames were synced (or found on disk by recovery).
    synced: u64,
    /// Bytes of the store that were synced: where a failed sync cuts it back to.
    synced_len: u64,
    /// Entries already in the index file.
    index_written: u64,
    /// Encoded entries not yet written to the index file, from `index_written` on.
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
            synced: count,
            synced_len: store_len,
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
        Self::open_in(dir.as_ref(), config, recovery::Mode::Refuse)
    }

    /// Opens the log in `dir` like [`Log::open`], but where `open` would fail with
    /// [`LogError::Corrupt`], cuts the log at the first damaged record instead: that
    /// record and every later one are dropped, and their offsets will be handed out
    /// again. [`Log::recovery`] says what was cut. This is an operator's decision
    /// (`keel log repair`), never an automatic one: the records it drops may have
    /// been acknowledged.
    ///
    /// # Errors
    ///
    /// As [`Log::open`], except for damage to records: a store header that is not
    /// this format's is still refused.
    pub fn open_repairing(dir: impl AsRef<Path>, config: LogConfig) -> Result<Self> {
        Self::open_in(dir.as_ref(), config, recovery::Mode::Repair)
    }

    fn open_in(dir: &Path, config: LogConfig, mode: recovery::Mode) -> Result<Self> {
        config.validate()?;
        crate::files::create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;
        let opened = recovery::open_dir(dir, mode)?;

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
        let sealer = Sealer::new();

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
        log.set_vouching()?;
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

    /// Marks whether the active segment's index vouches for its records: under the
    /// `always` policy every entry is written after its record was synced (those found
    /// by recovery are synced here first); under another policy entries run ahead of
    /// syncs, and the mark is cleared, durably, before any is written.
    fn set_vouching(&mut self) -> Result<()> {
        let files = &self.active.files;
        if self.config.sync == SyncPolicy::Always {
            files.store.sync_data().at(&files.store_path)?;
            sealer::update_flags(files, format::FLAG_VOUCHED, 0)
        } else {
            sealer::update_flags(files, 0, format::FLAG_VOUCHED)?;
            files.index.sync_data().at(&files.index_path)
        }
    }

    /// What opening the log found and repaired.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// Why the log refuses writes, once a failure left the disk in a state it cannot
    /// vouch for (a failed sync, say); `None` while it takes writes. A failed log
    /// stays failed until it is opened again.
    pub fn failure(&mut self) -> Option<&str> {
        if self.failed.is_none() {
            self.failed = self.sealer.error().or_else(|| self.shared.failure());
        }
        self.failed.as_deref()
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// A handle that syncs this log from another thread (see [`Syncer`]).
    pub fn syncer(&self) -> Syncer {
        Syncer {
            shared: Arc::clone(&self.shared),
        }
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
        self.append_batch_with(values, None)
    }

    /// Appends records like [`Log::append_batch`], stamped with `timestamp_ms`
    /// instead of the clock (raised to the newest record's timestamp, so timestamps
    /// never go back). Replicas that apply the same appends stamp the same
    /// timestamps.
    ///
    /// # Errors
    ///
    /// As [`Log::append_batch`].
    pub fn append_batch_at<V: AsRef<[u8]>>(
        &mut self,
        values: &[V],
        timestamp_ms: u64,
    ) -> Result<Range<Offset>> {
        self.append_batch_with(values, Some(timestamp_ms))
    }

    fn append_batch_with<V: AsRef<[u8]>>(
        &mut self,
        values: &[V],
        timestamp_ms: Option<u64>,
    ) -> Result<Range<Offset>> {
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
        let timestamp_ms = self.timestamp(timestamp_ms);

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

    /// Writes the index entries of the records appended so far to the index file,
    /// without syncing anything: what a writer does after a [`crate::Syncer`] made
    /// those records durable from another thread, so that the files on disk hold
    /// their index (recovery then has less to rebuild).
    ///
    /// # Errors
    ///
    /// I/O errors; a log that refuses writes ([`LogError::Failed`]).
    pub fn write_index(&mut self) -> Result<()> {
        self.check_writable()?;
        self.flush_index()
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

    /// Syncs every record, and lists the files that hold them with their lengths
    /// now, oldest segment first: each store file and its index file. Records are
    /// only ever added past these lengths (until [`Log::truncate_suffix`] or
    /// [`Log::reset`]), so a path and a length fix a file's content, bar the flag
    /// byte of an index header, which a seal sets. This is how a state machine
    /// built on logs describes a checkpoint.
    ///
    /// # Errors
    ///
    /// As [`Log::sync`]; a file's length cannot be read.
    pub fn checkpoint_files(&mut self) -> Result<Vec<(PathBuf, u64)>> {
        self.sync()?;
        self.sealer.wait_idle();
        self.check_writable()?;
        let segments = self.shared.segments().clone();
        let mut files = Vec::with_capacity(segments.len() * 2);
        for segment in &segments {
            let (store, index) = segment.paths();
            let index_len = fs::metadata(index).at(index)?.len();
            files.push((store.to_path_buf(), segment.store_len()));
            files.push((index.to_path_buf(), index_len));
        }
        Ok(files)
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
            self.failed = self.sealer.error().or_else(|| self.shared.failure());
        }
        match &self.failed {
            Some(reason) => Err(LogError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A timestamp for new records: `at`, or now, but never before the newest record.
    fn timestamp(&mut self, at: Option<u64>) -> u64 {
        let at = at.unwrap_or_else(|| millis_since_epoch(SystemTime::now()));
        self.last_timestamp_ms = at.max(self.last_timestamp_ms);
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
        let synced = self.config.sync == SyncPolicy::Always;
        if synced {
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
        if synced {
            active.synced = active.count;
            active.synced_len = active.store_len;
        }
        self.shared.set_next(active.next());
        tracing::trace!(
            next_offset = active.next(),
            records = self.positions.len(),
            "appended"
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
fn remove_segment_files(segment: &Segment) -> Result<()> {
    let (store_path, index_path) = segment.paths();
    fs::remove_file(store_path).at(store_path)?;
    fs::remove_file(index_path).at(index_path)
}

fn millis_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis().try_into().unwrap_or(u64::MAX))
}
