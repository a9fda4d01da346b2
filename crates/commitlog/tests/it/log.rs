//! Whole-log behaviour: rolls, reopen, readers, locking, retention, truncation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use keel_commitlog::{Log, LogConfig, LogError, Retention, SyncPolicy};

use crate::support::{assert_holds, filled, tiny, value};

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log") || n.ends_with(".index"))
        .collect();
    names.sort();
    names
}

#[test]
fn given_appends_across_many_rolls_when_reopened_should_read_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = filled(dir.path(), tiny(), 500, 7);
    assert!(
        log.segment_count() > 20,
        "tiny segments must roll: {}",
        log.segment_count()
    );
    assert_holds(&log, 500);
    log.close().expect("close");

    let mut log = Log::open(dir.path(), tiny()).expect("reopen");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_holds(&log, 500);
    assert_eq!(log.append(&value(500)).expect("append"), 500);
    assert_holds(&log, 501);
}

#[test]
fn given_rolled_log_segment_files_should_be_named_by_base_offset_and_indexed_fully() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = filled(dir.path(), tiny(), 100, 1);
    log.close().expect("close");
    let names = segment_files(dir.path());
    let stores: Vec<&String> = names.iter().filter(|n| n.ends_with(".log")).collect();
    assert_eq!(
        stores.len() * 2,
        names.len(),
        "every store has an index: {names:?}"
    );
    assert_eq!(stores[0], "00000000000000000000.log");

    let log = Log::open(dir.path(), tiny()).expect("reopen");
    for store in &stores {
        let base: u64 = store[..20].parse().expect("numeric name");
        let record = log
            .read(base)
            .expect("a segment's first record is its base offset");
        assert_eq!(record.value, value(base));
        let index = dir.path().join(format!("{base:020}.index"));
        let index_len = std::fs::metadata(&index).expect("index").len();
        assert_eq!((index_len - 16) % 8, 0, "{index:?} holds whole entries");
    }
    // 16 records per segment at most, so 100 records need at least 7 segments.
    assert!(stores.len() >= 7);
}

#[test]
fn given_record_larger_than_a_segment_should_get_a_segment_of_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 3, 3);
    let big = vec![7u8; 6000]; // tiny segments are 4 KiB
    let offset = log.append(&big).expect("append big");
    let after = log.append(b"after").expect("append after");
    assert_eq!(offset, 3);
    assert_eq!(log.read(offset).expect("read big").value.len(), 6000);
    assert_eq!(&log.read(after).expect("read after").value[..], b"after");
    assert_eq!(log.segment_count(), 3, "before | big | after");
}

#[test]
fn given_batch_bigger_than_a_segment_should_split_at_rolls_and_keep_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), tiny()).expect("open");
    let values: Vec<Vec<u8>> = (0..200).map(value).collect();
    assert_eq!(log.append_batch(&values).expect("batch"), 0..200);
    assert!(log.segment_count() >= 13);
    assert_holds(&log, 200);
}

#[test]
fn given_concurrent_readers_while_writing_should_see_only_complete_records() {
    const RECORDS: u64 = 4000;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(
        dir.path(),
        LogConfig {
            segment_bytes: 64 * 1024,
            ..tiny()
        },
    )
    .expect("open");
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));
    let readers: Vec<_> = (0..2)
        .map(|id| {
            let reader = log.reader();
            let done = Arc::clone(&done);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let mut cursor = reader.cursor(0);
                let mut checked = 0u64;
                // Bounded: stops once the writer is done and the cursor caught up.
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let chunk = cursor
                        .next_chunk(if id == 0 { 512 } else { 64 * 1024 })
                        .expect("chunk");
                    for record in &chunk {
                        assert_eq!(record.value, value(record.offset));
                    }
                    checked += chunk.len() as u64;
                    let next = reader.next_offset();
                    if next > 0 {
                        let record = reader.read(next - 1).expect("latest record is readable");
                        assert_eq!(record.value, value(next - 1));
                    }
                    if finished && chunk.is_empty() {
                        return checked;
                    }
                }
            })
        })
        .collect();
    start.wait();
    for batch_start in (0..RECORDS).step_by(8) {
        let values: Vec<Vec<u8>> = (batch_start..batch_start + 8).map(value).collect();
        log.append_batch(&values).expect("append");
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        assert_eq!(reader.join().expect("reader thread"), RECORDS);
    }
}

#[test]
fn given_open_log_when_opened_again_should_be_locked_until_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path(), tiny()).expect("open");
    match Log::open(dir.path(), tiny()) {
        Err(LogError::Locked { path }) => assert!(path.ends_with("LOCK")),
        other => panic!("second open must be Locked, got {other:?}"),
    }
    log.close().expect("close");
    Log::open(dir.path(), tiny()).expect("open after close");
}

#[test]
fn given_invalid_config_open_should_fail_naming_the_field_and_touch_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let target = dir.path().join("log");
    let config = LogConfig {
        segment_bytes: 10,
        ..LogConfig::default()
    };
    match Log::open(&target, config) {
        Err(
            err @ LogError::InvalidConfig {
                field: "segment_bytes",
                ..
            },
        ) => {
            assert!(
                err.to_string().contains("4096"),
                "message says the allowed range: {err}"
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(
        !target.exists(),
        "an invalid config must not create the directory"
    );
}

#[test]
fn given_byte_retention_should_drop_oldest_sealed_segments_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        retention: Retention {
            bytes: Some(12_000),
            age: None,
        },
        ..tiny()
    };
    let log = filled(dir.path(), config.clone(), 600, 5);
    let lowest = log.lowest_offset();
    assert!(lowest > 0, "retention must have dropped old segments");
    // The log stays within the limit plus the segment that is being filled.
    assert!(
        log.size_bytes() <= 12_000 + config.segment_bytes,
        "size {}",
        log.size_bytes()
    );
    assert_eq!(log.next_offset(), 600);
    assert!(matches!(
        log.read(lowest - 1),
        Err(LogError::OffsetOutOfRange { lowest: l, next: 600, .. }) if l == lowest
    ));
    assert_holds(&log, 600);
    let names = segment_files(dir.path());
    assert_eq!(
        names[0],
        format!("{lowest:020}.index"),
        "files below lowest are gone"
    );
    drop(log);
    let log = Log::open(dir.path(), config).expect("reopen");
    assert_eq!(log.lowest_offset(), lowest);
}

#[test]
fn given_age_retention_should_drop_segments_whose_newest_record_is_too_old() {
    let dir = tempfile::tempdir().expect("temp dir");
    let day = Duration::from_secs(24 * 3600);
    let config = LogConfig {
        retention: Retention {
            bytes: None,
            age: Some(day),
        },
        ..tiny()
    };
    let mut log = filled(dir.path(), config, 100, 10);
    let segments = log.segment_count();
    assert!(segments > 3);
    assert_eq!(
        log.apply_retention_at(SystemTime::now())
            .expect("retention now"),
        0
    );
    assert_eq!(log.lowest_offset(), 0);

    let dropped = log
        .apply_retention_at(SystemTime::now() + 2 * day)
        .expect("retention later");
    assert_eq!(
        dropped,
        segments - 1,
        "every sealed segment is older than a day by then"
    );
    assert_eq!(
        log.segment_count(),
        1,
        "the active segment is never dropped"
    );
    assert_eq!(log.next_offset(), 100);
    let lowest = log.lowest_offset();
    assert!(lowest > 0 && lowest < 100);
    assert_holds(&log, 100);
}

#[test]
fn given_cursor_behind_retention_should_get_out_of_range_then_resume_after_seek() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 100, 10);
    let mut cursor = log.reader().cursor(0);
    assert_eq!(cursor.next_chunk(100).expect("first chunk")[0].offset, 0);
    let lowest = log.truncate_prefix(50).expect("truncate_prefix");
    assert!(lowest > 0 && lowest <= 50);
    let position = cursor.position();
    match cursor.next_chunk(100) {
        Err(LogError::OffsetOutOfRange {
            offset,
            lowest: l,
            next: 100,
        }) => {
            assert_eq!((offset, l), (position, lowest));
        }
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
    assert_eq!(
        cursor.position(),
        position,
        "an error does not move the cursor"
    );
    cursor.seek(lowest);
    let mut count = 0;
    loop {
        let chunk = cursor.next_chunk(300).expect("chunk");
        if chunk.is_empty() {
            break;
        }
        count += chunk.len() as u64;
    }
    assert_eq!(count, 100 - lowest);
}

#[test]
fn given_truncate_suffix_into_a_sealed_segment_should_delete_later_segments_and_continue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 200, 9);
    let before = log.segment_count();
    log.truncate_suffix(37).expect("truncate_suffix");
    assert_eq!(log.next_offset(), 37);
    assert!(log.segment_count() < before);
    assert_holds(&log, 37);
    for offset in 37..60 {
        assert_eq!(log.append(&value(offset)).expect("append"), offset);
    }
    log.close().expect("close");
    let log = Log::open(dir.path(), tiny()).expect("reopen");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_holds(&log, 60);
    let stores = segment_files(dir.path())
        .iter()
        .filter(|n| n.ends_with(".log"))
        .count();
    assert_eq!(stores, log.segment_count(), "no stray segment files");
}

#[test]
fn given_truncate_suffix_at_a_segment_base_should_leave_an_empty_active_segment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(
        dir.path(),
        LogConfig {
            segment_max_records: 10,
            ..tiny()
        },
        35,
        1,
    );
    log.truncate_suffix(20).expect("cut at a base");
    assert_eq!(log.next_offset(), 20);
    assert_eq!(log.append(b"twenty").expect("append"), 20);
    drop(log);
    let log = Log::open(dir.path(), tiny()).expect("reopen");
    assert_eq!(&log.read(20).expect("read").value[..], b"twenty");
    assert_eq!(log.read(19).expect("read").value, value(19));
}

#[test]
fn given_reset_past_the_end_should_start_over_empty_there_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 100, 7);
    let reader = log.reader();
    log.reset(250).expect("reset");
    assert_eq!((log.lowest_offset(), log.next_offset()), (250, 250));
    assert_eq!((reader.lowest_offset(), reader.next_offset()), (250, 250));
    assert!(matches!(
        log.read(10),
        Err(LogError::OffsetOutOfRange { offset: 10, .. })
    ));
    assert_eq!(log.append(b"after").expect("append"), 250);
    log.close().expect("close");
    let stores = segment_files(dir.path())
        .iter()
        .filter(|n| n.ends_with(".log"))
        .count();
    assert_eq!(stores, 1, "only the new segment is left");
    let log = Log::open(dir.path(), tiny()).expect("reopen");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_eq!((log.lowest_offset(), log.next_offset()), (250, 251));
    assert_eq!(&log.read(250).expect("read").value[..], b"after");
}

#[test]
fn given_reset_to_an_offset_inside_the_log_should_drop_everything_not_only_the_tail() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 100, 3);
    log.reset(48).expect("reset");
    assert_eq!((log.lowest_offset(), log.next_offset()), (48, 48));
    assert_eq!(log.append(b"again").expect("append"), 48);
    drop(log);
    let log = Log::open(dir.path(), tiny()).expect("reopen");
    assert_eq!((log.lowest_offset(), log.next_offset()), (48, 49));
}

#[test]
fn given_lowered_segment_max_records_when_reopened_should_keep_all_and_roll_next() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wide = LogConfig {
        segment_max_records: 100,
        segment_bytes: 1 << 20,
        ..tiny()
    };
    filled(dir.path(), wide, 50, 50).close().expect("close");
    let mut log = Log::open(dir.path(), tiny()).expect("reopen with 16 per segment");
    assert_holds(&log, 50);
    assert_eq!(log.segment_count(), 1);
    log.append(&value(50)).expect("append");
    assert_eq!(
        log.segment_count(),
        2,
        "the over-full segment rolls on the next append"
    );
    assert_holds(&log, 51);
}

#[test]
fn given_each_sync_policy_records_should_be_readable_and_survive_close() {
    for sync in [
        SyncPolicy::Always,
        SyncPolicy::Never,
        SyncPolicy::Interval(Duration::from_millis(1)),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogConfig { sync, ..tiny() };
        let mut log = filled(dir.path(), config.clone(), 40, 3);
        log.sync().expect("sync");
        assert_holds(&log, 40);
        log.close().expect("close");
        assert_holds(&Log::open(dir.path(), config).expect("reopen"), 40);
    }
}

#[test]
fn given_foreign_files_in_the_directory_should_ignore_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    filled(dir.path(), tiny(), 30, 4).close().expect("close");
    std::fs::write(dir.path().join("README"), "notes").expect("write");
    std::fs::write(dir.path().join("00000000000000000000.log.bak"), "junk").expect("write");
    let log = Log::open(dir.path(), tiny()).expect("reopen");
    assert!(log.recovery().is_clean());
    assert_holds(&log, 30);
}

#[test]
fn given_reader_should_keep_reading_after_the_log_is_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = filled(dir.path(), tiny(), 40, 4);
    let reader = log.reader();
    log.close().expect("close");
    assert_eq!(reader.next_offset(), 40);
    assert_eq!(reader.read(39).expect("read").value, value(39));
}

fn store_file_len(dir: &std::path::Path, base: u64) -> u64 {
    std::fs::metadata(dir.join(format!("{base:020}.log")))
        .expect("store file")
        .len()
}

#[test]
fn given_preallocation_the_store_should_grow_ahead_and_end_at_its_last_record_once_sealed_or_closed()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        preallocate_bytes: 16 * 1024,
        segment_max_records: 1_000_000,
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.append(&value(0)).expect("append");
    assert_eq!(
        store_file_len(dir.path(), 0),
        16 + 16 * 1024,
        "one chunk allocated past the header"
    );

    // Fill past the first segment; the sealed store is cut back to its records.
    let mut next = 1;
    while log.segment_count() < 2 {
        log.append(&value(next)).expect("append");
        next += 1;
    }
    let sealed = log.read(log.next_offset() - 1).expect("newest").offset;
    assert_eq!(sealed, next - 1);
    let sealed_len: u64 = 16
        + (0..next - 1)
            .map(|o| 24 + value(o).len() as u64)
            .sum::<u64>();
    assert_eq!(store_file_len(dir.path(), 0), sealed_len);
    assert!(store_file_len(dir.path(), 0) <= config.segment_bytes);
    assert!(
        store_file_len(dir.path(), next - 1) > 16 + 24 + value(next - 1).len() as u64,
        "the new active store is preallocated"
    );

    log.close().expect("close");
    assert_eq!(
        store_file_len(dir.path(), next - 1),
        16 + 24 + value(next - 1).len() as u64,
        "close cuts the unused space"
    );
    let log = Log::open(dir.path(), config).expect("reopen");
    assert!(log.recovery().is_clean(), "{:?}", log.recovery());
    assert_holds(&log, next);
}

#[test]
fn given_preallocation_off_the_store_should_grow_with_each_append() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        preallocate_bytes: 0,
        ..LogConfig::default()
    };
    let mut log = Log::open(dir.path(), config).expect("open");
    log.append(&value(0)).expect("append");
    assert_eq!(
        store_file_len(dir.path(), 0),
        16 + 24 + value(0).len() as u64
    );
    log.append_batch(&[value(1), value(2)]).expect("append");
    assert_eq!(
        store_file_len(dir.path(), 0),
        16 + (0..3).map(|o| 24 + value(o).len() as u64).sum::<u64>()
    );
}

/// Open descriptors of this process on files under `dir`.
fn fds_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// Thousands of segments must not hold two descriptors each for life (a log of
/// 6223 segments once held 12 473): sealed segments open their files to be read,
/// and only the latest few stay open.
#[test]
fn sealed_segments_should_not_each_hold_open_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path().canonicalize().expect("canonical");
    let config = LogConfig {
        segment_max_records: 4,
        ..crate::support::tiny()
    };
    let log = filled(&dir, config.clone(), 1200, 4);
    assert_eq!(log.segment_count(), 300);
    log.close().expect("close");

    let log = Log::open(&dir, config).expect("reopen");
    assert!(
        fds_under(&dir) <= 4,
        "after opening: {} descriptors",
        fds_under(&dir)
    );
    assert_holds(&log, 1200);
    let open = fds_under(&dir);
    eprintln!("after reading 300 segments: {open} descriptors");
    assert!(
        open <= 2 * 64 + 4,
        "reading every segment left {open} descriptors open"
    );
}

/// A topic that took one record costs 64 KiB of preallocated disk, not 4 MiB (200
/// topics created in a burst once took 800 MB); a busy one grows to the full step.
#[test]
fn preallocation_should_grow_with_the_segment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    log.append(b"one").expect("append");
    let store = dir.path().join("00000000000000000000.log");
    let len = std::fs::metadata(&store).expect("store").len();
    assert!(len <= 64 * 1024 + 64, "one record took {len} bytes of disk");
    let big = vec![b'x'; 256 * 1024];
    for _ in 0..32 {
        log.append(&big).expect("append");
    }
    let len = std::fs::metadata(&store).expect("store").len();
    let records = 32 * (256 * 1024 + 24) + 16 + 27;
    assert!(
        len <= records + 4 * 1024 * 1024,
        "at most one step ahead: {len}"
    );
}

#[test]
fn given_a_syncer_on_another_thread_should_mark_durable_what_was_published_and_lower_the_mark_on_truncation()
 {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 40, 5);
    let syncer = log.syncer();
    let on_thread = syncer.clone();
    let durable = std::thread::spawn(move || on_thread.sync().expect("sync"))
        .join()
        .expect("syncer thread");
    assert_eq!(durable, 40, "every published record, across segments");
    assert_eq!(syncer.durable(), 40);
    log.append_batch(&[value(40), value(41)]).expect("append");
    assert_eq!(syncer.durable(), 40, "appends are not durable until synced");
    log.truncate_suffix(30).expect("truncate");
    assert_eq!(syncer.durable(), 30, "a cut lowers the mark");
    log.append(&value(30)).expect("append");
    assert_eq!(syncer.sync().expect("sync"), 31);
}

#[test]
fn given_a_failed_sync_from_another_thread_the_writer_should_refuse_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 10, 5);
    let syncer = log.syncer();
    let faults = keel_commitlog::fail_syncs_under(dir.path());
    assert!(matches!(syncer.sync(), Err(LogError::Io { .. })));
    assert!(matches!(log.append(b"more"), Err(LogError::Failed { .. })));
    assert!(matches!(syncer.sync(), Err(LogError::Failed { .. })));
    drop(faults);
}

#[test]
fn given_a_timestamp_appends_should_carry_it_and_never_go_back_in_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Log::open(dir.path(), tiny()).expect("open");
    log.append_batch_at(&[b"a", b"b"], 5_000).expect("append");
    log.append_batch_at(&[b"c"], 4_000).expect("append");
    let stamps: Vec<u64> = (0..3)
        .map(|offset| log.read(offset).expect("read").timestamp_ms)
        .collect();
    assert_eq!(stamps, [5_000, 5_000, 5_000]);
    log.append_batch_at(&[b"d"], 6_000).expect("append");
    assert_eq!(log.read(3).expect("read").timestamp_ms, 6_000);
}

#[test]
fn given_checkpoint_files_they_should_list_every_segment_with_lengths_that_hold_its_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = filled(dir.path(), tiny(), 100, 3);
    let files = log.checkpoint_files().expect("checkpoint");
    assert_eq!(
        files.len(),
        log.segment_count() * 2,
        "a store and an index each"
    );
    // Copies of the files at those lengths open as the same log.
    let copy = tempfile::tempdir().expect("temp dir");
    for (path, len) in &files {
        let bytes = std::fs::read(path).expect("read");
        let name = path.file_name().expect("name");
        std::fs::write(copy.path().join(name), &bytes[..*len as usize]).expect("copy");
    }
    log.append(&value(100)).expect("appends go on after");
    let copied = Log::open(copy.path(), tiny()).expect("open the copy");
    assert_holds(&copied, 100);
}
