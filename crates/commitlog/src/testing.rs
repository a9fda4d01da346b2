//! A conformance suite for implementations of [`CommitLog`] (feature `testing`).
//!
//! Each check is a public function that panics, naming the broken rule, when an
//! implementation breaks the contract documented on [`CommitLog`]. [`run_all`] runs
//! them all on fresh logs from a [`Harness`]:
//!
//! The on-disk [`crate::Log`] runs it from `tests/it/main.rs` with a harness that
//! opens each log in a temp dir, once with the default config and once with tiny
//! segments so that every check crosses segment boundaries.

// A check reports a broken contract by panicking, as a test does.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::{CommitLog, LogError, Offset, Record};

/// One check of the suite.
pub type Check<H> = fn(&mut H);

/// Makes logs for the suite.
pub trait Harness {
    /// The implementation under test.
    type Log: CommitLog;

    /// A new, empty log.
    fn open_empty(&mut self) -> Self::Log;

    /// Closes `log` cleanly and opens the same log again. An implementation without
    /// persistence returns it unchanged.
    fn reopen(&mut self, log: Self::Log) -> Self::Log;

    /// The largest value the logs from [`Harness::open_empty`] accept.
    fn max_record_bytes(&self) -> usize;
}

/// Runs every check, each on a fresh log.
pub fn run_all<H: Harness>(harness: &mut H) {
    let checks: [(&str, Check<H>); 10] = [
        ("empty_log_has_no_records", empty_log_has_no_records),
        ("append_returns_dense_offsets", append_returns_dense_offsets),
        (
            "append_batch_returns_a_contiguous_range",
            append_batch_returns_a_contiguous_range,
        ),
        (
            "oversized_record_is_rejected_whole",
            oversized_record_is_rejected_whole,
        ),
        (
            "reads_outside_the_range_are_out_of_range",
            reads_outside_the_range_are_out_of_range,
        ),
        (
            "chunks_respect_the_budget_and_cover_the_log",
            chunks_respect_the_budget_and_cover_the_log,
        ),
        ("reopen_keeps_every_record", reopen_keeps_every_record),
        (
            "truncate_suffix_drops_exactly_the_tail",
            truncate_suffix_drops_exactly_the_tail,
        ),
        (
            "truncate_prefix_keeps_records_from_before",
            truncate_prefix_keeps_records_from_before,
        ),
        ("sync_is_safe_at_any_time", sync_is_safe_at_any_time),
    ];
    for (name, check) in checks {
        eprintln!("commit log conformance: {name}");
        check(harness);
    }
}

/// A value that differs for every offset and has varied lengths (including empty).
pub fn value_for(offset: Offset) -> Vec<u8> {
    let len = (offset * 7 % 61) as usize;
    (0..len).map(|i| (offset as usize + i) as u8).collect()
}

fn append_values<L: CommitLog>(log: &mut L, count: u64) -> std::ops::Range<Offset> {
    let start = log.next_offset();
    let values: Vec<Vec<u8>> = (start..start + count).map(value_for).collect();
    let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    let range = log.append_batch(&slices).expect("append_batch");
    assert_eq!(
        range,
        start..start + count,
        "append_batch must return the offsets it assigned"
    );
    range
}

fn assert_record<L: CommitLog>(log: &L, offset: Offset) -> Record {
    let record = log
        .read(offset)
        .unwrap_or_else(|err| panic!("read({offset}) failed: {err}"));
    assert_eq!(
        record.offset, offset,
        "read({offset}) returned another offset"
    );
    assert_eq!(
        record.value,
        value_for(offset),
        "read({offset}) returned another value"
    );
    record
}

fn assert_out_of_range(
    result: crate::Result<impl std::fmt::Debug>,
    offset: Offset,
    lowest: Offset,
    next: Offset,
) {
    match result {
        Err(LogError::OffsetOutOfRange {
            offset: o,
            lowest: l,
            next: n,
        }) => {
            assert_eq!(
                (o, l, n),
                (offset, lowest, next),
                "OffsetOutOfRange must name the offset and the range"
            )
        }
        other => panic!(
            "offset {offset} (range {lowest}..{next}) must be OffsetOutOfRange, got {other:?}"
        ),
    }
}

/// An empty log reads nothing and says so precisely.
pub fn empty_log_has_no_records<H: Harness>(harness: &mut H) {
    let log = harness.open_empty();
    let next = log.next_offset();
    assert_eq!(log.lowest_offset(), next, "an empty log has lowest == next");
    assert_out_of_range(log.read(next), next, next, next);
    assert!(
        log.read_chunk(next, 1024)
            .expect("chunk at next")
            .is_empty()
    );
}

/// Appends get dense offsets; reads return the value and offset; timestamps never go back.
pub fn append_returns_dense_offsets<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let start = log.next_offset();
    for offset in start..start + 50 {
        assert_eq!(log.append(&value_for(offset)).expect("append"), offset);
        assert_eq!(log.next_offset(), offset + 1);
    }
    let mut last = 0;
    for offset in start..start + 50 {
        let record = assert_record(&log, offset);
        assert!(record.timestamp_ms >= last, "timestamps must not go back");
        last = record.timestamp_ms;
    }
}

/// A batch gets one contiguous range; an empty batch gets the empty range at next.
pub fn append_batch_returns_a_contiguous_range<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let first = append_values(&mut log, 100);
    let second = append_values(&mut log, 1);
    assert_eq!(second.start, first.end);
    let next = log.next_offset();
    let empty: [&[u8]; 0] = [];
    assert_eq!(log.append_batch(&empty).expect("empty batch"), next..next);
    for offset in first.start..second.end {
        assert_record(&log, offset);
    }
}

/// A batch with one record over the limit is rejected and appends nothing.
pub fn oversized_record_is_rejected_whole<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let max = harness.max_record_bytes();
    append_values(&mut log, 3);
    let next = log.next_offset();
    let small = [1u8; 10];
    let big = vec![2u8; max + 1];
    match log.append_batch(&[&small[..], &big[..]]) {
        Err(LogError::RecordTooLarge { len, max: limit }) => {
            assert_eq!(len, max + 1);
            assert_eq!(limit as usize, max);
        }
        other => panic!("a record of max+1 bytes must be RecordTooLarge, got {other:?}"),
    }
    assert_eq!(
        log.next_offset(),
        next,
        "a rejected batch must append nothing"
    );
    assert_out_of_range(log.read(next), next, log.lowest_offset(), next);
    let exact = vec![3u8; max];
    assert_eq!(
        log.append(&exact).expect("a record of exactly max bytes"),
        next
    );
    assert_eq!(log.read(next).expect("read max record").value.len(), max);
}

/// Offsets at or past next (and below lowest) are OffsetOutOfRange with the range.
pub fn reads_outside_the_range_are_out_of_range<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    append_values(&mut log, 10);
    let (lowest, next) = (log.lowest_offset(), log.next_offset());
    assert_out_of_range(log.read(next), next, lowest, next);
    assert_out_of_range(log.read(next + 1000), next + 1000, lowest, next);
    assert_out_of_range(log.read(u64::MAX), u64::MAX, lowest, next);
    assert_out_of_range(log.read_chunk(next + 1, 1024), next + 1, lowest, next);
    if lowest > 0 {
        assert_out_of_range(log.read(lowest - 1), lowest - 1, lowest, next);
    }
}

/// Chunks hold at most the budget (but at least one record) and together cover the log.
pub fn chunks_respect_the_budget_and_cover_the_log<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let range = append_values(&mut log, 200);
    let big_offset = log.append(&vec![9u8; 5000]).expect("big record");
    let after = append_values(&mut log, 5);

    let mut from = range.start;
    let mut seen = Vec::new();
    loop {
        let chunk = log.read_chunk(from, 1000).expect("read_chunk");
        if chunk.is_empty() {
            break;
        }
        let bytes: usize = chunk.iter().map(|r| r.value.len()).sum();
        assert!(
            chunk.len() == 1 || bytes <= 1000,
            "chunk of {bytes} value bytes exceeds a budget of 1000"
        );
        for record in &chunk {
            assert_eq!(
                record.offset,
                range.start + seen.len() as u64,
                "chunk records must be in order"
            );
            seen.push(record.clone());
        }
        from += chunk.len() as u64;
    }
    assert_eq!(from, after.end, "chunks must reach next_offset");
    for record in &seen {
        if record.offset == big_offset {
            assert_eq!(record.value.len(), 5000);
        } else {
            assert_eq!(record.value, value_for(record.offset));
        }
    }
    let single = log
        .read_chunk(big_offset, 10)
        .expect("chunk with a record over the budget");
    assert_eq!(
        single.len(),
        1,
        "a record larger than the budget comes alone"
    );
    assert_eq!(single[0].offset, big_offset);
    let zero = log
        .read_chunk(range.start, 0)
        .expect("chunk with a zero budget");
    assert_eq!(zero.len(), 1, "a zero budget still returns one record");
}

/// Reopening keeps every record and the next offset.
pub fn reopen_keeps_every_record<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let range = append_values(&mut log, 120);
    log.sync().expect("sync");
    let mut log = harness.reopen(log);
    assert_eq!(log.next_offset(), range.end);
    for offset in range.clone() {
        assert_record(&log, offset);
    }
    assert_eq!(
        log.append(&value_for(range.end))
            .expect("append after reopen"),
        range.end
    );
    let log = harness.reopen(log);
    assert_record(&log, range.end);
}

/// truncate_suffix drops exactly the records from `from` on; offsets are reused.
pub fn truncate_suffix_drops_exactly_the_tail<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let range = append_values(&mut log, 30);
    let cut = range.start + 20;
    log.truncate_suffix(cut).expect("truncate_suffix");
    assert_eq!(log.next_offset(), cut);
    assert_record(&log, cut - 1);
    assert_out_of_range(log.read(cut), cut, log.lowest_offset(), cut);
    assert_eq!(
        log.append(b"replacement").expect("append after truncate"),
        cut
    );
    assert_eq!(
        &log.read(cut).expect("read replacement").value[..],
        b"replacement"
    );

    let next = log.next_offset();
    log.truncate_suffix(next)
        .expect("truncate_suffix at next is a no-op");
    assert_eq!(log.next_offset(), next);
    assert_out_of_range(
        log.truncate_suffix(next + 1),
        next + 1,
        log.lowest_offset(),
        next,
    );

    let mut log = harness.reopen(log);
    assert_eq!(log.next_offset(), next, "truncation survives reopen");
    assert_eq!(
        &log.read(cut).expect("read after reopen").value[..],
        b"replacement"
    );
    let lowest = log.lowest_offset();
    log.truncate_suffix(lowest).expect("truncate everything");
    assert_eq!(log.next_offset(), lowest);
    assert!(
        log.read_chunk(lowest, 1024)
            .expect("chunk of empty log")
            .is_empty()
    );
}

/// truncate_prefix never drops a record at or after `before`.
pub fn truncate_prefix_keeps_records_from_before<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    let mut end = 0;
    for _ in 0..10 {
        end = append_values(&mut log, 30).end;
    }
    let before = end - 150;
    let lowest = log.truncate_prefix(before).expect("truncate_prefix");
    assert!(
        lowest <= before,
        "truncate_prefix({before}) dropped records up to {lowest}"
    );
    assert_eq!(log.lowest_offset(), lowest);
    for offset in lowest..end {
        assert_record(&log, offset);
    }
    if lowest > 0 {
        assert_out_of_range(log.read(lowest - 1), lowest - 1, lowest, end);
    }
    assert_out_of_range(log.truncate_prefix(end + 1), end + 1, lowest, end);
    let log = harness.reopen(log);
    assert_eq!(
        log.lowest_offset(),
        lowest,
        "truncate_prefix survives reopen"
    );
    assert_eq!(log.next_offset(), end);
}

/// sync works on an empty log, after appends, and twice in a row.
pub fn sync_is_safe_at_any_time<H: Harness>(harness: &mut H) {
    let mut log = harness.open_empty();
    log.sync().expect("sync of an empty log");
    let range = append_values(&mut log, 5);
    log.sync().expect("sync after appends");
    log.sync().expect("second sync");
    assert_record(&log, range.end - 1);
}
