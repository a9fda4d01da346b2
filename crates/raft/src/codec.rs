//! The byte layout of a Raft log entry: one commit log record per entry, and the same
//! bytes on the wire between nodes.
//!
//! ```text
//!  kind  u8      0 blank, 1 command, 2 membership
//!  term  u64 LE  the term of the leader that made the entry
//!  node  u64 LE  that leader's node id
//!  index u64 LE  the entry's index (also its offset in the commit log)
//!  payload       command: the command's bytes; membership: JSON; blank: nothing
//! ```
//!
//! The commit log frames and checksums each record; this layout adds nothing of its
//! own for integrity.

use bytes::{Buf, Bytes};
use openraft::EntryPayload;

use crate::error::RaftStoreError;
use crate::{Command, Entry, LogId};

const BLANK: u8 = 0;
const COMMAND: u8 = 1;
const MEMBERSHIP: u8 = 2;

/// The bytes before the payload.
const HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// The encoding of `entry`.
pub(crate) fn to_bytes(entry: &Entry) -> Result<Vec<u8>, RaftStoreError> {
    let (kind, payload_len) = match &entry.payload {
        EntryPayload::Blank => (BLANK, 0),
        EntryPayload::Normal(command) => (COMMAND, command.0.len()),
        EntryPayload::Membership(_) => (MEMBERSHIP, 128),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.push(kind);
    out.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&entry.log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(&entry.log_id.index.to_le_bytes());
    match &entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(command) => out.extend_from_slice(&command.0),
        EntryPayload::Membership(membership) => serde_json::to_writer(&mut out, membership)
            .map_err(|err| RaftStoreError::BadEntry {
                index: entry.log_id.index,
                reason: format!("cannot encode its membership: {err}"),
            })?,
    }
    Ok(out)
}

/// Decodes an entry; `at` is where it was found (its expected index), for errors.
/// A command's bytes share `bytes`' buffer.
pub(crate) fn decode(at: u64, mut bytes: Bytes) -> Result<Entry, RaftStoreError> {
    let bad = |reason: String| RaftStoreError::BadEntry { index: at, reason };
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "{} bytes, shorter than an entry header",
            bytes.len()
        )));
    }
    let kind = bytes.get_u8();
    let term = bytes.get_u64_le();
    let node = bytes.get_u64_le();
    let index = bytes.get_u64_le();
    if index != at {
        return Err(bad(format!("it says it is entry {index}")));
    }
    let log_id = LogId::new(openraft::CommittedLeaderId::new(term, node), index);
    let payload = match kind {
        BLANK => EntryPayload::Blank,
        COMMAND => EntryPayload::Normal(Command(bytes)),
        MEMBERSHIP => EntryPayload::Membership(
            serde_json::from_slice(&bytes)
                .map_err(|err| bad(format!("its membership does not parse: {err}")))?,
        ),
        other => return Err(bad(format!("unknown kind {other}"))),
    };
    Ok(Entry { log_id, payload })
}

/// Decodes an entry wherever it was found (one received from another node).
pub(crate) fn decode_any(bytes: Bytes) -> Result<Entry, RaftStoreError> {
    const INDEX_AT: usize = 1 + 8 + 8;
    let index = bytes
        .get(INDEX_AT..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    decode(index, bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::Node;

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, node), index)
    }

    #[test]
    fn every_kind_of_entry_should_decode_to_what_was_encoded() {
        let nodes: BTreeMap<u64, Node> = (1..=3)
            .map(|id| (id, Node::new(format!("127.0.0.1:{}", 7000 + id))))
            .collect();
        let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        let entries = [
            Entry {
                log_id: log_id(1, 2, 0),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(7, 3, 41),
                payload: EntryPayload::Normal(Command(Bytes::from_static(b"hello\0world"))),
            },
            Entry {
                log_id: log_id(u64::MAX, u64::MAX, u64::MAX),
                payload: EntryPayload::Normal(Command(Bytes::new())),
            },
            Entry {
                log_id: log_id(2, 1, 5),
                payload: EntryPayload::Membership(membership),
            },
        ];
        for entry in entries {
            let bytes = to_bytes(&entry).expect("encode");
            let back = decode(entry.log_id.index, Bytes::from(bytes)).expect("decode");
            assert_eq!(back, entry);
        }
    }

    #[test]
    fn damaged_entries_should_be_refused_naming_what_is_wrong() {
        let entry = Entry {
            log_id: log_id(1, 1, 9),
            payload: EntryPayload::Blank,
        };
        let bytes = Bytes::from(to_bytes(&entry).expect("encode"));
        let short = decode(9, bytes.slice(..10)).unwrap_err().to_string();
        assert!(short.contains("shorter than an entry header"), "{short}");
        let misplaced = decode(10, bytes.clone()).unwrap_err().to_string();
        assert!(misplaced.contains("it says it is entry 9"), "{misplaced}");
        let mut unknown = bytes.to_vec();
        unknown[0] = 9;
        let unknown = decode(9, Bytes::from(unknown)).unwrap_err().to_string();
        assert!(unknown.contains("unknown kind 9"), "{unknown}");
    }
}
