//! openraft's own conformance suite, run against keel's log store and state
//! machine adapter.

use keel_raft::{LogStore, LogStoreConfig, Machine, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use crate::support::FileMachine;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, Machine<FileMachine>, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, Machine<FileMachine>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogStoreConfig {
            segment_bytes: 4096,
            ..LogStoreConfig::default()
        };
        let log = LogStore::open(&dir.path().join("raft"), &config).expect("open log store");
        let state_dir = dir.path().join("state");
        let machine = Machine::open(&dir.path().join("snapshots"), &mut |summary| {
            FileMachine::open(&state_dir, summary)
        })
        .expect("open machine");
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_conformance_suite_should_pass_against_keels_storage() {
    Suite::test_all(Builder).expect("openraft's storage suite");
}
