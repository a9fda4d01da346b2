//! One segment: a store file of framed records and an index file of their
//! positions, both named by the segment's base offset.
//!
//! A segment is either **sealed** (immutable; positions are read from the index
//! file) or **active** (the one the writer appends to; positions are kept in memory
//! and published to readers under a short lock, and the index file trails them as a
//! cache that recovery can rebuild). Sealing or reactivating a segment makes a new
//! `Segment` value over the same files, so a reader that holds the old one keeps a
//! consistent view.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use bytes::Bytes;

use crate::error::{Corruption, LogError, Result};
use crate::format::{self, FrameError, HEADER_LEN, INDEX_ENTRY_LEN};
use crate::{Offset, Record};

/// The two files of a segment and their paths.
#[derive(Debug, Clone)]
pub(crate) struct SegmentFiles {
    pub(crate) store: Arc<File>,
    pub(crate) index: Arc<File>,
    pub(crate) store_path: PathBuf,
    pub(crate) index_path: PathBuf,
}

/// The file names of the segment that starts at `base`.
pub(crate) fn file_names(base: Offset) -> (String, String) {
    (format!("{base:020}.log"), format!("{base:020}.index"))
}

/// Parses a segment file name into its base offset and whether it is the store.
pub(crate) fn parse_file_name(name: &str) -> Option<(Offset, bool)> {
    let (stem, extension) = name.split_once('.')?;
    let is_store = match extension {
        "log" => true,
        "index" => false,
        _ => return None,
    };
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, is_store))
}

/// What readers of the active segment share with the writer.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Store position of every record, in offset order.
    pub(crate) positions: Vec<u32>,
    /// Bytes of the store file that hold complete, published records.
    pub(crate) store_len: u64,
    /// Timestamp of the newest record (0 when empty).
    pub(crate) last_timestamp_ms: u64,
}

#[derive(Debug)]
enum State {
    Sealed {
        count: u64,
        store_len: u64,
        last_timestamp_ms: u64,
    },
    Active(RwLock<Tail>),
}

/// Sealed segments whose files are open at once, in the whole process: reading an
/// old segment opens its two files, and the segment opened longest ago beyond this
/// many closes them. A log of thousands of segments thus holds a handful of file
/// descriptors, not two per segment for life.
const OPEN_SEALED_SEGMENTS: usize = 64;

/// Sealed segments with open files, oldest opened first.
static OPEN_SEALED: Mutex<VecDeque<Weak<LazyFiles>>> = Mutex::new(VecDeque::new());

/// A segment's files, opened when a read needs them. The active segment's stay open;
/// a sealed segment's are closed when [`OPEN_SEALED_SEGMENTS`] others were opened
/// since (a read under way keeps its handles until it ends).
#[derive(Debug)]
pub(crate) struct LazyFiles {
    pub(crate) store_path: PathBuf,
    pub(crate) index_path: PathBuf,
    handles: Mutex<Option<SegmentFiles>>,
    /// Whether the files may be closed (a sealed segment's).
    evictable: bool,
}

impl LazyFiles {
    /// The segment's files, opening them if they are closed.
    pub(crate) fn open(self: &Arc<Self>) -> Result<SegmentFiles> {
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = &*handles {
            return Ok(files.clone());
        }
        let files = SegmentFiles {
            store: Arc::new(crate::files::open_rw(&self.store_path, false)?),
            index: Arc::new(crate::files::open_rw(&self.index_path, false)?),
            store_path: self.store_path.clone(),
            index_path: self.index_path.clone(),
        };
        *handles = Some(files.clone());
        drop(handles);
        if self.evictable {
            let evicted = {
                let mut open = OPEN_SEALED.lock().unwrap_or_else(PoisonError::into_inner);
                open.retain(|files| files.strong_count() > 0);
                open.push_back(Arc::downgrade(self));
                let excess = open.len().saturating_sub(OPEN_SEALED_SEGMENTS);
                open.drain(..excess).collect::<Vec<_>>()
            };
            for files in evicted.iter().filter_map(Weak::upgrade) {
                files.close();
            }
        }
        Ok(files)
    }

    /// Closes the files (reads under way keep theirs until they end).
    fn close(&self) {
        *self.handles.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// One segment as readers see it.
#[derive(Debug)]
pub(crate) struct Segment {
    base: Offset,
    files: Arc<LazyFiles>,
    state: State,
}

/// Where a record lies in the store, and how far the store's readable bytes go.
struct Location {
    position: u64,
    end: u64,
    store_len: u64,
}

impl Segment {
    pub(crate) fn sealed(
        base: Offset,
        files: SegmentFiles,
        count: u64,
        store_len: u64,
        last_timestamp_ms: u64,
    ) -> Self {
        // The handles given are closed now; a read opens them again.
        Self {
            base,
            files: Arc::new(LazyFiles {
                store_path: files.store_path,
                index_path: files.index_path,
                handles: Mutex::new(None),
                evictable: true,
            }),
            state: State::Sealed {
                count,
                store_len,
                last_timestamp_ms,
            },
        }
    }

    pub(crate) fn active(base: Offset, files: SegmentFiles, tail: Tail) -> Self {
        Self {
            base,
            files: Arc::new(LazyFiles {
                store_path: files.store_path.clone(),
                index_path: files.index_path.clone(),
                handles: Mutex::new(Some(files)),
                evictable: false,
            }),
            state: State::Active(RwLock::new(tail)),
        }
    }

    pub(crate) fn base(&self) -> Offset {
        self.base
    }

    /// The segment's files, opened if they were closed.
    pub(crate) fn open_files(&self) -> Result<SegmentFiles> {
        self.files.open()
    }

    /// The paths of the segment's store and index files.
    pub(crate) fn paths(&self) -> (&Path, &Path) {
        (&self.files.store_path, &self.files.index_path)
    }

    /// The offset after this segment's last record.
    pub(crate) fn end(&self) -> Offset {
        self.base + self.count()
    }

    pub(crate) fn count(&self) -> u64 {
        match &self.state {
            State::Sealed { count, .. } => *count,
            State::Active(tail) => read_lock(tail).positions.len() as u64,
        }
    }

    pub(crate) fn store_len(&self) -> u64 {
        match &self.state {
            State::Sealed { store_len, .. } => *store_len,
            State::Active(tail) => read_lock(tail).store_len,
        }
    }

    pub(crate) fn last_timestamp_ms(&self) -> u64 {
        match &self.state {
            State::Sealed {
                last_timestamp_ms, ..
            } => *last_timestamp_ms,
            State::Active(tail) => read_lock(tail).last_timestamp_ms,
        }
    }

    /// Makes newly written records visible to readers (active segments only).
    pub(crate) fn publish(&self, positions: &[u32], store_len: u64, last_timestamp_ms: u64) {
        if let State::Active(tail) = &self.state {
            let mut tail = tail.write().unwrap_or_else(PoisonError::into_inner);
            tail.positions.extend_from_slice(positions);
            tail.store_len = store_len;
            tail.last_timestamp_ms = last_timestamp_ms;
        }
    }

    /// Takes back the records of an active segment from `count` on, whose frames end
    /// at `store_len`: readers no longer see them.
    pub(crate) fn unpublish(&self, count: usize, store_len: u64) {
        if let State::Active(tail) = &self.state {
            let mut tail = tail.write().unwrap_or_else(PoisonError::into_inner);
            tail.positions.truncate(count);
            tail.store_len = store_len;
        }
    }

    /// A copy of the first `count` positions of an active segment.
    pub(crate) fn positions(&self, count: usize) -> Vec<u32> {
        match &self.state {
            State::Active(tail) => {
                let tail = read_lock(tail);
                tail.positions[..count.min(tail.positions.len())].to_vec()
            }
            State::Sealed { .. } => Vec::new(),
        }
    }

    /// Reads the record at `offset`, which must lie in this segment.
    pub(crate) fn read(&self, offset: Offset) -> Result<Record> {
        match self
            .locate(offset)
            .and_then(|location| self.read_at(offset, &location))
        {
            Err(LogError::Corrupt { .. }) if self.is_sealed() => {
                let location = self.locate_by_scan(offset)?;
                self.read_at(offset, &location)
            }
            other => other,
        }
    }

    /// Reads records from `from` (which must lie in this segment) up to `max_bytes`
    /// of store bytes, and at least one record, stopping before offset `end`.
    pub(crate) fn read_chunk(
        &self,
        from: Offset,
        max_bytes: usize,
        end: Offset,
    ) -> Result<Vec<Record>> {
        let read = |location: &Location| self.read_chunk_at(from, location, max_bytes, end);
        match self.locate(from).and_then(|location| read(&location)) {
            Err(LogError::Corrupt { .. }) if self.is_sealed() => {
                let location = self.locate_by_scan(from)?;
                read(&location)
            }
            other => other,
        }
    }

    fn is_sealed(&self) -> bool {
        matches!(self.state, State::Sealed { .. })
    }

    /// Finds a record of a sealed segment without its index, after the index led a
    /// read astray. Slow (reads the segment up to the record) but exact: a damaged
    /// store is reported at the first bad frame, and a damaged index only costs time.
    fn locate_by_scan(&self, offset: Offset) -> Result<Location> {
        let relative = offset - self.base;
        let store_len = self.store_len();
        let files = self.files.open()?;
        let scan = crate::scan::scan_store(
            &files.store,
            &self.files.store_path,
            self.base,
            store_len,
            Some(relative + 1),
        )?;
        match scan.positions.get(relative as usize) {
            Some(&position) => {
                // The store is sound up to the record, so the index was at fault.
                tracing::warn!(
                    index = %self.files.index_path.display(),
                    offset,
                    "index disagrees with its store; read served by a scan. Delete the index file to rebuild it on the next open"
                );
                Ok(Location {
                    position: position.into(),
                    end: scan.valid_end,
                    store_len,
                })
            }
            None => Err(self.corrupt(
                scan.valid_end,
                scan.stop.unwrap_or(Corruption::MissingRecords {
                    expected: relative + 1,
                    found: scan.positions.len() as u64,
                }),
            )),
        }
    }

    fn read_at(&self, offset: Offset, location: &Location) -> Result<Record> {
        let mut buf = vec![0u8; (location.end - location.position) as usize];
        self.read_store(&mut buf, location.position)?;
        let buf = Bytes::from(buf);
        let frame = format::decode_frame(&buf, offset)
            .map_err(|err| self.frame_error(err, location.position))?;
        if frame.len() != buf.len() as u64 {
            // The frame is valid but the index said it was another length.
            let slot = offset - self.base + 1;
            return Err(LogError::Corrupt {
                path: self.files.index_path.clone(),
                position: format::index_entry_position(slot),
                reason: Corruption::BadIndexEntry {
                    slot,
                    relative: slot as u32,
                    position: location.end as u32,
                },
            });
        }
        Ok(Record {
            offset,
            timestamp_ms: frame.timestamp_ms,
            value: buf.slice(format::FRAME_HEADER_LEN..),
        })
    }

    fn read_chunk_at(
        &self,
        from: Offset,
        location: &Location,
        max_bytes: usize,
        end: Offset,
    ) -> Result<Vec<Record>> {
        let first_len = location.end - location.position;
        let available = location.store_len - location.position;
        let len = (max_bytes as u64).clamp(first_len, available);
        let mut buf = vec![0u8; len as usize];
        self.read_store(&mut buf, location.position)?;
        let buf = Bytes::from(buf);

        let mut records = Vec::new();
        let mut at = 0usize;
        let mut offset = from;
        while at < buf.len() && offset < end {
            match format::decode_frame(&buf[at..], offset) {
                Ok(frame) => {
                    let start = at + format::FRAME_HEADER_LEN;
                    let end = start + frame.value.len();
                    records.push(Record {
                        offset,
                        timestamp_ms: frame.timestamp_ms,
                        value: buf.slice(start..end),
                    });
                    at = end;
                    offset += 1;
                }
                // The budget ended inside a record; the next chunk starts with it.
                Err(FrameError::Incomplete { .. }) if !records.is_empty() => break,
                Err(err) => return Err(self.frame_error(err, location.position + at as u64)),
            }
        }
        Ok(records)
    }

    fn locate(&self, offset: Offset) -> Result<Location> {
        let relative = offset.checked_sub(self.base).unwrap_or(u64::MAX);
        match &self.state {
            State::Active(tail) => {
                let tail = read_lock(tail);
                let count = tail.positions.len() as u64;
                let Some(&position) = tail.positions.get(relative as usize) else {
                    return Err(self.out_of_range(offset, count));
                };
                let end = tail
                    .positions
                    .get(relative as usize + 1)
                    .map_or(tail.store_len, |&next| u64::from(next));
                Ok(Location {
                    position: position.into(),
                    end,
                    store_len: tail.store_len,
                })
            }
            State::Sealed {
                count, store_len, ..
            } => {
                if relative >= *count {
                    return Err(self.out_of_range(offset, *count));
                }
                let entries = if relative + 1 < *count { 2 } else { 1 };
                let mut raw = [0u8; 2 * INDEX_ENTRY_LEN as usize];
                let raw = &mut raw[..entries * INDEX_ENTRY_LEN as usize];
                let at = format::index_entry_position(relative);
                let files = self.files.open()?;
                read_exact_at(&files.index, raw, at, &self.files.index_path)?;
                let position = self.check_entry(raw, relative, *store_len)?;
                let end = if entries == 2 {
                    self.check_entry(&raw[INDEX_ENTRY_LEN as usize..], relative + 1, *store_len)?
                } else {
                    *store_len
                };
                if end <= position {
                    return Err(self.bad_entry(relative + 1, &raw[INDEX_ENTRY_LEN as usize..]));
                }
                Ok(Location {
                    position,
                    end,
                    store_len: *store_len,
                })
            }
        }
    }

    fn check_entry(&self, raw: &[u8], slot: u64, store_len: u64) -> Result<u64> {
        let (relative, position) = format::decode_index_entry(raw);
        let position_ok = u64::from(position) >= HEADER_LEN && u64::from(position) < store_len;
        if u64::from(relative) != slot || !position_ok {
            return Err(self.bad_entry(slot, raw));
        }
        Ok(position.into())
    }

    fn bad_entry(&self, slot: u64, raw: &[u8]) -> LogError {
        let (relative, position) = format::decode_index_entry(raw);
        LogError::Corrupt {
            path: self.files.index_path.clone(),
            position: format::index_entry_position(slot),
            reason: Corruption::BadIndexEntry {
                slot,
                relative,
                position,
            },
        }
    }

    fn read_store(&self, buf: &mut [u8], position: u64) -> Result<()> {
        let files = self.files.open()?;
        match files.store.read_exact_at(buf, position) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(self.corrupt(
                position,
                Corruption::TruncatedFrame {
                    len: buf.len() as u64,
                },
            )),
            Err(source) => Err(LogError::Io {
                path: self.files.store_path.clone(),
                source,
            }),
        }
    }

    fn frame_error(&self, err: FrameError, position: u64) -> LogError {
        let reason = match err {
            FrameError::Corrupt(reason) => reason,
            FrameError::Incomplete { frame_len } => Corruption::TruncatedFrame {
                len: frame_len.unwrap_or(format::FRAME_HEADER_LEN as u64),
            },
        };
        self.corrupt(position, reason)
    }

    fn corrupt(&self, position: u64, reason: Corruption) -> LogError {
        LogError::Corrupt {
            path: self.files.store_path.clone(),
            position,
            reason,
        }
    }

    fn out_of_range(&self, offset: Offset, count: u64) -> LogError {
        LogError::OffsetOutOfRange {
            offset,
            lowest: self.base,
            next: self.base + count,
        }
    }
}

fn read_lock(tail: &RwLock<Tail>) -> std::sync::RwLockReadGuard<'_, Tail> {
    // A panic while holding the lock cannot leave `Tail` half-updated in a way that
    // matters: `publish` only extends it. Keep serving reads.
    tail.read().unwrap_or_else(PoisonError::into_inner)
}

/// `read_exact_at` with the path in the error.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], at: u64, path: &Path) -> Result<()> {
    file.read_exact_at(buf, at).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_should_round_trip_and_reject_strangers() {
        let (store, index) = file_names(1234);
        assert_eq!(store, "00000000000000001234.log");
        assert_eq!(index, "00000000000000001234.index");
        assert_eq!(parse_file_name(&store), Some((1234, true)));
        assert_eq!(parse_file_name(&index), Some((1234, false)));
        for stranger in [
            "LOCK",
            "1234.log",
            "0000000000000000123x.log",
            "00000000000000001234.log.tmp",
            "00000000000000001234.idx",
            "99999999999999999999.log",
        ] {
            assert_eq!(parse_file_name(stranger), None, "{stranger}");
        }
    }
}
