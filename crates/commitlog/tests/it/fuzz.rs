//! Bounded fuzzing of recovery: a log's files damaged at random (bytes overwritten,
//! cut, extended with garbage) are opened without a panic, and what the log then
//! serves is a prefix of what was written, never garbage. `PROPTEST_CASES` runs it
//! longer by hand.

use std::fs::{self, OpenOptions};

use keel_commitlog::Log;
use proptest::prelude::*;

use crate::support::{filled, tiny, value};

/// A way to damage one file of the log.
#[derive(Debug, Clone)]
enum Damage {
    /// Overwrite bytes at a position (taken modulo the file's length).
    Overwrite(u64, Vec<u8>),
    /// Cut the file at a position (modulo its length).
    Cut(u64),
    /// Append bytes.
    Extend(Vec<u8>),
}

/// `PROPTEST_CASES` when set (a long run by hand), else `default`: a config that
/// names its cases would otherwise ignore the variable.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn damage() -> impl Strategy<Value = (usize, Damage)> {
    let bytes = proptest::collection::vec(any::<u8>(), 1..64);
    (
        any::<usize>(),
        prop_oneof![
            (any::<u64>(), bytes.clone()).prop_map(|(at, b)| Damage::Overwrite(at, b)),
            any::<u64>().prop_map(Damage::Cut),
            bytes.prop_map(Damage::Extend),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn damaged_files_should_open_or_fail_cleanly_and_never_serve_garbage(
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        const WRITTEN: u64 = 40;
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path(), tiny(), WRITTEN, 3).close().unwrap();
        let mut files: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "log" || e == "index"))
            .collect();
        files.sort();
        for (which, damage) in damages {
            let path = &files[which % files.len()];
            let mut bytes = fs::read(path).unwrap();
            match damage {
                Damage::Overwrite(at, with) => {
                    if !bytes.is_empty() {
                        let at = usize::try_from(at % bytes.len() as u64).unwrap();
                        for (i, byte) in with.into_iter().enumerate() {
                            if let Some(slot) = bytes.get_mut(at + i) {
                                *slot = byte;
                            }
                        }
                    }
                }
                Damage::Cut(at) => {
                    let at = usize::try_from(at % (bytes.len() as u64 + 1)).unwrap();
                    bytes.truncate(at);
                }
                Damage::Extend(with) => bytes.extend(with),
            }
            OpenOptions::new().write(true).truncate(true).open(path).unwrap();
            fs::write(path, bytes).unwrap();
        }
        // Opening may refuse (corruption is named, never guessed at); it may not panic.
        if let Ok(log) = Log::open(dir.path(), tiny()) {
            for offset in log.lowest_offset()..log.next_offset() {
                if let Ok(record) = log.read(offset) {
                    prop_assert_eq!(record.value, value(offset), "offset {}", offset);
                }
            }
            prop_assert!(log.next_offset() <= WRITTEN, "records out of nothing");
        }
    }
}
