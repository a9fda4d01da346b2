//! Read handles that other threads hold while the writer appends.

use std::sync::Arc;

use crate::shared::Shared;
use crate::{Offset, Record, Result};

/// A cheap, cloneable handle for reading a log from any thread.
///
/// Readers never wait for the writer's I/O: sealed segments are immutable, and the
/// active segment publishes its new records under a lock held for a memory copy. A
/// reader sees a record only once it is complete (and, under
/// [`crate::SyncPolicy::Always`], on disk).
#[derive(Debug, Clone)]
pub struct Reader {
    shared: Arc<Shared>,
}

impl Reader {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Reads the record at `offset`.
    ///
    /// # Errors
    ///
    /// [`crate::LogError::OffsetOutOfRange`] outside `lowest_offset()..next_offset()`;
    /// [`crate::LogError::Corrupt`] when the stored bytes fail their checks; I/O errors.
    pub fn read(&self, offset: Offset) -> Result<Record> {
        self.shared.read(offset)
    }

    /// Reads records from `from` on, in one read of at most `max_bytes` of the store
    /// (at least one whole record), stopping at the end of a segment. An empty chunk
    /// means `from` is the next offset.
    ///
    /// # Errors
    ///
    /// As [`Reader::read`].
    pub fn read_chunk(&self, from: Offset, max_bytes: usize) -> Result<Vec<Record>> {
        self.shared.read_chunk(from, max_bytes)
    }

    /// The lowest offset the log still holds.
    pub fn lowest_offset(&self) -> Offset {
        self.shared.lowest()
    }

    /// The offset the next append will get.
    pub fn next_offset(&self) -> Offset {
        self.shared.next()
    }

    /// Bytes of all store files together.
    pub fn size_bytes(&self) -> u64 {
        self.shared.segments().iter().map(|s| s.store_len()).sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.shared.segments().len()
    }

    /// A cursor that reads forward from `from` in chunks.
    pub fn cursor(&self, from: Offset) -> Cursor {
        Cursor {
            reader: self.clone(),
            position: from,
        }
    }
}

/// Iterates a log forward from an offset, a chunk at a time (for streaming
/// consumers).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let mut log = keel_commitlog::Log::open(dir.path(), Default::default())?;
/// log.append_batch(&[b"a", b"b", b"c"])?;
/// let mut cursor = log.reader().cursor(0);
/// let mut seen = Vec::new();
/// loop {
///     let chunk = cursor.next_chunk(64 * 1024)?;
///     if chunk.is_empty() {
///         break; // caught up: wait for new appends, then call again
///     }
///     seen.extend(chunk.into_iter().map(|record| record.value));
/// }
/// assert_eq!(seen, [&b"a"[..], b"b", b"c"]);
/// assert_eq!(cursor.position(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Cursor {
    reader: Reader,
    position: Offset,
}

impl Cursor {
    /// The offset the next chunk starts at.
    pub fn position(&self) -> Offset {
        self.position
    }

    /// Moves the cursor to `offset`.
    pub fn seek(&mut self, offset: Offset) {
        self.position = offset;
    }

    /// Reads the next chunk (see [`Reader::read_chunk`]) and moves past it. An empty
    /// chunk means the cursor has caught up with the writer.
    ///
    /// # Errors
    ///
    /// [`crate::LogError::OffsetOutOfRange`] when retention or truncation removed the
    /// cursor's position; otherwise as [`Reader::read`]. The position does not move
    /// on error.
    pub fn next_chunk(&mut self, max_bytes: usize) -> Result<Vec<Record>> {
        let chunk = self.reader.read_chunk(self.position, max_bytes)?;
        self.position += chunk.len() as u64;
        Ok(chunk)
    }
}
