//! keel's storage engine: a durable, segmented, append-only log of records.
//!
//! A [`Log`] lives in one directory. Records get dense `u64` offsets; each segment
//! is a store file of framed, checksummed records and an index file of their
//! positions, both named by the segment's first offset:
//!
//! ```text
//!  dir/
//!    LOCK                          held while a Log has the directory open
//!    00000000000000000000.log      sealed: synced, immutable
//!    00000000000000000000.index
//!    00000000000000052133.log      active: the writer appends here
//!    00000000000000052133.index    (trails the store; rebuilt on open if short)
//!
//!  append ──> encode frames ──> one write ──> sync (policy) ──> publish ──> readers
//! ```
//!
//! - **One writer, many readers.** Writes take `&mut Log`; [`Reader`] handles read
//!   from any thread and never wait for the writer's I/O.
//! - **Durability** follows [`SyncPolicy`]; group commit is
//!   [`Log::append_batch`]: one write and one sync for many records.
//! - **Recovery** on open cuts a torn tail to the longest valid prefix, rebuilds
//!   damaged indexes, and says what it did in a [`RecoveryReport`]. Damage inside
//!   sealed data is a [`LogError::Corrupt`] naming file and position, never garbage.
//! - **Retention** drops whole old segments by total size or age ([`Retention`]).
//!
//! The byte layout is specified in `docs/commitlog-format.md`.
//!
//! This crate owns the files of one log and nothing else: no async runtime, no
//! network, no notion of topics. Each `Log` runs one helper thread, the sealer, which
//! syncs segments after they roll so the writer never stalls on it; the caller
//! drives time-based work ([`Log::apply_retention`], [`Log::sync`]).

mod commit_log;
mod config;
mod error;
mod fault;
mod files;
mod format;
mod log;
mod reader;
mod record;
mod recovery;
mod scan;
mod sealer;
mod segment;
mod shared;
mod syncer;
#[cfg(feature = "testing")]
pub mod testing;

pub use commit_log::CommitLog;
pub use config::{LogConfig, ParseError, Retention, SyncPolicy, parse_size};
pub use error::{Corruption, LogError, Result};
#[cfg(feature = "testing")]
pub use fault::{SyncFaults, fail_syncs_under, synced_dirs_under};
pub use files::create_dir_durably;
pub use log::Log;
pub use reader::{Cursor, Reader};
pub use record::Record;
pub use recovery::{IndexProblem, IndexRebuild, RecoveryReport, Truncation};
pub use syncer::Syncer;

/// The position of a record in a log.
pub type Offset = u64;
