//! The Raft log on `keel-commitlog`: entry `i` is the record at offset `i`.
//!
//! ```text
//!  append ──encode──> Log::append_batch (written, readable) ──> return
//!                          └── (last index, callback) ──> sync thread
//!  sync thread: take every waiting callback ──> one fdatasync ──> call them all
//! ```
//!
//! The commit log runs with `SyncPolicy::Never`: its writer never waits for the
//! disk, and the sync thread's [`keel_commitlog::Syncer`] makes a whole group of
//! appends durable with one sync. openraft calls `append` for each batch of entries
//! it has; while one sync runs, the next appends are written and wait for the next.
//!
//! Purging is logical first: `meta.json` records the purged log id, readers stop at
//! it, and the commit log drops the whole segments below it. A purge past the end
//! (a snapshot newer than the log) starts the commit log over at the next index.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use keel_commitlog::{Log, LogConfig, Reader, SyncPolicy, Syncer};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, RaftLogReader};

use crate::codec;
use crate::damage::DamageMark;
use crate::error::RaftStoreError;
use crate::meta::Meta;
use crate::{Entry, LogId, StorageError, TypeConfig, Vote};

/// How the Raft log is stored.
#[derive(Debug, Clone)]
pub struct LogStoreConfig {
    /// The largest entry: a batch of commands and their framing.
    pub max_entry_bytes: u64,
    /// The size at which a segment of the Raft log rolls.
    pub segment_bytes: u64,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self {
            max_entry_bytes: 16 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A node's Raft log and vote, in a directory of its own:
///
/// ```text
///  dir/meta.json     vote and purged log id (replaced atomically, synced)
///  dir/log/          the commit log: entry i at offset i
/// ```
pub struct LogStore {
    dir: PathBuf,
    log: Log,
    reader: LogReader,
    meta: Meta,
    /// The last entry in the log, or the purged one when the log is empty.
    last: Option<LogId>,
    /// Appends waiting to be made durable.
    flushes: mpsc::Sender<Flush>,
    /// Set while the log may miss entries it acknowledged.
    damage: DamageMark,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir)
            .field("last", &self.last)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// What the sync thread is asked to do, in order.
enum Flush {
    /// An append written and waiting for the sync that makes it durable.
    Append {
        /// The offset after the append's last entry.
        end: u64,
        callback: LogFlushed<TypeConfig>,
    },
    /// Answer once every append queued before this one has been reported: the
    /// writer waits for it before cutting entries, so that no append is reported
    /// flushed after its entries were cut.
    Barrier(mpsc::Sender<()>),
}

/// Reads the Raft log from any task; it sees every entry appended, never a purged one.
#[derive(Debug, Clone)]
pub struct LogReader {
    reader: Reader,
    /// The first index that is not purged.
    first: Arc<AtomicU64>,
}

/// How many bytes of entries one read of the commit log takes at most.
const READ_CHUNK_BYTES: usize = 4 * 1024 * 1024;

impl LogReader {
    /// The entries of `range` that the log holds, in order.
    ///
    /// # Errors
    ///
    /// The commit log fails to read, or an entry does not decode.
    pub fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, RaftStoreError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(self.first.load(Ordering::Acquire))
        .max(self.reader.lowest_offset());
        let next = self.reader.next_offset();
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        }
        .min(next);
        let mut entries = Vec::with_capacity(end.saturating_sub(start).min(4096) as usize);
        if start >= end {
            return Ok(entries);
        }
        let mut cursor = self.reader.cursor(start);
        while cursor.position() < end {
            let chunk = cursor.next_chunk(READ_CHUNK_BYTES)?;
            if chunk.is_empty() {
                break;
            }
            for record in chunk {
                if record.offset >= end {
                    break;
                }
                entries.push(codec::decode(record.offset, record.value)?);
            }
        }
        Ok(entries)
    }

    /// The log id of the entry at `index`, which the log must hold.
    fn log_id_at(&self, index: u64) -> Result<LogId, RaftStoreError> {
        self.entries(index..=index)?
            .first()
            .map(|entry| *entry.get_log_id())
            .ok_or_else(|| RaftStoreError::BadEntry {
                index,
                reason: "the log does not hold it".to_owned(),
            })
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries(range).map_err(RaftStoreError::reading_logs)
    }
}

impl LogStore {
    /// Opens (creating, recovering) the Raft log in `dir`.
    ///
    /// # Errors
    ///
    /// The directory cannot be created or read; the meta file does not parse; the
    /// commit log fails to open (see `keel_commitlog::Log::open`); its last entry
    /// does not decode.
    pub fn open(dir: &Path, config: &LogStoreConfig) -> Result<Self, RaftStoreError> {
        keel_commitlog::create_dir_durably(dir)?;
        let mut meta = Meta::load(dir)?;
        let damage = DamageMark::load(dir);
        let log_config = LogConfig {
            max_record_bytes: config.max_entry_bytes,
            segment_bytes: config.segment_bytes,
            segment_max_records: u64::from(u32::MAX),
            sync: SyncPolicy::Never,
            ..LogConfig::default()
        };
        let mut log = match Log::open(dir.join("log"), log_config.clone()) {
            Ok(log) => log,
            Err(err @ keel_commitlog::LogError::Corrupt { .. }) => {
                // Entries it acknowledged may be among those cut: it re-replicates them.
                let log = Log::open_repairing(dir.join("log"), log_config)?;
                damage.set(&format!(
                    "the raft log failed its checksums and was cut: {err}"
                ))?;
                log
            }
            Err(err) => return Err(err.into()),
        };
        let report = log.recovery();
        if !report.is_clean() {
            tracing::warn!(?report, "the raft log recovered from an unclean shutdown");
        }
        if !report.truncations.is_empty() && !damage.is_set() {
            // A crash of the process loses nothing written; a cut record is a torn
            // write of a power loss or damage, and may have been acknowledged.
            damage.set(&format!(
                "recovery cut the raft log at offset {}",
                report.truncations[0].next_offset
            ))?;
        }
        if damage.is_set()
            && let Some(vote) = meta.vote
            && vote.is_committed()
        {
            // Not the leader it was: a committed vote for itself would make it lead
            // again at start, with a log that may miss entries.
            meta.vote = Some(Vote::new(vote.leader_id.term, vote.leader_id.node_id));
            meta.store(dir)?;
        }
        let first = meta.purged.map_or(0, |purged| purged.index + 1);
        if log.next_offset() < first || log.lowest_offset() > first {
            // A purge past the end was cut short by a crash: finish it.
            log.reset(first)?;
        }
        let reader = LogReader {
            reader: log.reader(),
            first: Arc::new(AtomicU64::new(first)),
        };
        let last = match log.next_offset() {
            next if next > first => Some(reader.log_id_at(next - 1)?),
            _ => meta.purged,
        };
        let flushes = spawn_sync_thread(log.syncer())?;
        tracing::info!(
            dir = %dir.display(),
            first,
            last = ?last,
            vote = ?meta.vote,
            "opened raft log"
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            log,
            reader,
            meta,
            last,
            flushes,
            damage,
        })
    }

    /// Whether the log may miss entries it acknowledged (see [`DamageMark`]).
    pub fn damage(&self) -> DamageMark {
        self.damage.clone()
    }

    /// Discards the Raft log in `dir`, as a node whose state machine is damaged does
    /// before it re-replicates everything: the entries and the purge point go, the
    /// vote stays (a node never votes twice in a term), not committed, and the node
    /// is marked damaged.
    ///
    /// # Errors
    ///
    /// The files cannot be removed or written.
    pub fn discard(dir: &Path, why: &str) -> Result<(), RaftStoreError> {
        let log = dir.join("log");
        match std::fs::remove_dir_all(&log) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(RaftStoreError::io(&log, err)),
        }
        keel_commitlog::create_dir_durably(dir)?;
        let mut meta = Meta::load(dir)?;
        meta.purged = None;
        meta.vote = meta
            .vote
            .map(|vote| Vote::new(vote.leader_id.term, vote.leader_id.node_id));
        meta.store(dir)?;
        DamageMark::load(dir).set(why)
    }

    fn append_now(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Option<u64>, RaftStoreError> {
        let mut encoded = Vec::new();
        let mut last = None;
        for entry in entries {
            if last.is_none()
                && self.log.lowest_offset() == self.log.next_offset()
                && entry.log_id.index != self.log.next_offset()
            {
                // An empty log may start anywhere (openraft's suite starts at 1, and
                // appends below a purge that it made on an empty log).
                self.log.reset(entry.log_id.index)?;
            }
            let expected = self.log.next_offset() + encoded.len() as u64;
            if entry.log_id.index != expected {
                return Err(RaftStoreError::BadEntry {
                    index: entry.log_id.index,
                    reason: format!("appended where entry {expected} belongs"),
                });
            }
            encoded.push(codec::to_bytes(&entry)?);
            last = Some(entry.log_id);
        }
        let Some(last) = last else {
            return Ok(None);
        };
        let range = self.log.append_batch(&encoded)?;
        self.last = Some(last);
        Ok(Some(range.end))
    }

    /// Waits until the sync thread has reported every append queued so far.
    fn settle_flushes(&self) {
        let (done, settled) = mpsc::channel();
        if self.flushes.send(Flush::Barrier(done)).is_ok() {
            let _ = settled.recv();
        }
    }

    fn truncate_now(&mut self, from: u64) -> Result<(), RaftStoreError> {
        self.settle_flushes();
        let first = self.reader.first.load(Ordering::Acquire);
        self.log.truncate_suffix(from.max(first))?;
        self.last = if from > first {
            Some(self.reader.log_id_at(from - 1)?)
        } else {
            self.meta.purged
        };
        Ok(())
    }

    fn purge_now(&mut self, upto: LogId) -> Result<(), RaftStoreError> {
        let mut meta = self.meta.clone();
        meta.purged = Some(upto);
        meta.store(&self.dir)?;
        self.meta = meta;
        let first = upto.index + 1;
        self.reader.first.store(first, Ordering::Release);
        if first > self.log.next_offset() {
            self.settle_flushes();
            self.log.reset(first)?;
            self.last = Some(upto);
        } else {
            self.log.truncate_prefix(first)?;
        }
        Ok(())
    }
}

/// Starts the thread that makes appends durable: it takes every append waiting,
/// syncs once, and reports all of them flushed. It ends when the store is dropped.
fn spawn_sync_thread(syncer: Syncer) -> Result<mpsc::Sender<Flush>, RaftStoreError> {
    let (flushes, waiting) = mpsc::channel::<Flush>();
    std::thread::Builder::new()
        .name("keel-raft-sync".to_owned())
        .spawn(move || {
            while let Ok(first) = waiting.recv() {
                let mut group = vec![first];
                group.extend(waiting.try_iter());
                // Entries are cut only after a barrier queued behind their appends
                // is answered: every append here still has its entries.
                let synced = syncer.sync();
                if let Err(err) = &synced {
                    tracing::error!(error = %err, "syncing the raft log failed");
                }
                for flush in group {
                    match flush {
                        Flush::Append { end, callback } => {
                            callback.log_io_completed(match &synced {
                                Ok(durable) if end <= *durable => Ok(()),
                                Ok(durable) => Err(std::io::Error::other(format!(
                                    "raft log entries below {end} were synced only below {durable}"
                                ))),
                                Err(err) => Err(std::io::Error::other(err.to_string())),
                            });
                        }
                        Flush::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        })
        .map_err(|source| RaftStoreError::io("keel-raft-sync thread", source))?;
    Ok(flushes)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        Ok(LogState {
            last_purged_log_id: self.meta.purged,
            last_log_id: self.last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut meta = self.meta.clone();
        meta.vote = Some(*vote);
        meta.store(&self.dir).map_err(|err| {
            StorageError::from(openraft::StorageIOError::write_vote(
                openraft::AnyError::new(&err),
            ))
        })?;
        self.meta = meta;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.meta.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_now(entries) {
            Ok(Some(end)) => {
                if let Err(mpsc::SendError(Flush::Append { callback, .. })) =
                    self.flushes.send(Flush::Append { end, callback })
                {
                    callback.log_io_completed(Err(std::io::Error::other(
                        "the raft log sync thread is gone",
                    )));
                }
                Ok(())
            }
            Ok(None) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(err) => {
                callback.log_io_completed(Err(std::io::Error::other(err.to_string())));
                Err(err.writing_logs())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log");
        self.truncate_now(log_id.index)
            .map_err(RaftStoreError::writing_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging the raft log");
        self.purge_now(log_id).map_err(RaftStoreError::writing_logs)
    }
}
