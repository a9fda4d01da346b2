//! Integration tests of the on-disk log: the contract suite, whole-log behaviour,
//! crash recovery and a model-based property test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod crash;
mod fuzz;
mod log;
mod model;
mod support;

use keel_commitlog::testing::{self, Harness};
use keel_commitlog::{Log, LogConfig};

/// Opens every log in its own temp dir with the given config.
struct DiskHarness {
    config: LogConfig,
    dirs: Vec<tempfile::TempDir>,
}

impl Harness for DiskHarness {
    type Log = Log;

    fn open_empty(&mut self) -> Log {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Log::open(dir.path(), self.config.clone()).expect("open");
        self.dirs.push(dir);
        log
    }

    fn reopen(&mut self, log: Log) -> Log {
        let dir = log.dir().to_path_buf();
        log.close().expect("close");
        let log = Log::open(&dir, self.config.clone()).expect("reopen");
        assert!(
            log.recovery().is_clean(),
            "a clean close must reopen clean: {:?}",
            log.recovery()
        );
        log
    }

    fn max_record_bytes(&self) -> usize {
        self.config.max_record_bytes as usize
    }
}

#[test]
fn disk_log_with_default_config_keeps_the_contract() {
    testing::run_all(&mut DiskHarness {
        config: LogConfig::default(),
        dirs: Vec::new(),
    });
}

#[test]
fn disk_log_with_tiny_segments_keeps_the_contract() {
    testing::run_all(&mut DiskHarness {
        config: support::tiny(),
        dirs: Vec::new(),
    });
}
