//! A record as read back from a log.

use bytes::Bytes;

use crate::Offset;

/// One record read from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's place in the log.
    pub offset: Offset,
    /// When the record was appended, in milliseconds since the Unix epoch. Never
    /// smaller than the timestamp of the record before it.
    pub timestamp_ms: u64,
    /// The bytes that were appended. Cheap to clone; records read in one chunk share
    /// one buffer.
    pub value: Bytes,
}
