//! The one error type of the storage engine.

use std::io;
use std::path::PathBuf;

use crate::Offset;

/// Every way an operation on a commit log can fail.
///
/// Expected outcomes a caller reacts to ([`LogError::OffsetOutOfRange`],
/// [`LogError::RecordTooLarge`]) are separate from faults an operator must look at
/// ([`LogError::Corrupt`], [`LogError::Io`], [`LogError::Failed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The offset is not in the log: below the lowest retained offset, or at or past
    /// the next offset to be written.
    #[error("offset {offset} is out of range: the log holds offsets {lowest}..{next}")]
    OffsetOutOfRange {
        /// The offset that was asked for.
        offset: Offset,
        /// The lowest offset the log still holds.
        lowest: Offset,
        /// The offset the next append will get.
        next: Offset,
    },

    /// A record is larger than the configured `max_record_bytes`.
    #[error("record of {len} bytes is larger than the limit of {max} bytes (max_record_bytes)")]
    RecordTooLarge {
        /// The size of the record's value in bytes.
        len: usize,
        /// The configured limit.
        max: u32,
    },

    /// Data on disk fails a check (magic, version, checksum, offset, index entry).
    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        /// The file that holds the bad data.
        path: PathBuf,
        /// The byte position in that file where the bad data starts.
        position: u64,
        /// What check failed.
        reason: Corruption,
    },

    /// An I/O operation on a file or directory of the log failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Another process (or another `Log` in this one) has the directory open.
    #[error("log directory {} is locked by another process", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// A configuration value is out of its allowed range.
    #[error("invalid commit log config: {field}: {message}")]
    InvalidConfig {
        /// The name of the offending field.
        field: &'static str,
        /// What is wrong and what to change.
        message: String,
    },

    /// An earlier write or sync failed in a way that leaves the on-disk state
    /// unknown; the log refuses further writes until it is reopened (which runs
    /// recovery). Reads keep working.
    #[error("the log refuses writes after an earlier failure ({reason}); reopen it to recover")]
    Failed {
        /// A description of the original failure.
        reason: String,
    },
}

/// The check that bad data on disk failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The file does not start with the expected magic bytes.
    #[error("bad magic bytes {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The file header names a format version this build does not know.
    #[error("unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// The file header's base offset disagrees with the file name.
    #[error("header base offset {found} does not match the file name's {expected}")]
    BaseMismatch {
        /// The base offset from the file name.
        expected: Offset,
        /// The base offset in the header.
        found: Offset,
    },
    /// The file is shorter than its header.
    #[error("file is shorter than its {len}-byte header")]
    ShortHeader {
        /// The header length.
        len: u64,
    },
    /// A record frame runs past the end of the file.
    #[error("record frame of {len} bytes runs past the end of the file")]
    TruncatedFrame {
        /// The frame length the header claims.
        len: u64,
    },
    /// A record's checksum does not match its bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The CRC32C stored in the frame.
        stored: u32,
        /// The CRC32C of the bytes read.
        computed: u32,
    },
    /// A record frame carries another offset than its place in the log.
    #[error("record carries offset {found}, expected {expected}")]
    OffsetMismatch {
        /// The offset the record should have.
        expected: Offset,
        /// The offset in the frame.
        found: Offset,
    },
    /// A record claims a length larger than any record the log accepts.
    #[error("length {len} exceeds the format's limit")]
    LengthLimit {
        /// The claimed value length.
        len: u64,
    },
    /// An index entry is not the one expected at its slot.
    #[error(
        "index entry {slot} is ({relative}, {position}); delete the index file to rebuild it on the next open"
    )]
    BadIndexEntry {
        /// The entry's slot in the index.
        slot: u64,
        /// The relative offset the entry holds.
        relative: u32,
        /// The store position the entry holds.
        position: u32,
    },
    /// A segment holds fewer records than its index lists, or than its successor's
    /// base implies.
    #[error("segment ends after {found} records, expected {expected}")]
    MissingRecords {
        /// The records the segment should hold.
        expected: u64,
        /// The valid records found.
        found: u64,
    },
    /// A sealed segment's store has bytes after its last record.
    #[error("{len} bytes follow the segment's last record")]
    TrailingBytes {
        /// How many bytes.
        len: u64,
    },
}

/// The result type of this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the path it happened on.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
