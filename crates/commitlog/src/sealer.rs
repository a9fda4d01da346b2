//! The sealer: a background thread that makes sealed segments durable.
//!
//! When the active segment rolls, the writer hands the old one to the sealer and
//! goes on appending. The sealer syncs the store and the index, then sets the
//! *durable* flag in the index header and syncs it again. Recovery trusts a flagged
//! segment (damage in it is corruption); an unflagged sealed segment may have been
//! cut short by a crash and is scanned and, if torn, cut like an active one.
//!
//! The thread runs only while there is work: it starts at a roll and ends when the
//! queue is empty, so a log that is not rolling costs no thread. The queue holds
//! [`QUEUE`] segments; a writer that outruns the disk by more than that waits at its
//! next roll, which bounds how much sealed data is at risk.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::{IoContext, Result};
use crate::format;
use crate::segment::SegmentFiles;

/// Segments that may wait to be sealed before a roll blocks.
const QUEUE: usize = 2;

#[derive(Debug, Default)]
struct Progress {
    waiting: VecDeque<SegmentFiles>,
    queued: u64,
    done: u64,
    error: Option<String>,
    /// Whether a sealing thread is at work (it ends when `waiting` is empty).
    running: bool,
}

#[derive(Debug, Default)]
struct State {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl State {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(
        &self,
        progress: std::sync::MutexGuard<'a, Progress>,
    ) -> std::sync::MutexGuard<'a, Progress> {
        self.changed
            .wait(progress)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Seals what waits, then ends the thread.
    fn work(&self) {
        let _ending = Ending(self);
        let mut progress = self.progress();
        while let Some(files) = progress.waiting.pop_front() {
            drop(progress);
            let result = seal_now(&files);
            progress = self.progress();
            progress.done += 1;
            if let Err(err) = result {
                tracing::error!(store = %files.store_path.display(), error = %err, "sealing segment failed");
                progress.error.get_or_insert_with(|| {
                    format!("sealing {} failed: {err}", files.store_path.display())
                });
            }
            self.changed.notify_all();
        }
        progress.running = false;
        self.changed.notify_all();
    }
}

/// Settles the books when a sealing thread panics, so that nobody waits for it.
struct Ending<'a>(&'a State);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut progress = self.0.progress();
            progress.waiting.clear();
            progress.done = progress.queued;
            progress.running = false;
            progress
                .error
                .get_or_insert_with(|| "the sealer thread panicked".into());
            self.0.changed.notify_all();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Sealer {
    state: Arc<State>,
    /// The latest sealing thread, joined before the next starts and at the end.
    thread: Option<JoinHandle<()>>,
}

impl Sealer {
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::default(),
            thread: None,
        }
    }

    /// Queues a segment whose index is fully written, starting a sealing thread if
    /// none is at work; blocks while the queue is full.
    pub(crate) fn seal(&mut self, files: SegmentFiles) {
        let mut progress = self.state.progress();
        while progress.waiting.len() >= QUEUE {
            progress = self.state.wait(progress);
        }
        progress.waiting.push_back(files);
        progress.queued += 1;
        if progress.running {
            return;
        }
        progress.running = true;
        drop(progress);
        // The previous thread has ended (it cleared `running`): reap it.
        if let Some(previous) = self.thread.take() {
            self.join(previous);
        }
        let state = Arc::clone(&self.state);
        match std::thread::Builder::new()
            .name("keel-sealer".into())
            .spawn(move || state.work())
        {
            Ok(thread) => self.thread = Some(thread),
            Err(err) => {
                let mut progress = self.state.progress();
                progress.running = false;
                let abandoned = progress.waiting.len() as u64;
                progress.waiting.clear();
                progress.done += abandoned;
                progress
                    .error
                    .get_or_insert_with(|| format!("cannot start the sealer thread: {err}"));
                self.state.changed.notify_all();
            }
        }
    }

    /// Waits until every queued segment is sealed.
    pub(crate) fn wait_idle(&self) {
        let mut progress = self.state.progress();
        while progress.done < progress.queued {
            progress = self.state.wait(progress);
        }
    }

    /// The first failure, if sealing ever failed.
    pub(crate) fn error(&self) -> Option<String> {
        self.state.progress().error.clone()
    }

    /// Whether a sealing thread is at work now.
    #[cfg(test)]
    pub(crate) fn is_running(&self) -> bool {
        self.state.progress().running
    }

    /// Seals what is queued and ends the thread.
    pub(crate) fn finish(&mut self) {
        self.wait_idle();
        if let Some(thread) = self.thread.take() {
            self.join(thread);
        }
    }

    fn join(&self, thread: JoinHandle<()>) {
        if thread.join().is_err() {
            self.state
                .progress()
                .error
                .get_or_insert_with(|| "the sealer thread panicked".into());
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Syncs a segment's files, then flags it durable. The flag must not reach the disk
/// before the data it vouches for, hence the sync in between.
pub(crate) fn seal_now(files: &SegmentFiles) -> Result<()> {
    files.store.sync_data().at(&files.store_path)?;
    files.index.sync_data().at(&files.index_path)?;
    set_durable(files, true)?;
    files.index.sync_data().at(&files.index_path)
}

/// Sets or clears the durable flag in a segment's index header.
pub(crate) fn set_durable(files: &SegmentFiles, durable: bool) -> Result<()> {
    if durable {
        // Synced whole: every entry vouches for its record too.
        update_flags(files, format::FLAG_DURABLE | format::FLAG_VOUCHED, 0)
    } else {
        update_flags(files, 0, format::FLAG_DURABLE)
    }
}

/// Sets the flags in `set` and clears those in `clear` in a segment's index header,
/// keeping the others.
pub(crate) fn update_flags(files: &SegmentFiles, set: u8, clear: u8) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut flags = [0u8];
    files
        .index
        .read_exact_at(&mut flags, format::INDEX_FLAGS_POSITION)
        .at(&files.index_path)?;
    let updated = (flags[0] | set) & !clear;
    if updated == flags[0] {
        return Ok(());
    }
    files
        .index
        .write_all_at(&[updated], format::INDEX_FLAGS_POSITION)
        .at(&files.index_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sealing_thread_should_run_only_while_segments_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sealer = Sealer::new();
        assert!(!sealer.is_running(), "no thread before the first roll");
        for base in [0, 10, 20] {
            let files = crate::files::create_segment(dir.path(), base).expect("segment");
            sealer.seal(files);
        }
        sealer.wait_idle();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sealer.is_running() {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread never ended"
            );
            std::thread::yield_now();
        }
        assert!(sealer.error().is_none());
        let index = std::fs::read(dir.path().join("00000000000000000010.index")).expect("index");
        assert!(format::is_durable(&index), "sealed and flagged");
        sealer.finish();
    }
}
