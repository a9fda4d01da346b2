//! Crash shapes: a pristine log is damaged the way a crash (or bit rot) would,
//! then reopened. Damage in the unsynced tail must yield exactly the longest valid
//! prefix and never lose a synced record; damage inside sealed data must be a
//! `Corrupt` error naming the file and position.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use keel_commitlog::{Corruption, IndexProblem, Log, LogConfig, LogError, SyncPolicy};

use crate::support::{assert_holds, value};

/// 25 records per segment: segment 0 holds 0..25 (sealed), segment 25 holds 25..40.
const PER_SEGMENT: u64 = 25;
const TOTAL: u64 = 40;
/// Records 0..SYNCED were appended under `SyncPolicy::Always`.
const SYNCED: u64 = 30;
const ACTIVE_BASE: u64 = 25;

fn config(sync: SyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        segment_max_records: PER_SEGMENT,
        sync,
        ..LogConfig::default()
    }
}

/// Where each record of the active segment ends in its store file.
fn active_frame_ends() -> Vec<u64> {
    let mut end = 16;
    (ACTIVE_BASE..TOTAL)
        .map(|offset| {
            end += 24 + value(offset).len() as u64;
            end
        })
        .collect()
}

fn frame_start(offset: u64) -> u64 {
    if offset == ACTIVE_BASE {
        16
    } else {
        active_frame_ends()[(offset - ACTIVE_BASE - 1) as usize]
    }
}

/// Records 0..30 appended with `Always`, then 30..40 as one batch with `Never`, and
/// a kill: the last batch's index entries never reach the index file.
fn pristine() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    for offset in 0..SYNCED {
        log.append(&value(offset)).expect("append");
    }
    log.close().expect("close");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("reopen");
    let batch: Vec<Vec<u8>> = (SYNCED..TOTAL).map(value).collect();
    log.append_batch(&batch).expect("unsynced batch");
    log.kill();
    dir
}

fn copy_of(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().expect("temp dir");
    for entry in fs::read_dir(src).expect("read dir") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), dst.path().join(entry.file_name())).expect("copy");
    }
    dst
}

fn store(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn index(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.index"))
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len)
        .expect("set_len");
}

fn edit(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = fs::read(path).expect("read");
    change(&mut bytes);
    fs::write(path, bytes).expect("write");
}

/// Reopens `dir`, checks it holds exactly `expected` records, that appends continue
/// at `expected`, and that a second reopen is clean.
fn reopen_expecting(dir: &Path, expected: u64, what: &str) -> keel_commitlog::RecoveryReport {
    let mut log = Log::open(dir, config(SyncPolicy::Always))
        .unwrap_or_else(|err| panic!("{what}: open failed: {err}"));
    let report = log.recovery().clone();
    assert!(
        log.next_offset() >= SYNCED,
        "{what}: lost synced records, next is {}",
        log.next_offset()
    );
    assert_eq!(log.next_offset(), expected, "{what}: longest valid prefix");
    assert_holds(&log, expected);
    assert_eq!(
        log.append(&value(expected)).expect("append after recovery"),
        expected,
        "{what}"
    );
    log.close().expect("close");
    let log = Log::open(dir, config(SyncPolicy::Always)).expect("second reopen");
    assert!(
        log.recovery().is_clean(),
        "{what}: second reopen must be clean: {:?}",
        log.recovery()
    );
    assert_holds(&log, expected + 1);
    report
}

#[test]
fn given_pristine_crashed_log_when_reopened_should_hold_every_record() {
    let dir = pristine();
    let report = reopen_expecting(dir.path(), TOTAL, "pristine");
    assert!(report.truncations.is_empty());
    assert!(
        matches!(report.rebuilt_indexes[..], [ref rebuilt] if matches!(rebuilt.problem, IndexProblem::Short { found: 5, expected: 15 })),
        "the killed batch's index entries are rebuilt: {report:?}"
    );
}

#[test]
fn given_store_cut_at_every_byte_of_the_unsynced_batch_should_keep_the_longest_valid_prefix() {
    let pristine = pristine();
    let ends = active_frame_ends();
    let synced_end = frame_start(SYNCED);
    let store_len = *ends.last().expect("records");
    let written = fs::read(store(pristine.path(), ACTIVE_BASE)).expect("store");
    for cut in synced_end..=store_len {
        let dir = copy_of(pristine.path());
        set_len(&store(dir.path(), ACTIVE_BASE), cut);
        let complete = ends.iter().filter(|&&end| end <= cut).count() as u64;
        let expected = ACTIVE_BASE + complete;
        let report = reopen_expecting(dir.path(), expected, &format!("cut at {cut}"));
        let boundary = if complete == 0 {
            16
        } else {
            ends[complete as usize - 1]
        };
        // The first bytes of a frame are its CRC, which depends on the record's
        // timestamp: when the few bytes left of a cut frame happen to be zeros, they
        // look exactly like preallocated space, and are kept as such (nothing is lost
        // either way). Anything else left of a frame is cut and reported.
        let left_of_frame = &written[boundary as usize..cut as usize];
        if cut == boundary || left_of_frame.iter().all(|&byte| byte == 0) {
            assert!(
                report.truncations.is_empty(),
                "cut at {cut}: a record boundary, or zeros after it, needs no truncation"
            );
        } else {
            let truncation = &report.truncations[0];
            assert_eq!(truncation.position, boundary, "cut at {cut}");
            assert_eq!(truncation.bytes_cut, cut - boundary);
            assert_eq!(truncation.next_offset, expected);
        }
    }
}

#[test]
fn given_bit_flip_anywhere_in_the_unsynced_tail_should_cut_from_the_damaged_record() {
    let pristine = pristine();
    let ends = active_frame_ends();
    let store_len = *ends.last().expect("records");
    for byte in frame_start(SYNCED)..store_len {
        let dir = copy_of(pristine.path());
        edit(&store(dir.path(), ACTIVE_BASE), |bytes| {
            bytes[byte as usize] ^= 1 << (byte % 8)
        });
        let damaged = ACTIVE_BASE + ends.iter().filter(|&&end| end <= byte).count() as u64;
        let report = reopen_expecting(dir.path(), damaged, &format!("flip in byte {byte}"));
        assert_eq!(report.truncations.len(), 1);
        assert_eq!(report.truncations[0].position, frame_start(damaged));
    }
}

#[test]
fn given_zero_filled_store_tail_should_take_it_for_preallocated_space() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), ACTIVE_BASE);
    let end = *active_frame_ends().last().expect("records");
    set_len(&path, end);
    edit(&path, |bytes| bytes.extend_from_slice(&[0u8; 4096]));
    let report = reopen_expecting(dir.path(), TOTAL, "zero-filled tail");
    assert!(
        report.truncations.is_empty(),
        "zeros after the last frame are space, not damage: {report:?}"
    );
}

#[test]
fn given_torn_frame_followed_by_zeros_should_cut_from_the_torn_frame() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), ACTIVE_BASE);
    let torn = TOTAL - 1;
    let start = frame_start(torn);
    edit(&path, |bytes| {
        // The last frame's first page reached the disk; its end did not.
        bytes.truncate(start as usize + 30);
        bytes.extend_from_slice(&[0u8; 4096]);
    });
    let report = reopen_expecting(dir.path(), torn, "torn frame, then zeros");
    let truncation = &report.truncations[0];
    assert_eq!(truncation.position, start);
    assert_eq!(truncation.bytes_cut, 30 + 4096);
    assert_eq!(truncation.next_offset, torn);
}

#[test]
fn given_zeros_inside_the_tail_with_a_frame_after_them_should_cut_from_the_zeros() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), ACTIVE_BASE);
    let hole = TOTAL - 3;
    let (start, end) = (frame_start(hole), frame_start(hole + 1));
    // A page of the unsynced batch never reached the disk; a later one did.
    edit(&path, |bytes| {
        bytes[start as usize..end as usize]
            .iter_mut()
            .for_each(|b| *b = 0);
    });
    let report = reopen_expecting(dir.path(), hole, "zeros, then a frame");
    assert_eq!(report.truncations[0].position, start);
}

#[test]
fn given_crash_between_store_write_and_index_write_should_rebuild_index_entries() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    log.append(&value(0)).expect("append");
    log.kill();
    assert_eq!(
        fs::metadata(index(dir.path(), 0)).expect("index").len(),
        16,
        "entry still pending"
    );
    let log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("reopen");
    assert_holds(&log, 1);
    assert_eq!(
        fs::metadata(index(dir.path(), 0)).expect("index").len(),
        24,
        "entry rebuilt"
    );
}

/// Every shape of index damage, applied to the active and to the sealed segment.
#[test]
fn given_damaged_index_of_either_segment_should_rebuild_it_and_lose_nothing() {
    let pristine = pristine();
    let reference = copy_of(pristine.path());
    drop(Log::open(reference.path(), config(SyncPolicy::Always)).expect("complete the index"));

    type Damage = fn(&Path);
    let shapes: [(&str, Damage); 5] = [
        ("deleted", |p| fs::remove_file(p).expect("remove")),
        ("emptied", |p| set_len(p, 0)),
        ("ragged", |p| {
            let len = fs::metadata(p).expect("meta").len();
            set_len(p, len - 3);
        }),
        ("zero-filled", |p| {
            edit(p, |b| b.iter_mut().for_each(|x| *x = 0))
        }),
        ("zero-filled entries", |p| {
            edit(p, |b| b[16..].iter_mut().for_each(|x| *x = 0))
        }),
    ];
    for base in [0, ACTIVE_BASE] {
        for (name, damage) in &shapes {
            let dir = copy_of(reference.path());
            damage(&index(dir.path(), base));
            let what = format!("{name} index of segment {base}");
            let report = reopen_expecting(dir.path(), TOTAL, &what);
            assert!(!report.rebuilt_indexes.is_empty(), "{what}: {report:?}");
            assert_eq!(
                fs::read(index(dir.path(), 0)).expect("index"),
                fs::read(index(reference.path(), 0)).expect("reference index"),
                "{what}: sealed index rebuilt byte for byte"
            );
        }
    }
    // An entry that points elsewhere: in the active segment recovery compares every
    // entry; in a sealed one (synced long ago, not rescanned on open) reads notice.
    let dir = copy_of(reference.path());
    edit(&index(dir.path(), ACTIVE_BASE), |b| {
        b[16 + 3 * 8 + 4] ^= 0x10
    });
    let report = reopen_expecting(dir.path(), TOTAL, "active entry points elsewhere");
    assert!(matches!(
        report.rebuilt_indexes[0].problem,
        IndexProblem::Disagrees { slot: 3 }
    ));

    // Longer than the store: stale entries past the end.
    let dir = copy_of(reference.path());
    edit(&index(dir.path(), ACTIVE_BASE), |b| {
        b.extend_from_slice(&[1, 0, 0, 0, 99, 0, 0, 0])
    });
    let report = reopen_expecting(dir.path(), TOTAL, "long active index");
    assert!(matches!(
        report.rebuilt_indexes[0].problem,
        IndexProblem::Long {
            found: 16,
            expected: 15
        }
    ));
}

#[test]
fn given_torn_header_of_a_fresh_active_segment_should_reinitialise_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    for offset in 0..PER_SEGMENT {
        log.append(&value(offset)).expect("append");
    }
    log.kill();
    // Records 0..25 fill segment 0; a crash while creating segment 25.
    fs::write(store(dir.path(), PER_SEGMENT), b"KLS").expect("torn header");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("reopen");
    assert_eq!(
        log.recovery().truncations[0].reason,
        Corruption::ShortHeader { len: 16 }
    );
    assert_holds(&log, PER_SEGMENT);
    assert_eq!(
        log.append(&value(PER_SEGMENT)).expect("append"),
        PER_SEGMENT
    );
}

#[test]
fn given_index_without_store_should_remove_it() {
    let dir = copy_of(pristine().path());
    let stray = index(dir.path(), 1000);
    fs::write(&stray, b"leftover of a dropped segment").expect("write");
    let log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    assert_eq!(log.recovery().removed_files, vec![stray.clone()]);
    assert!(!stray.exists());
    assert_holds(&log, TOTAL);
}

#[test]
fn given_bit_flip_inside_a_sealed_segment_read_should_be_corrupt_naming_file_and_position() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), 0);
    // Record 10 of segment 0: flip a byte of its value.
    let start: u64 = 16 + (0..10).map(|o| 24 + value(o).len() as u64).sum::<u64>();
    edit(&path, |bytes| bytes[start as usize + 30] ^= 0xff);
    let log = Log::open(dir.path(), config(SyncPolicy::Always))
        .expect("a cheap open does not scan sealed data");
    match log.read(10) {
        Err(LogError::Corrupt {
            path: p,
            position,
            reason: Corruption::Checksum { .. },
        }) => {
            assert_eq!((p, position), (path.clone(), start));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    match log.read_chunk(5, 1 << 20) {
        Err(LogError::Corrupt {
            path: p, position, ..
        }) => assert_eq!((p, position), (path, start)),
        other => panic!("expected Corrupt from a chunk read, got {other:?}"),
    }
    assert_eq!(log.read(9).expect("neighbours are fine").value, value(9));
}

#[test]
fn given_damaged_last_record_of_a_sealed_segment_open_should_fail_corrupt() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), 0);
    let len = fs::metadata(&path).expect("meta").len();
    edit(&path, |bytes| bytes[len as usize - 2] ^= 0x01);
    match Log::open(dir.path(), config(SyncPolicy::Always)) {
        Err(LogError::Corrupt {
            path: p,
            reason: Corruption::Checksum { .. },
            position,
        }) => {
            assert_eq!(p, path);
            let last_start: u64 = 16 + (0..24).map(|o| 24 + value(o).len() as u64).sum::<u64>();
            assert_eq!(position, last_start);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn given_sealed_segment_missing_records_open_should_fail_corrupt() {
    let dir = copy_of(pristine().path());
    let path = store(dir.path(), 0);
    let len = fs::metadata(&path).expect("meta").len();
    set_len(&path, len - (24 + value(24).len() as u64));
    match Log::open(dir.path(), config(SyncPolicy::Always)) {
        Err(LogError::Corrupt {
            path: p,
            reason:
                Corruption::MissingRecords {
                    expected: 25,
                    found: 24,
                },
            ..
        }) => {
            assert_eq!(p, path);
        }
        other => panic!("expected Corrupt MissingRecords, got {other:?}"),
    }
}

#[test]
fn given_deleted_middle_segment_open_should_fail_rather_than_skip_offsets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = crate::support::filled(
        dir.path(),
        LogConfig {
            segment_max_records: 10,
            ..config(SyncPolicy::Never)
        },
        35,
        1,
    );
    log.close().expect("close");
    fs::remove_file(store(dir.path(), 10)).expect("remove");
    fs::remove_file(index(dir.path(), 10)).expect("remove");
    match Log::open(dir.path(), config(SyncPolicy::Never)) {
        Err(
            err @ LogError::Corrupt {
                reason:
                    Corruption::MissingRecords {
                        expected: 20,
                        found: 10,
                    },
                ..
            },
        ) => {
            assert!(
                err.to_string().contains("00000000000000000000.log"),
                "{err}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn given_store_header_of_another_format_should_fail_with_the_version() {
    let dir = copy_of(pristine().path());
    edit(&store(dir.path(), 0), |bytes| bytes[4] = 9);
    match Log::open(dir.path(), config(SyncPolicy::Always)) {
        Err(LogError::Corrupt {
            reason:
                Corruption::UnsupportedVersion {
                    found: 9,
                    supported: 1,
                },
            position: 0,
            ..
        }) => {}
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn given_sealed_index_entries_pointing_elsewhere_reads_should_still_return_the_right_records() {
    let dir = copy_of(pristine().path());
    // Entry 3 points 16 bytes later; entry 7 points at the header; entry 9 is zeroed.
    edit(&index(dir.path(), 0), |b| {
        b[16 + 3 * 8 + 4] ^= 0x10;
        b[16 + 7 * 8 + 4..16 + 7 * 8 + 8].copy_from_slice(&3u32.to_le_bytes());
        b[16 + 9 * 8..16 + 10 * 8].iter_mut().for_each(|x| *x = 0);
    });
    let log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    assert_holds(&log, TOTAL);
    let chunk = log
        .read_chunk(2, 1 << 20)
        .expect("chunk across the damaged entries");
    assert_eq!(
        chunk.len() as u64,
        PER_SEGMENT - 2,
        "a chunk stops at the segment end"
    );
    for record in chunk {
        assert_eq!(record.value, value(record.offset));
    }
}

/// Byte 5 of an index header holds the flags; bit 0 says the segment is durable (bit
/// 1 that its entries vouch for their records).
fn durable_flag(dir: &Path, base: u64) -> u8 {
    fs::read(index(dir, base)).expect("index")[5] & 1
}

fn clear_durable_flag(dir: &Path, base: u64) {
    edit(&index(dir, base), |bytes| bytes[5] = 0);
}

/// Segments 0, 10, 20, 30 (active) of ten records each, written with `Never` and
/// killed; the kill drains the sealer, so the test clears a flag by hand to stand for
/// a crash that came before the seal.
fn unsealed_log() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        segment_max_records: 10,
        ..config(SyncPolicy::Never)
    };
    crate::support::filled(dir.path(), config, 35, 3).kill();
    dir
}

#[test]
fn given_clean_close_every_sealed_segment_should_be_flagged_durable() {
    let dir = unsealed_log();
    for base in [0, 10, 20] {
        assert_eq!(durable_flag(dir.path(), base), 1, "segment {base}");
    }
    assert_eq!(
        durable_flag(dir.path(), 30),
        0,
        "the active segment is not sealed"
    );
}

#[test]
fn given_complete_sealed_segment_not_yet_flagged_should_flag_it_on_open() {
    let dir = unsealed_log();
    clear_durable_flag(dir.path(), 20);
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_holds(&log, 35);
    assert_eq!(durable_flag(dir.path(), 20), 1);
}

#[test]
fn given_sealed_segment_not_yet_flagged_with_preallocated_zeros_should_trim_and_flag_it() {
    let dir = unsealed_log();
    let path = store(dir.path(), 20);
    let len = fs::metadata(&path).expect("store").len();
    // A crash before the roll's trim of the preallocated space reached the disk.
    clear_durable_flag(dir.path(), 20);
    set_len(&path, len + 8192);
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_holds(&log, 35);
    assert_eq!(fs::metadata(&path).expect("store").len(), len, "trimmed");
    assert_eq!(durable_flag(dir.path(), 20), 1);
}

#[test]
fn given_sealed_segment_torn_before_its_seal_should_end_the_log_in_it() {
    let pristine = unsealed_log();
    // Cut segment 10 inside record 14 at every byte of that record.
    let start: u64 = 16 + (10..14).map(|o| 24 + value(o).len() as u64).sum::<u64>();
    let len = 24 + value(14).len() as u64;
    for cut in start..start + len {
        let dir = copy_of(pristine.path());
        clear_durable_flag(dir.path(), 10);
        clear_durable_flag(dir.path(), 20);
        set_len(&store(dir.path(), 10), cut);
        // Neither the torn records nor their index entries reached the disk (the
        // writer writes an entry only after its record was synced).
        set_len(&index(dir.path(), 10), 16 + 8 * 4);
        let mut log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
        let report = log.recovery().clone();
        assert_eq!(log.next_offset(), 14, "cut at {cut}");
        assert_holds(&log, 14);
        assert_eq!(
            report.removed_files.len(),
            4,
            "segments 20 and 30 removed: {report:?}"
        );
        if cut > start {
            assert_eq!(report.truncations[0].position, start);
        }
        assert!(!store(dir.path(), 20).exists() && !store(dir.path(), 30).exists());
        assert_eq!(log.append(b"fourteen").expect("append"), 14);
        log.close().expect("close");
        let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("reopen");
        assert!(log.recovery().is_clean(), "{:?}", log.recovery());
        assert_eq!(&log.read(14).expect("read").value[..], b"fourteen");
    }
}

/// [`unsealed_log`] written under `always`, whose indexes vouch for their records.
fn vouched_unsealed_log() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        segment_max_records: 10,
        ..config(SyncPolicy::Always)
    };
    crate::support::filled(dir.path(), config, 35, 3).kill();
    dir
}

#[test]
fn given_bit_flip_in_a_listed_record_of_a_sealed_segment_not_yet_flagged_should_refuse_to_open() {
    let dir = vouched_unsealed_log();
    clear_durable_flag(dir.path(), 10);
    edit(&index(dir.path(), 10), |bytes| bytes[5] = 2); // vouched, not durable
    let start: u64 = 16 + (10..12).map(|o| 24 + value(o).len() as u64).sum::<u64>();
    edit(&store(dir.path(), 10), |bytes| {
        bytes[start as usize + 30] ^= 0x40
    });
    match Log::open(dir.path(), config(SyncPolicy::Always)) {
        Err(LogError::Corrupt { path, position, .. }) => {
            assert_eq!((path, position), (store(dir.path(), 10), start));
        }
        other => panic!("the index lists records 12..20 as synced: {other:?}"),
    }
    let log = Log::open_repairing(dir.path(), config(SyncPolicy::Always)).expect("repair");
    assert_eq!(log.next_offset(), 12, "the repair cuts at the damage");
    assert_holds(&log, 12);
    assert!(!store(dir.path(), 20).exists() && !store(dir.path(), 30).exists());
}

#[test]
fn given_bit_flip_in_a_sealed_segment_not_yet_flagged_written_without_always_should_cut_there() {
    let dir = unsealed_log();
    clear_durable_flag(dir.path(), 10);
    let start: u64 = 16 + (10..12).map(|o| 24 + value(o).len() as u64).sum::<u64>();
    edit(&store(dir.path(), 10), |bytes| {
        bytes[start as usize + 30] ^= 0x40
    });
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    assert_eq!(log.next_offset(), 12);
    assert_holds(&log, 12);
}

#[test]
fn given_truncate_suffix_into_a_sealed_segment_should_clear_its_durable_flag() {
    let dir = unsealed_log();
    let mut log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    log.truncate_suffix(15).expect("truncate");
    assert_eq!(
        durable_flag(dir.path(), 10),
        0,
        "segment 10 is active again"
    );
    log.append(b"fifteen").expect("append");
    log.kill();
    // A crash now must treat segment 10 as active: scanned and cut, never trusted.
    let path = store(dir.path(), 10);
    let end: u64 = 16 + (10..15).map(|o| 24 + value(o).len() as u64).sum::<u64>() + 24 + 7;
    set_len(&path, end - 2);
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("open");
    assert_eq!(log.next_offset(), 15);
    assert_holds(&log, 15);
}

/// Records 0..40 appended under `always` and closed cleanly: the active segment's
/// index vouches for 25..40.
fn vouched() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    for offset in 0..TOTAL {
        log.append(&value(offset)).expect("append");
    }
    log.close().expect("close");
    dir
}

/// A damaged byte anywhere in a record the index vouches for is bit rot, not a torn
/// write: the log refuses to open, rather than cut acknowledged records and hand
/// their offsets out again.
#[test]
fn given_bit_flip_in_any_record_the_index_lists_should_refuse_to_open_naming_file_and_position() {
    let pristine = vouched();
    let ends = active_frame_ends();
    for byte in frame_start(ACTIVE_BASE)..*ends.last().expect("records") {
        let dir = copy_of(pristine.path());
        let path = store(dir.path(), ACTIVE_BASE);
        edit(&path, |bytes| bytes[byte as usize] ^= 1 << (byte % 8));
        let damaged = ACTIVE_BASE + ends.iter().filter(|&&end| end <= byte).count() as u64;
        for attempt in ["first open", "second open"] {
            match Log::open(dir.path(), config(SyncPolicy::Always)) {
                Err(LogError::Corrupt {
                    path: p, position, ..
                }) => assert_eq!(
                    (p, position),
                    (path.clone(), frame_start(damaged)),
                    "{attempt}, flip in byte {byte}"
                ),
                other => panic!("{attempt}, flip in byte {byte}: expected Corrupt, got {other:?}"),
            }
        }
        let log = Log::open_repairing(dir.path(), config(SyncPolicy::Always)).expect("repair");
        assert_eq!(log.next_offset(), damaged, "the repair cuts at the damage");
        assert_eq!(log.recovery().truncations.len(), 1);
        assert_holds(&log, damaged);
    }
}

#[test]
fn given_store_cut_before_records_the_index_lists_should_refuse_to_open() {
    let dir = copy_of(vouched().path());
    let path = store(dir.path(), ACTIVE_BASE);
    set_len(&path, frame_start(28));
    match Log::open(dir.path(), config(SyncPolicy::Always)) {
        Err(LogError::Corrupt {
            path: p,
            position,
            reason: Corruption::MissingRecords { expected, found },
        }) => {
            assert_eq!((p, position), (path, frame_start(28)));
            assert_eq!((expected, found), (15, 3), "records of the active segment");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Only a writer under `always` writes each index entry after its record's sync;
/// under another policy the index is not marked to vouch, and recovery cuts damage
/// in it as a crash may leave it.
#[test]
fn an_index_should_vouch_for_its_records_only_under_the_always_policy() {
    let flags = |dir: &Path| fs::read(index(dir, 0)).expect("index")[5];
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("open");
    log.append(b"one").expect("append");
    assert_eq!(flags(dir.path()) & 2, 2, "vouched under always");
    drop(log);
    let log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("reopen");
    assert_eq!(flags(dir.path()) & 2, 0, "not under never");
    drop(log);
    let _log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("reopen");
    assert_eq!(flags(dir.path()) & 2, 2, "vouched again once synced");
}

fn synced_log(sync: SyncPolicy) -> (tempfile::TempDir, Log, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(
        dir.path(),
        LogConfig {
            preallocate_bytes: 0,
            ..config(sync)
        },
    )
    .expect("open");
    for offset in 0..10 {
        log.append(&value(offset)).expect("append");
    }
    log.sync().expect("sync");
    let len = fs::metadata(store(dir.path(), 0)).expect("store").len();
    (dir, log, len)
}

/// fsyncgate: after a failed fsync the kernel may have dropped the unsynced pages, so
/// the log must not serve them, nor leave them in the file for the next open.
#[test]
fn a_failed_fsync_should_cut_the_unsynced_records_and_refuse_writes() {
    let (dir, mut log, synced_len) = synced_log(SyncPolicy::Never);
    for offset in 10..15 {
        log.append(&value(offset)).expect("append");
    }
    assert_eq!(
        log.read(12).expect("readable before the sync").value,
        value(12)
    );

    let faults = keel_commitlog::fail_syncs_under(dir.path());
    match log.sync() {
        Err(LogError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(5)),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert_eq!(log.next_offset(), 10, "the unsynced records are taken back");
    assert!(matches!(
        log.read(12),
        Err(LogError::OffsetOutOfRange { next: 10, .. })
    ));
    assert_eq!(log.read(9).expect("synced records stay").value, value(9));
    assert_eq!(
        fs::metadata(store(dir.path(), 0)).expect("store").len(),
        synced_len,
        "cut from the file too"
    );
    let reason = log.failure().expect("failed").to_owned();
    assert!(reason.contains("from offset 10 on"), "{reason}");
    assert!(matches!(log.append(b"more"), Err(LogError::Failed { .. })));
    drop(faults);
    drop(log);

    let mut log = Log::open(dir.path(), config(SyncPolicy::Never)).expect("reopen");
    assert_holds(&log, 10);
    assert_eq!(log.append(&value(10)).expect("append"), 10);
}

#[test]
fn a_failed_fsync_under_always_should_acknowledge_nothing_and_keep_the_file_at_its_synced_length() {
    let (dir, mut log, synced_len) = synced_log(SyncPolicy::Always);
    let faults = keel_commitlog::fail_syncs_under(dir.path());
    assert!(matches!(log.append(b"lost"), Err(LogError::Io { .. })));
    assert!(matches!(
        log.append(b"refused"),
        Err(LogError::Failed { .. })
    ));
    assert_eq!(log.next_offset(), 10);
    assert_eq!(
        fs::metadata(store(dir.path(), 0)).expect("store").len(),
        synced_len
    );
    drop(faults);
    drop(log);
    let log = Log::open(dir.path(), config(SyncPolicy::Always)).expect("reopen");
    assert_holds(&log, 10);
    assert!(
        log.recovery().truncations.is_empty(),
        "{:?}",
        log.recovery()
    );
}

/// A new log's directory entry, and those of any directory made for it, must be
/// durable before its first record is acknowledged.
#[test]
fn opening_a_new_log_should_sync_the_parent_of_every_directory_it_creates() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("a").join("b").join("log");
    let mut log = Log::open(&dir, config(SyncPolicy::Always)).expect("open");
    log.append(b"first").expect("append");
    let synced = keel_commitlog::synced_dirs_under(root.path());
    for parent in [
        root.path().to_path_buf(),
        root.path().join("a"),
        root.path().join("a").join("b"),
        dir.clone(),
    ] {
        assert!(
            synced.contains(&parent),
            "{} not synced: {synced:?}",
            parent.display()
        );
    }
}
