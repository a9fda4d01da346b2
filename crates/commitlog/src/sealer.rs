//! The sealer: a background thread that makes sealed segments durable.
//!
//! When the active segment rolls, the writer hands the old one to the sealer and
//! goes on appending. The sealer syncs the store and the index, then sets the
//! *durable* flag in the index header and syncs it again. Recovery trusts a flagged
//! segment (damage in it is corruption); an unflagged sealed segment may have been
//! cut short by a crash and is scanned and, if torn, cut like an active one.
//!
//! The queue holds [`QUEUE`] segments; a writer that outruns the disk by more than
//! that waits at its next roll, which bounds how much sealed data is at risk.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::{IoContext, Result};
use crate::format;
use crate::segment::SegmentFiles;

/// Segments that may wait to be sealed before a roll blocks.
const QUEUE: usize = 2;

#[derive(Debug, Default)]
struct Progress {
    queued: u64,
    done: u64,
    error: Option<String>,
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
}

#[derive(Debug)]
pub(crate) struct Sealer {
    jobs: Option<SyncSender<SegmentFiles>>,
    thread: Option<JoinHandle<()>>,
    state: Arc<State>,
}

impl Sealer {
    pub(crate) fn start(dir: &std::path::Path) -> Result<Self> {
        let (jobs, queue) = mpsc::sync_channel::<SegmentFiles>(QUEUE);
        let state = Arc::new(State::default());
        let worker = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("keel-sealer".into())
            .spawn(move || {
                for files in queue {
                    let result = seal_now(&files);
                    let mut progress = worker.progress();
                    progress.done += 1;
                    if let Err(err) = result {
                        tracing::error!(store = %files.store_path.display(), error = %err, "sealing segment failed");
                        progress.error.get_or_insert_with(|| format!("sealing {} failed: {err}", files.store_path.display()));
                    }
                    worker.changed.notify_all();
                }
            })
            .at(dir)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            state,
        })
    }

    /// Queues a segment whose index is fully written; blocks while the queue is full.
    pub(crate) fn seal(&self, files: SegmentFiles) {
        self.state.progress().queued += 1;
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(files).is_ok());
        if !sent {
            let mut progress = self.state.progress();
            progress.done += 1;
            progress
                .error
                .get_or_insert_with(|| "the sealer thread has stopped".into());
        }
    }

    /// Waits until every queued segment is sealed.
    pub(crate) fn wait_idle(&self) {
        let mut progress = self.state.progress();
        while progress.done < progress.queued {
            progress = self
                .state
                .changed
                .wait(progress)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The first failure, if sealing ever failed.
    pub(crate) fn error(&self) -> Option<String> {
        self.state.progress().error.clone()
    }

    /// Seals what is queued and stops the thread.
    pub(crate) fn finish(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
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
    use std::os::unix::fs::FileExt;
    let flags = if durable { format::FLAG_DURABLE } else { 0 };
    files
        .index
        .write_all_at(&[flags], format::INDEX_FLAGS_POSITION)
        .at(&files.index_path)
}
