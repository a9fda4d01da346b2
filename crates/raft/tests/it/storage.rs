//! What keel's Raft storage promises across restarts: appended entries, the vote,
//! purges and snapshots all come back as they were.

use bytes::Bytes;
use keel_raft::{Command, Entry, LogId, LogStore, LogStoreConfig, Machine, Vote};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};

use crate::support::FileMachine;

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn command(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command(Bytes::from(format!("command {index}")))),
    }
}

fn small() -> LogStoreConfig {
    LogStoreConfig {
        segment_bytes: 4096,
        ..LogStoreConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn appended_entries_and_the_vote_should_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    runtime().block_on(async {
        let mut store = LogStore::open(dir.path(), &small()).expect("open");
        for batch in (0..300u64).collect::<Vec<_>>().chunks(7) {
            store
                .blocking_append(batch.iter().map(|&i| command(1 + i / 100, i)))
                .await
                .expect("append");
        }
        store.save_vote(&Vote::new(3, 2)).await.expect("vote");
        drop(store);

        let mut store = LogStore::open(dir.path(), &small()).expect("reopen");
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new(3, 2))
        );
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(3, 299)));
        assert_eq!(state.last_purged_log_id, None);
        let entries = store.try_get_log_entries(95..105).await.expect("read");
        assert_eq!(entries.len(), 10);
        for (entry, index) in entries.iter().zip(95..) {
            assert_eq!(entry, &command(1 + index / 100, index));
        }
    });
}

#[test]
fn a_truncation_then_a_purge_past_the_end_should_hold_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    runtime().block_on(async {
        let mut store = LogStore::open(dir.path(), &small()).expect("open");
        store
            .blocking_append((0..50).map(|i| command(1, i)))
            .await
            .expect("append");
        store.truncate(log_id(1, 40)).await.expect("truncate");
        assert_eq!(
            store.get_log_state().await.expect("state").last_log_id,
            Some(log_id(1, 39))
        );
        store
            .blocking_append((40..45).map(|i| command(2, i)))
            .await
            .expect("append after the cut");
        store
            .purge(log_id(2, 500))
            .await
            .expect("purge past the end");
        drop(store);

        let mut store = LogStore::open(dir.path(), &small()).expect("reopen");
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 500)));
        assert_eq!(state.last_log_id, Some(log_id(2, 500)));
        assert!(
            store
                .try_get_log_entries(0..1000)
                .await
                .expect("read")
                .is_empty()
        );
        store
            .blocking_append([command(3, 501)])
            .await
            .expect("the next entry goes right after the purge");
        assert_eq!(
            store.try_get_log_entries(0..1000).await.expect("read"),
            vec![command(3, 501)]
        );
    });
}

#[test]
fn a_machine_should_reopen_at_its_last_snapshot_and_an_entry_out_of_place_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_dir = dir.path().join("state");
    let snapshots = dir.path().join("snapshots");
    runtime().block_on(async {
        let mut machine =
            Machine::open(&snapshots, &mut |s| FileMachine::open(&state_dir, s)).expect("open");
        machine
            .apply((0..10).map(|i| command(1, i)))
            .await
            .expect("apply");
        let snapshot = machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 9)));
        // Applied after the snapshot, never synced: a restart applies them again
        // from the Raft log, so the machine must come back without them.
        machine
            .apply((10..15).map(|i| command(1, i)))
            .await
            .expect("apply more");
        assert_eq!(machine.state().commands().expect("read").len(), 15);
        drop(machine);

        let mut machine =
            Machine::open(&snapshots, &mut |s| FileMachine::open(&state_dir, s)).expect("reopen");
        let (applied, _) = machine.applied_state().await.expect("applied");
        assert_eq!(applied, Some(log_id(1, 9)));
        let commands = machine.state().commands().expect("read");
        assert_eq!(commands.len(), 10);
        assert_eq!(commands[9], Bytes::from_static(b"command 9"));

        // A snapshot of the same applied state after a restart gets an id of its
        // own; installing a snapshot with the current one's id keeps the current one
        // whole until the new one is in place.
        let again = machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot again");
        assert_eq!(again.meta.last_log_id, snapshot.meta.last_log_id);
        assert_ne!(again.meta.snapshot_id, snapshot.meta.snapshot_id);
        let current = machine
            .get_current_snapshot()
            .await
            .expect("current")
            .expect("a snapshot");
        // A copy of the snapshot whose files an install of it already took (two
        // transfers of one snapshot, queued at once): nothing to do, and no error (it
        // once stopped the node's Raft for good).
        let taken = Box::new(keel_raft::SnapshotFiles {
            dir: dir.path().join("snapshots").join("incoming-gone"),
            manifest: current.snapshot.manifest.clone(),
        });
        machine
            .install_snapshot(&current.meta, taken)
            .await
            .expect("a second copy of an applied snapshot");
        machine
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .expect("install a snapshot with the current id");
        drop(machine);
        let machine = Machine::open(&snapshots, &mut |s| FileMachine::open(&state_dir, s))
            .expect("reopen after installing");
        assert_eq!(machine.applied(), Some(log_id(1, 9)));
        assert_eq!(machine.state().commands().expect("read").len(), 10);

        let mut store = LogStore::open(&dir.path().join("raft"), &small()).expect("log");
        store
            .blocking_append((0..3).map(|i| command(1, i)))
            .await
            .expect("append");
        let err = store
            .blocking_append([command(1, 7)])
            .await
            .expect_err("a gap");
        assert!(
            err.to_string().contains("appended where entry 3 belongs"),
            "{err}"
        );
    });
}

#[test]
fn a_log_that_fails_its_checksums_should_be_cut_and_stay_marked_damaged_across_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    runtime().block_on(async {
        let mut store = LogStore::open(dir.path(), &small()).expect("open");
        store
            .blocking_append((0..20u64).map(|i| command(1, i)))
            .await
            .expect("append");
        store
            .save_vote(&Vote::new_committed(1, 1))
            .await
            .expect("vote");
        assert!(!store.damage().is_set());
        drop(store);

        // Damage in the middle of the active segment: a record it acknowledged.
        let file = dir.path().join("log/00000000000000000000.log");
        let bytes = std::fs::read(&file).expect("read");
        let mut damaged = bytes.clone();
        let middle = bytes.len() / 2;
        for byte in &mut damaged[middle..middle + 8] {
            *byte ^= 0xFF;
        }
        std::fs::write(&file, &damaged).expect("write");

        let mut store = LogStore::open(dir.path(), &small()).expect("reopen");
        assert!(store.damage().is_set(), "a cut log is damaged");
        let state = store.get_log_state().await.expect("state");
        let last = state.last_log_id.expect("a prefix is kept").index;
        assert!(last < 19, "the log was cut before the damage, at {last}");
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new(1, 1)),
            "the vote stays, no longer committed: the node does not lead again at start"
        );
        drop(store);
        let store = LogStore::open(dir.path(), &small()).expect("reopen");
        assert!(store.damage().is_set(), "the mark survives a restart");
    });
}
