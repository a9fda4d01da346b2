//! The contract every commit log implementation keeps.

use std::ops::Range;

use crate::{Offset, Record, Result};

/// An append-only sequence of records addressed by dense offsets.
///
/// The contract, which the `testing` module (feature `testing`) checks for any
/// implementation:
///
/// - **Offsets** are dense and increasing: an append gets [`next_offset`], and
///   `next_offset` grows by one per record. Records in `lowest_offset()..next_offset()`
///   are readable; every other offset is [`LogError::OffsetOutOfRange`], which names the
///   valid range.
/// - **Batches** are appended in order and get a contiguous range. A batch with a
///   record over the size limit is rejected whole with [`LogError::RecordTooLarge`],
///   and nothing of it is appended.
/// - **Durability** follows the implementation's sync policy; after [`sync`] returns,
///   every appended record survives a crash.
/// - **Chunked reads** return records in offset order starting at `from`, at most
///   `max_bytes` of values in all, but always at least one record when `from` is
///   below `next_offset()`, so a record larger than the budget is never stuck. An
///   empty chunk means `from == next_offset()`.
/// - **Truncation**: [`truncate_prefix`] drops whole units of old records (for a
///   segmented log, whole segments), never a record at or after `before`;
///   [`truncate_suffix`] drops exactly the records from `from` on, after which appends
///   reuse those offsets.
///
/// [`next_offset`]: CommitLog::next_offset
/// [`sync`]: CommitLog::sync
/// [`truncate_prefix`]: CommitLog::truncate_prefix
/// [`truncate_suffix`]: CommitLog::truncate_suffix
/// [`LogError::OffsetOutOfRange`]: crate::LogError::OffsetOutOfRange
/// [`LogError::RecordTooLarge`]: crate::LogError::RecordTooLarge
pub trait CommitLog {
    /// Appends one record and returns its offset.
    ///
    /// # Errors
    ///
    /// `RecordTooLarge` for a value over the limit; I/O failures.
    fn append(&mut self, value: &[u8]) -> Result<Offset>;

    /// Appends records in order and returns their offsets. An empty batch returns
    /// the empty range at `next_offset()`.
    ///
    /// # Errors
    ///
    /// `RecordTooLarge` (nothing appended) for any value over the limit; I/O failures.
    fn append_batch(&mut self, values: &[&[u8]]) -> Result<Range<Offset>>;

    /// Reads the record at `offset`.
    ///
    /// # Errors
    ///
    /// `OffsetOutOfRange` outside `lowest_offset()..next_offset()`; `Corrupt` when the
    /// stored bytes fail their checks; I/O failures.
    fn read(&self, offset: Offset) -> Result<Record>;

    /// Reads records from `from` on, up to `max_bytes` of values (at least one record).
    ///
    /// # Errors
    ///
    /// As [`CommitLog::read`]; `from == next_offset()` is not an error but an empty chunk.
    fn read_chunk(&self, from: Offset, max_bytes: usize) -> Result<Vec<Record>>;

    /// The lowest offset still held.
    fn lowest_offset(&self) -> Offset;

    /// The offset the next append will get.
    fn next_offset(&self) -> Offset;

    /// Forces every appended record to durable storage.
    ///
    /// # Errors
    ///
    /// I/O failures.
    fn sync(&mut self) -> Result<()>;

    /// Drops old records below `before` in whole units; returns the new lowest offset,
    /// which is at most `before`.
    ///
    /// # Errors
    ///
    /// `OffsetOutOfRange` when `before > next_offset()`; I/O failures.
    fn truncate_prefix(&mut self, before: Offset) -> Result<Offset>;

    /// Drops every record at or after `from`; `next_offset()` becomes `from`.
    ///
    /// # Errors
    ///
    /// `OffsetOutOfRange` unless `lowest_offset() <= from <= next_offset()`; I/O failures.
    fn truncate_suffix(&mut self, from: Offset) -> Result<()>;
}
