//! A property test: random operations on the log, checked against a `Vec` model.

use std::time::{Duration, SystemTime};

use keel_commitlog::{Log, LogConfig, LogError, Retention};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Batch(Vec<Vec<u8>>),
    Read(u16),
    Chunk(u16, u16),
    Reopen,
    Kill,
    Sync,
    TruncatePrefix(u16),
    TruncateSuffix(u16),
    /// Apply age retention now (drops nothing) or two hours ahead (drops all sealed).
    Retention(bool),
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => proptest::collection::vec(any::<u8>(), 400..1200),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => value().prop_map(Op::Append),
        6 => proptest::collection::vec(value(), 0..12).prop_map(Op::Batch),
        6 => any::<u16>().prop_map(Op::Read),
        4 => (any::<u16>(), 0..3000u16).prop_map(|(at, budget)| Op::Chunk(at, budget)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Kill),
        1 => Just(Op::Sync),
        1 => any::<u16>().prop_map(Op::TruncatePrefix),
        2 => any::<u16>().prop_map(Op::TruncateSuffix),
        1 => any::<bool>().prop_map(Op::Retention),
    ]
}

fn config() -> LogConfig {
    LogConfig {
        retention: Retention {
            bytes: None,
            age: Some(Duration::from_secs(3600)),
        },
        ..crate::support::tiny()
    }
}

/// Maps a selector onto offsets around the valid range, so that some probes fall
/// outside it.
fn pick(selector: u16, lowest: u64, next: u64) -> u64 {
    let low = lowest.saturating_sub(2);
    low + u64::from(selector) % (next + 3 - low)
}

struct Model {
    values: Vec<Vec<u8>>,
    lowest: u64,
}

fn check_out_of_range<T: std::fmt::Debug>(result: keel_commitlog::Result<T>, model: &Model) {
    let next = model.values.len() as u64;
    match result {
        Err(LogError::OffsetOutOfRange {
            lowest, next: n, ..
        }) => assert_eq!((lowest, n), (model.lowest, next)),
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
}

/// Reads a chunk from the offset `selector` picks, within `budget` bytes, and checks
/// it against the model.
fn check_chunk(current: &Log, model: &Model, selector: u16, budget: u16) {
    let next = model.values.len() as u64;
    let from = pick(selector, model.lowest, next);
    if (model.lowest..=next).contains(&from) {
        let chunk = current.read_chunk(from, budget.into()).expect("read_chunk");
        assert_eq!(chunk.is_empty(), from == next);
        for (i, record) in chunk.iter().enumerate() {
            assert_eq!(record.offset, from + i as u64);
            assert_eq!(record.value, model.values[record.offset as usize]);
        }
    } else {
        check_out_of_range(current.read_chunk(from, budget.into()), model);
    }
}

/// Applies retention now, or two hours `later`, and moves the model's lowest offset.
fn apply_retention(current: &mut Log, model: &mut Model, later: bool) {
    let now = if later {
        SystemTime::now() + Duration::from_secs(7200)
    } else {
        SystemTime::now()
    };
    current.apply_retention_at(now).expect("retention");
    if later {
        assert_eq!(
            current.segment_count(),
            1,
            "every sealed segment is older than the limit"
        );
    } else {
        assert_eq!(
            current.lowest_offset(),
            model.lowest,
            "nothing is old enough yet"
        );
    }
    let lowest = current.lowest_offset();
    assert!(lowest >= model.lowest);
    model.lowest = lowest;
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = Some(Log::open(dir.path(), config()).expect("open"));
    let mut model = Model {
        values: Vec::new(),
        lowest: 0,
    };
    for op in ops {
        let current = log.as_mut().expect("log is open");
        let next = model.values.len() as u64;
        match op {
            Op::Append(value) => {
                assert_eq!(current.append(&value).expect("append"), next);
                model.values.push(value);
            }
            Op::Batch(values) => {
                let range = current.append_batch(&values).expect("append_batch");
                assert_eq!(range, next..next + values.len() as u64);
                model.values.extend(values);
            }
            Op::Read(selector) => {
                let offset = pick(selector, model.lowest, next);
                if (model.lowest..next).contains(&offset) {
                    let record = current.read(offset).expect("read");
                    assert_eq!(record.offset, offset);
                    assert_eq!(record.value, model.values[offset as usize]);
                } else {
                    check_out_of_range(current.read(offset), &model);
                }
            }
            Op::Chunk(selector, budget) => check_chunk(current, &model, selector, budget),
            Op::Reopen => {
                log.take().expect("open").close().expect("close");
                let reopened = Log::open(dir.path(), config()).expect("reopen");
                assert!(reopened.recovery().is_clean(), "{:?}", reopened.recovery());
                log = Some(reopened);
            }
            Op::Kill => {
                // A process crash loses nothing that was written.
                log.take().expect("open").kill();
                log = Some(Log::open(dir.path(), config()).expect("reopen after kill"));
            }
            Op::Sync => current.sync().expect("sync"),
            Op::TruncatePrefix(selector) => {
                let before = pick(selector, model.lowest, next);
                if before > next {
                    check_out_of_range(current.truncate_prefix(before), &model);
                } else {
                    let lowest = current.truncate_prefix(before).expect("truncate_prefix");
                    assert!(lowest >= model.lowest && lowest <= before.max(model.lowest));
                    model.lowest = lowest;
                }
            }
            Op::TruncateSuffix(selector) => {
                let from = pick(selector, model.lowest, next);
                if (model.lowest..=next).contains(&from) {
                    current.truncate_suffix(from).expect("truncate_suffix");
                    model.values.truncate(from as usize);
                } else {
                    check_out_of_range(current.truncate_suffix(from), &model);
                }
            }
            Op::Retention(later) => apply_retention(current, &mut model, later),
        }
        let current = log.as_ref().expect("log is open");
        assert_eq!(
            current.next_offset(),
            model.values.len() as u64,
            "next offset after {:?}",
            "op"
        );
        assert_eq!(current.lowest_offset(), model.lowest, "lowest offset");
    }
    // Whatever happened, every offset in range reads back as the model says.
    let current = log.expect("log is open");
    for offset in model.lowest..model.values.len() as u64 {
        assert_eq!(
            current.read(offset).expect("final read").value,
            model.values[offset as usize]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn log_behaves_like_a_vec(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
