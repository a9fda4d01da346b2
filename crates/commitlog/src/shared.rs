//! The state the writer shares with every reader: the segment list and the next
//! offset.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use crate::error::{LogError, Result};
use crate::segment::Segment;
use crate::{Offset, Record};

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    /// Oldest first; the last one is the active segment. Never empty. Held only long
    /// enough to find or swap a segment, never across I/O.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Published after the records below it are readable.
    next: AtomicU64,
    /// Below this offset every record is durable, as far as a [`crate::Syncer`]
    /// knows. Held across a sync and across a truncation, so the two take turns.
    durable: Mutex<Offset>,
    /// Why a sync from another thread failed; the writer then refuses writes.
    failure: OnceLock<String>,
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, segments: Vec<Arc<Segment>>, next: Offset) -> Self {
        let lowest = segments.first().map_or(next, |segment| segment.base());
        Self {
            dir,
            segments: RwLock::new(segments),
            next: AtomicU64::new(next),
            durable: Mutex::new(lowest),
            failure: OnceLock::new(),
        }
    }

    pub(crate) fn segments(&self) -> RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn segments_mut(&self) -> RwLockWriteGuard<'_, Vec<Arc<Segment>>> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn next(&self) -> Offset {
        self.next.load(Ordering::Acquire)
    }

    /// The durable mark; see [`crate::Syncer`].
    pub(crate) fn durable(&self) -> MutexGuard<'_, Offset> {
        self.durable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the log failed (the first reason wins).
    pub(crate) fn fail(&self, reason: String) {
        let _ = self.failure.set(reason);
    }

    /// Why a sync from another thread failed, if one did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    pub(crate) fn set_next(&self, next: Offset) {
        self.next.store(next, Ordering::Release);
    }

    pub(crate) fn lowest(&self) -> Offset {
        let next = self.next();
        self.segments()
            .first()
            .map_or(next, |segment| segment.base())
    }

    fn out_of_range(&self, offset: Offset) -> LogError {
        LogError::OffsetOutOfRange {
            offset,
            lowest: self.lowest(),
            next: self.next(),
        }
    }

    fn segment_for(&self, offset: Offset) -> Result<Arc<Segment>> {
        let next = self.next();
        let segments = self.segments();
        let lowest = segments.first().map_or(next, |segment| segment.base());
        if offset < lowest || offset >= next {
            return Err(LogError::OffsetOutOfRange {
                offset,
                lowest,
                next,
            });
        }
        let at = segments.partition_point(|segment| segment.base() <= offset);
        Ok(Arc::clone(&segments[at - 1]))
    }

    /// A segment reports ranges of its own; callers want the log's.
    fn global_range(&self, err: LogError) -> LogError {
        match err {
            LogError::OffsetOutOfRange { offset, .. } => self.out_of_range(offset),
            other => other,
        }
    }

    pub(crate) fn read(&self, offset: Offset) -> Result<Record> {
        self.segment_for(offset)?
            .read(offset)
            .map_err(|err| self.global_range(err))
    }

    pub(crate) fn read_chunk(&self, from: Offset, max_bytes: usize) -> Result<Vec<Record>> {
        // `next` bounds what readers see: the active segment publishes records a
        // moment before `next` moves past them, and a chunk must never run ahead of
        // the next offset its reader can observe.
        let next = self.next();
        if from == next {
            return Ok(Vec::new());
        }
        self.segment_for(from)?
            .read_chunk(from, max_bytes, next)
            .map_err(|err| self.global_range(err))
    }
}
