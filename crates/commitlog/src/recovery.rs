//! Opening a log directory: find the segments, check them, repair what a crash can
//! leave behind, and say what was cut.
//!
//! | what | how it is checked | what happens when it fails |
//! | --- | --- | --- |
//! | active (last) segment's store | every frame: length, CRC32C, offset | cut to the longest valid prefix; reported (unless only zeros follow it: preallocated space, kept) |
//! | active segment's index | compared entry by entry with the scan | rewritten; reported |
//! | durable sealed segment's index | length, first and last entry, last frame | rebuilt from a scan of the store; reported |
//! | durable sealed segment's store | its last frame ends the file; a full scan when that fails | `LogError::Corrupt` naming file and position |
//! | sealed segment not yet flagged durable | full scan | complete (zeros after it cut): flagged now; torn: the log ends there (cut, later segments removed); reported |
//! | index file with no store | - | removed; reported |
//!
//! A segment flagged durable by the sealer was synced whole, so damage inside it is
//! not a crash shape but corruption: the log refuses to open rather than guess.
//! The same holds for any record a *vouched* index lists (the flag a writer under the
//! `always` policy keeps: it writes each entry only after its record was synced), so
//! damage before a listed record is corruption too, wherever it is. Damage past the
//! last listed record of the active segment, or of a sealed segment the sealer had
//! not finished, or anywhere in one whose index is not vouched, is what a crash may
//! leave, and is cut.
//!
//! [`Mode::Repair`] is the operator's way out of a corruption error: it cuts the log
//! at the first damage, whatever vouched for the records after it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Offset;
use crate::error::{Corruption, IoContext, LogError, Result};
use crate::files::{create_segment, len_of, open_rw, sync_dir};
use crate::format::{self, HEADER_LEN, INDEX_MAGIC, STORE_MAGIC};
use crate::scan::{Scan, is_zero_filled, scan_store};
use crate::sealer;
use crate::segment::{self, Segment, SegmentFiles, Tail};

/// What [`crate::Log::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Number of segments the log has after opening.
    pub segments: usize,
    /// Store files whose tail was cut.
    pub truncations: Vec<Truncation>,
    /// Index files that were rebuilt from their store.
    pub rebuilt_indexes: Vec<IndexRebuild>,
    /// Files that were removed (index files whose store was gone).
    pub removed_files: Vec<PathBuf>,
}

impl RecoveryReport {
    /// Whether opening changed anything on disk beyond completing a trailing index.
    pub fn is_clean(&self) -> bool {
        self.truncations.is_empty()
            && self.removed_files.is_empty()
            && self
                .rebuilt_indexes
                .iter()
                .all(|rebuild| matches!(rebuild.problem, IndexProblem::Short { .. }))
    }
}

/// The tail of a store file that recovery cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The store file.
    pub path: PathBuf,
    /// The byte position the file was cut at: the end of the last valid record.
    pub position: u64,
    /// How many bytes were cut.
    pub bytes_cut: u64,
    /// The first offset that was not recovered (the log's next offset after opening).
    pub next_offset: Offset,
    /// Why the bytes at `position` were not a valid record.
    pub reason: Corruption,
}

/// An index file that recovery rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRebuild {
    /// The index file.
    pub path: PathBuf,
    /// What was wrong with it.
    pub problem: IndexProblem,
}

/// What was wrong with an index file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexProblem {
    /// The file did not exist.
    Missing,
    /// The header was not valid.
    BadHeader(Corruption),
    /// The file held fewer entries than the store has records. Normal for the
    /// active segment after a crash: its index trails the store.
    Short {
        /// Entries found.
        found: u64,
        /// Records in the store.
        expected: u64,
    },
    /// The file held more entries than the store has records.
    Long {
        /// Entries found.
        found: u64,
        /// Records in the store.
        expected: u64,
    },
    /// An entry pointed elsewhere than its record (zero-filled, stale or damaged).
    Disagrees {
        /// The first entry that was wrong.
        slot: u64,
    },
    /// The file's length was not a whole number of entries.
    Ragged {
        /// The file's length in bytes.
        len: u64,
    },
}

/// The segments found in a directory, oldest first, with the active one last.
pub(crate) struct Opened {
    pub(crate) sealed: Vec<Arc<Segment>>,
    pub(crate) active: ActiveParts,
    pub(crate) report: RecoveryReport,
}

/// What the writer needs to continue the active segment.
pub(crate) struct ActiveParts {
    pub(crate) base: Offset,
    pub(crate) files: SegmentFiles,
    pub(crate) tail: Tail,
    /// Length of the store file, which may run past the last record into space the
    /// writer preallocated.
    pub(crate) allocated: u64,
}

/// How recovery treats damage that is not a crash shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Refuse to open: [`LogError::Corrupt`] names the file and position.
    Refuse,
    /// Cut the log at the first damage: the records from there on are dropped.
    Repair,
}

/// Finds, checks and repairs the segments in `dir`.
pub(crate) fn open_dir(dir: &Path, mode: Mode) -> Result<Opened> {
    let mut report = RecoveryReport::default();
    let mut found: BTreeMap<Offset, (bool, bool)> = BTreeMap::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let Some((base, is_store)) = name.to_str().and_then(segment::parse_file_name) else {
            continue;
        };
        let slot = found.entry(base).or_default();
        if is_store {
            slot.0 = true;
        } else {
            slot.1 = true;
        }
    }

    // An index whose store is gone belongs to a segment that was being dropped.
    for (&base, &(has_store, has_index)) in &found {
        if !has_store && has_index {
            let path = dir.join(segment::file_names(base).1);
            fs::remove_file(&path).at(&path)?;
            tracing::warn!(path = %path.display(), "removed index file with no store file");
            report.removed_files.push(path);
        }
    }
    let bases: Vec<Offset> = found
        .iter()
        .filter(|(_, (has_store, _))| *has_store)
        .map(|(&base, _)| base)
        .collect();
    if !report.removed_files.is_empty() {
        sync_dir(dir)?;
    }

    let Some((&active_base, sealed_bases)) = bases.split_last() else {
        let files = create_segment(dir, 0)?;
        report.segments = 1;
        return Ok(Opened {
            sealed: Vec::new(),
            active: ActiveParts {
                base: 0,
                files,
                tail: empty_tail(),
                allocated: HEADER_LEN,
            },
            report,
        });
    };

    let mut sealed = Vec::with_capacity(sealed_bases.len());
    let mut active_base = active_base;
    for (i, &base) in sealed_bases.iter().enumerate() {
        let next_base = bases[i + 1];
        match open_sealed(dir, base, next_base - base, mode, &mut report)? {
            Some(segment) => sealed.push(Arc::new(segment)),
            None => {
                // A crash cut this segment before the sealer made it durable, so the
                // log ends in it: drop what came after (newest first) and continue it.
                for &later in bases[i + 1..].iter().rev() {
                    let (store_name, index_name) = segment::file_names(later);
                    for path in [dir.join(store_name), dir.join(index_name)] {
                        if path.exists() {
                            fs::remove_file(&path).at(&path)?;
                            report.removed_files.push(path);
                        }
                    }
                }
                sync_dir(dir)?;
                tracing::warn!(
                    base,
                    dropped_segments = bases.len() - i - 1,
                    "a sealed segment was torn before it was durable; the log ends in it"
                );
                active_base = base;
                break;
            }
        }
    }
    let active = open_active(dir, active_base, mode, &mut report)?;
    report.segments = sealed.len() + 1;
    Ok(Opened {
        sealed,
        active,
        report,
    })
}

fn empty_tail() -> Tail {
    Tail {
        positions: Vec::new(),
        store_len: HEADER_LEN,
        last_timestamp_ms: 0,
    }
}

fn open_files(dir: &Path, base: Offset) -> Result<(SegmentFiles, bool)> {
    let (store_name, index_name) = segment::file_names(base);
    let store_path = dir.join(store_name);
    let index_path = dir.join(index_name);
    let store = open_rw(&store_path, false)?;
    let index_existed = index_path.exists();
    let index = open_rw(&index_path, true)?;
    Ok((
        SegmentFiles {
            store: Arc::new(store),
            index: Arc::new(index),
            store_path,
            index_path,
        },
        index_existed,
    ))
}

fn check_store_header(files: &SegmentFiles, base: Offset, store_len: u64) -> Result<()> {
    if store_len > u64::from(u32::MAX) {
        // Positions are u32; no segment this crate writes is this large.
        return Err(LogError::Corrupt {
            path: files.store_path.clone(),
            position: u64::from(u32::MAX),
            reason: Corruption::LengthLimit { len: store_len },
        });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let len = store_len.min(HEADER_LEN) as usize;
    files
        .store
        .read_exact_at(&mut header[..len], 0)
        .at(&files.store_path)?;
    format::check_header(&header[..len], STORE_MAGIC, base).map_err(|reason| LogError::Corrupt {
        path: files.store_path.clone(),
        position: 0,
        reason,
    })
}

/// Opens a sealed segment. `Ok(None)` means it is torn and was never flagged
/// durable: a crash shape, so the log must end in it.
fn open_sealed(
    dir: &Path,
    base: Offset,
    count: u64,
    mode: Mode,
    report: &mut RecoveryReport,
) -> Result<Option<Segment>> {
    let (files, index_existed) = open_files(dir, base)?;
    let store_len = len_of(&files.store, &files.store_path)?;
    check_store_header(&files, base, store_len)?;
    let durable = index_existed && index_is_durable(&files, base)?;

    if durable && let Some(last_timestamp_ms) = quick_check_sealed(&files, base, count, store_len)?
    {
        return Ok(Some(Segment::sealed(
            base,
            files,
            count,
            store_len,
            last_timestamp_ms,
        )));
    }

    // Either the sealer never finished this segment, or the quick check failed: read
    // the whole store to tell a torn tail, a damaged store and a damaged index apart.
    let scan = scan_store(
        &files.store,
        &files.store_path,
        base,
        store_len,
        Some(count),
    )?;
    let found = scan.positions.len() as u64;
    let mut store_len = store_len;
    if !durable
        && found == count
        && scan.valid_end < store_len
        && is_zero_filled(&files.store, &files.store_path, scan.valid_end, store_len)?
    {
        // Sealed by a roll whose trim of the preallocated space had not reached the
        // disk: every record is there; finish the trim before the seal below.
        files.store.set_len(scan.valid_end).at(&files.store_path)?;
        store_len = scan.valid_end;
    }
    let complete = scan.stop.is_none() && found == count && scan.valid_end == store_len;
    if !complete {
        if mode == Mode::Repair {
            return Ok(None);
        }
        if !durable {
            if index_existed && index_is_vouched(&files, base)? {
                check_unvouched(&files, &scan)?;
            }
            return Ok(None);
        }
    }
    if let Some(reason) = scan.stop {
        return Err(LogError::Corrupt {
            path: files.store_path.clone(),
            position: scan.valid_end,
            reason,
        });
    }
    if found < count {
        return Err(LogError::Corrupt {
            path: files.store_path.clone(),
            position: scan.valid_end,
            reason: Corruption::MissingRecords {
                expected: count,
                found,
            },
        });
    }
    if scan.valid_end != store_len {
        return Err(LogError::Corrupt {
            path: files.store_path.clone(),
            position: scan.valid_end,
            reason: Corruption::TrailingBytes {
                len: store_len - scan.valid_end,
            },
        });
    }
    let problem = if index_existed {
        diagnose_index(&files, base, &scan.positions)?
    } else {
        Some(IndexProblem::Missing)
    };
    if let Some(problem) = &problem {
        rewrite_index(&files, base, &scan.positions)?;
        tracing::warn!(path = %files.index_path.display(), ?problem, "rebuilt index of sealed segment");
    }
    if problem.is_some() || !durable {
        // Finish the seal that a crash interrupted (or that the rewrite undid).
        sealer::seal_now(&files)?;
    }
    if let Some(problem) = problem {
        report.rebuilt_indexes.push(IndexRebuild {
            path: files.index_path.clone(),
            problem,
        });
    }
    Ok(Some(Segment::sealed(
        base,
        files,
        count,
        store_len,
        scan.last_timestamp_ms,
    )))
}

/// Whether the index says each of its entries was written after its record was
/// synced (the `always` policy).
fn index_is_vouched(files: &SegmentFiles, base: Offset) -> Result<bool> {
    Ok(index_header(files, base)?.is_some_and(|header| format::is_vouched(&header)))
}

fn index_is_durable(files: &SegmentFiles, base: Offset) -> Result<bool> {
    Ok(index_header(files, base)?.is_some_and(|header| format::is_durable(&header)))
}

/// The header of an index file; `None` when it is not valid.
fn index_header(files: &SegmentFiles, base: Offset) -> Result<Option<[u8; HEADER_LEN as usize]>> {
    let mut header = [0u8; HEADER_LEN as usize];
    let len = len_of(&files.index, &files.index_path)?.min(HEADER_LEN) as usize;
    files
        .index
        .read_exact_at(&mut header[..len], 0)
        .at(&files.index_path)?;
    Ok(format::check_header(&header[..len], INDEX_MAGIC, base)
        .is_ok()
        .then_some(header))
}

/// Checks a sealed segment in constant time: index length, first and last entry,
/// and that the last frame is valid and ends the store. Returns the last record's
/// timestamp, or `None` when anything is off.
fn quick_check_sealed(
    files: &SegmentFiles,
    base: Offset,
    count: u64,
    store_len: u64,
) -> Result<Option<u64>> {
    let index_len = len_of(&files.index, &files.index_path)?;
    if index_len != format::index_entry_position(count) {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    files
        .index
        .read_exact_at(&mut header, 0)
        .at(&files.index_path)?;
    if format::check_header(&header, INDEX_MAGIC, base).is_err() {
        return Ok(None);
    }
    let mut entry = [0u8; format::INDEX_ENTRY_LEN as usize];
    files
        .index
        .read_exact_at(&mut entry, format::index_entry_position(0))
        .at(&files.index_path)?;
    if format::decode_index_entry(&entry) != (0, HEADER_LEN as u32) {
        return Ok(None);
    }
    files
        .index
        .read_exact_at(&mut entry, format::index_entry_position(count - 1))
        .at(&files.index_path)?;
    let (relative, position) = format::decode_index_entry(&entry);
    let position = u64::from(position);
    if u64::from(relative) != count - 1 || position < HEADER_LEN || position >= store_len {
        return Ok(None);
    }
    let mut frame = vec![0u8; (store_len - position) as usize];
    files
        .store
        .read_exact_at(&mut frame, position)
        .at(&files.store_path)?;
    match format::decode_frame(&frame, base + count - 1) {
        Ok(decoded) if decoded.len() == frame.len() as u64 => Ok(Some(decoded.timestamp_ms)),
        _ => Ok(None),
    }
}

fn open_active(
    dir: &Path,
    base: Offset,
    mode: Mode,
    report: &mut RecoveryReport,
) -> Result<ActiveParts> {
    let (files, index_existed) = open_files(dir, base)?;
    let mut store_len = len_of(&files.store, &files.store_path)?;
    if store_len < HEADER_LEN {
        // A segment created just before a crash, its header not yet on disk.
        files.store.set_len(0).at(&files.store_path)?;
        files
            .store
            .write_all_at(&format::encode_header(STORE_MAGIC, base), 0)
            .at(&files.store_path)?;
        files.store.sync_data().at(&files.store_path)?;
        report.truncations.push(Truncation {
            path: files.store_path.clone(),
            position: 0,
            bytes_cut: store_len,
            next_offset: base,
            reason: Corruption::ShortHeader { len: HEADER_LEN },
        });
        store_len = HEADER_LEN;
    }
    check_store_header(&files, base, store_len)?;

    // No record limit: a lowered `segment_max_records` must never cut data; the
    // writer rolls on its next append instead.
    let scan = scan_store(&files.store, &files.store_path, base, store_len, None)?;
    if mode == Mode::Refuse && index_existed && index_is_vouched(&files, base)? {
        check_unvouched(&files, &scan)?;
    }
    let next_offset = base + scan.positions.len() as u64;
    let mut allocated = store_len;
    let preallocated = scan.valid_end < store_len
        && is_zero_filled(&files.store, &files.store_path, scan.valid_end, store_len)?;
    if scan.valid_end < store_len && !preallocated {
        allocated = scan.valid_end;
        let reason = scan.stop.clone().unwrap_or(Corruption::TrailingBytes {
            len: store_len - scan.valid_end,
        });
        files.store.set_len(scan.valid_end).at(&files.store_path)?;
        files.store.sync_data().at(&files.store_path)?;
        tracing::warn!(
            path = %files.store_path.display(),
            position = scan.valid_end,
            bytes_cut = store_len - scan.valid_end,
            next_offset,
            %reason,
            "cut the torn tail of the active segment"
        );
        report.truncations.push(Truncation {
            path: files.store_path.clone(),
            position: scan.valid_end,
            bytes_cut: store_len - scan.valid_end,
            next_offset,
            reason,
        });
    }

    let problem = if index_existed {
        diagnose_index(&files, base, &scan.positions)?
    } else {
        Some(IndexProblem::Missing)
    };
    if let Some(problem) = problem {
        // The rewritten entries vouch for every record found, which a crash may have
        // left in the page cache only: sync them first.
        files.store.sync_data().at(&files.store_path)?;
        rewrite_index(&files, base, &scan.positions)?;
        if matches!(problem, IndexProblem::Short { .. }) {
            tracing::debug!(path = %files.index_path.display(), ?problem, "completed trailing index");
        } else {
            tracing::warn!(path = %files.index_path.display(), ?problem, "rebuilt index of active segment");
        }
        report.rebuilt_indexes.push(IndexRebuild {
            path: files.index_path.clone(),
            problem,
        });
    }
    Ok(ActiveParts {
        base,
        files,
        tail: Tail {
            positions: scan.positions,
            store_len: scan.valid_end,
            last_timestamp_ms: scan.last_timestamp_ms,
        },
        allocated,
    })
}

/// Fails with [`LogError::Corrupt`] when the index lists a record the scan did not
/// find: the writer wrote that entry after the record was synced, so the damage that
/// stopped the scan cannot be a torn write.
fn check_unvouched(files: &SegmentFiles, scan: &Scan) -> Result<()> {
    let found = scan.positions.len() as u64;
    let listed = listed_records(files)?;
    if listed <= found {
        return Ok(());
    }
    tracing::error!(
        path = %files.store_path.display(),
        position = scan.valid_end,
        listed,
        found,
        "records the index lists as synced are damaged or missing"
    );
    Err(LogError::Corrupt {
        path: files.store_path.clone(),
        position: scan.valid_end,
        reason: scan.stop.clone().unwrap_or(Corruption::MissingRecords {
            expected: listed,
            found,
        }),
    })
}

/// How many leading entries of an index file are well formed: entry `i` holds
/// relative offset `i` and a position in the store after the previous one. A store
/// that is shorter than the positions says records are missing, so the store's
/// length is not part of the check.
fn listed_records(files: &SegmentFiles) -> Result<u64> {
    let len = len_of(&files.index, &files.index_path)?;
    if len <= HEADER_LEN {
        return Ok(0);
    }
    let mut body = vec![0u8; (len - HEADER_LEN) as usize];
    files
        .index
        .read_exact_at(&mut body, HEADER_LEN)
        .at(&files.index_path)?;
    let mut previous = 0u64;
    let mut listed = 0u64;
    for entry in body.chunks_exact(format::INDEX_ENTRY_LEN as usize) {
        let (relative, position) = format::decode_index_entry(entry);
        let position = u64::from(position);
        if u64::from(relative) != listed || position < HEADER_LEN.max(previous + 1) {
            break;
        }
        previous = position;
        listed += 1;
    }
    Ok(listed)
}

/// Compares an index file with the positions a scan found; `None` when it matches.
fn diagnose_index(
    files: &SegmentFiles,
    base: Offset,
    positions: &[u32],
) -> Result<Option<IndexProblem>> {
    let expected = positions.len() as u64;
    let len = len_of(&files.index, &files.index_path)?;
    if len < HEADER_LEN {
        return Ok(Some(IndexProblem::BadHeader(Corruption::ShortHeader {
            len: HEADER_LEN,
        })));
    }
    let mut bytes = vec![0u8; len as usize];
    files
        .index
        .read_exact_at(&mut bytes, 0)
        .at(&files.index_path)?;
    if let Err(reason) = format::check_header(&bytes, INDEX_MAGIC, base) {
        return Ok(Some(IndexProblem::BadHeader(reason)));
    }
    let body = &bytes[HEADER_LEN as usize..];
    let entry_len = format::INDEX_ENTRY_LEN as usize;
    let entries = body.chunks_exact(entry_len);
    for (slot, entry) in entries.enumerate() {
        let Some(&position) = positions.get(slot) else {
            break;
        };
        if format::decode_index_entry(entry) != (slot as u32, position) {
            return Ok(Some(IndexProblem::Disagrees { slot: slot as u64 }));
        }
    }
    if !body.len().is_multiple_of(entry_len) {
        return Ok(Some(IndexProblem::Ragged { len }));
    }
    let found = (body.len() / entry_len) as u64;
    Ok(match found.cmp(&expected) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(IndexProblem::Short { found, expected }),
        std::cmp::Ordering::Greater => Some(IndexProblem::Long { found, expected }),
    })
}

/// Replaces an index file's content with a header and one entry per position.
pub(crate) fn rewrite_index(files: &SegmentFiles, base: Offset, positions: &[u32]) -> Result<()> {
    let mut bytes =
        Vec::with_capacity(format::index_entry_position(positions.len() as u64) as usize);
    bytes.extend_from_slice(&format::encode_header(INDEX_MAGIC, base));
    for (slot, &position) in positions.iter().enumerate() {
        format::encode_index_entry(&mut bytes, slot as u32, position);
    }
    files.index.set_len(0).at(&files.index_path)?;
    files.index.write_all_at(&bytes, 0).at(&files.index_path)
}
