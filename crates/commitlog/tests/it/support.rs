//! Helpers shared by the integration tests.

use std::path::Path;

use keel_commitlog::{Log, LogConfig, SyncPolicy};

/// Small segments so that tests roll often: 4 KiB or 16 records, records up to 8 KiB.
pub(crate) fn tiny() -> LogConfig {
    LogConfig {
        max_record_bytes: 8 * 1024,
        segment_bytes: 4096,
        segment_max_records: 16,
        sync: SyncPolicy::Never,
        ..LogConfig::default()
    }
}

/// A value that is different for every offset.
pub(crate) fn value(offset: u64) -> Vec<u8> {
    format!("record {offset:06} {}", "x".repeat((offset % 50) as usize)).into_bytes()
}

/// Opens a log and appends `count` records, `per_batch` at a time.
pub(crate) fn filled(dir: &Path, config: LogConfig, count: u64, per_batch: usize) -> Log {
    let mut log = Log::open(dir, config).expect("open");
    let values: Vec<Vec<u8>> = (0..count).map(value).collect();
    for batch in values.chunks(per_batch.max(1)) {
        log.append_batch(batch).expect("append");
    }
    log
}

/// Asserts that the log holds exactly `value(0..count)`.
pub(crate) fn assert_holds(log: &Log, count: u64) {
    assert_eq!(log.next_offset(), count, "next offset");
    for offset in log.lowest_offset()..count {
        let record = log
            .read(offset)
            .unwrap_or_else(|err| panic!("read({offset}): {err}"));
        assert_eq!(record.value, value(offset), "value at {offset}");
    }
}
