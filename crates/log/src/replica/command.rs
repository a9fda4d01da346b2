//! The commands the replicated topics apply, and their replies, in a compact binary
//! form (little-endian). A command appends to one topic the records of one or more
//! requests, each answered on its own:
//!
//! ```text
//! command: version u8 (1) | kind u8 (1 = append) | timestamp_ms u64 | topic_len u16 | topic
//!          | requests u32 | per request: producer u64 (0: none) | sequence u64 | records u32
//!          | per record, in request order: len u32 | value
//! reply:   requests u32 | per request: status u8 | start u64 | end u64
//!          status 0: appended at start..end; 1: a duplicate of the append at start..end;
//!          2: refused, the sequence is older than the producer's window (end: the
//!          latest sequence seen)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use keel_commitlog::Offset;
use std::ops::Range;

const VERSION: u8 = 1;
const APPEND: u8 = 1;

/// A producer's tag on an append: who, and the how-manieth of its appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ProducerSeq {
    /// Not 0 (0 means untagged).
    pub(crate) producer: u64,
    pub(crate) sequence: u64,
}

/// One request of an append command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) tag: Option<ProducerSeq>,
    pub(crate) values: Vec<Bytes>,
}

/// Appends to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Append {
    pub(crate) timestamp_ms: u64,
    pub(crate) topic: String,
    pub(crate) requests: Vec<Request>,
}

/// How one request of an append was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Appended(Range<Offset>),
    Duplicate(Range<Offset>),
    /// The sequence is older than the producer's remembered window; `latest` is the
    /// newest sequence it has appended.
    TooOld {
        latest: u64,
    },
}

/// Why command or reply bytes do not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {reason}")]
pub(crate) struct Malformed {
    what: &'static str,
    reason: String,
}

fn malformed(what: &'static str, reason: impl Into<String>) -> Malformed {
    Malformed {
        what,
        reason: reason.into(),
    }
}

impl Append {
    pub(crate) fn encode(&self) -> Bytes {
        let values: usize = self
            .requests
            .iter()
            .flat_map(|r| r.values.iter())
            .map(|v| 4 + v.len())
            .sum();
        let mut out =
            BytesMut::with_capacity(16 + self.topic.len() + 20 * self.requests.len() + values);
        out.put_u8(VERSION);
        out.put_u8(APPEND);
        out.put_u64_le(self.timestamp_ms);
        out.put_u16_le(self.topic.len() as u16);
        out.put_slice(self.topic.as_bytes());
        out.put_u32_le(self.requests.len() as u32);
        for request in &self.requests {
            let (producer, sequence) = request
                .tag
                .map_or((0, 0), |tag| (tag.producer, tag.sequence));
            out.put_u64_le(producer);
            out.put_u64_le(sequence);
            out.put_u32_le(request.values.len() as u32);
        }
        for value in self.requests.iter().flat_map(|r| r.values.iter()) {
            out.put_u32_le(value.len() as u32);
            out.put_slice(value);
        }
        out.freeze()
    }

    /// Decodes a command; values share `bytes`' buffer.
    pub(crate) fn decode(mut bytes: Bytes) -> Result<Self, Malformed> {
        const WHAT: &str = "append command";
        let need = |bytes: &Bytes, n: usize| {
            if bytes.remaining() < n {
                Err(malformed(
                    WHAT,
                    format!("ends early ({} bytes left, {n} needed)", bytes.remaining()),
                ))
            } else {
                Ok(())
            }
        };
        need(&bytes, 12)?;
        let version = bytes.get_u8();
        let kind = bytes.get_u8();
        if version != VERSION || kind != APPEND {
            return Err(malformed(WHAT, format!("version {version}, kind {kind}")));
        }
        let timestamp_ms = bytes.get_u64_le();
        let topic_len = bytes.get_u16_le() as usize;
        need(&bytes, topic_len + 4)?;
        let topic = String::from_utf8(bytes.split_to(topic_len).to_vec())
            .map_err(|_| malformed(WHAT, "topic is not UTF-8"))?;
        let count = bytes.get_u32_le() as usize;
        need(&bytes, count.saturating_mul(20))?;
        let mut heads = Vec::with_capacity(count);
        for _ in 0..count {
            let producer = bytes.get_u64_le();
            let sequence = bytes.get_u64_le();
            let records = bytes.get_u32_le() as usize;
            let tag = (producer != 0).then_some(ProducerSeq { producer, sequence });
            heads.push((tag, records));
        }
        let mut requests = Vec::with_capacity(count);
        for (tag, records) in heads {
            let mut values = Vec::with_capacity(records.min(bytes.remaining() / 4));
            for _ in 0..records {
                need(&bytes, 4)?;
                let len = bytes.get_u32_le() as usize;
                need(&bytes, len)?;
                values.push(bytes.split_to(len));
            }
            requests.push(Request { tag, values });
        }
        if bytes.has_remaining() {
            return Err(malformed(
                WHAT,
                format!("{} bytes past the end", bytes.remaining()),
            ));
        }
        Ok(Self {
            timestamp_ms,
            topic,
            requests,
        })
    }
}

pub(crate) fn encode_reply(outcomes: &[Outcome]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + 17 * outcomes.len());
    out.put_u32_le(outcomes.len() as u32);
    for outcome in outcomes {
        let (status, start, end) = match outcome {
            Outcome::Appended(range) => (0, range.start, range.end),
            Outcome::Duplicate(range) => (1, range.start, range.end),
            Outcome::TooOld { latest } => (2, 0, *latest),
        };
        out.put_u8(status);
        out.put_u64_le(start);
        out.put_u64_le(end);
    }
    out.freeze()
}

pub(crate) fn decode_reply(mut bytes: Bytes) -> Result<Vec<Outcome>, Malformed> {
    const WHAT: &str = "append reply";
    if bytes.remaining() < 4 {
        return Err(malformed(WHAT, "shorter than its count"));
    }
    let count = bytes.get_u32_le() as usize;
    if bytes.remaining() != count.saturating_mul(17) {
        return Err(malformed(
            WHAT,
            format!("{} bytes for {count} outcomes", bytes.remaining()),
        ));
    }
    let mut outcomes = Vec::with_capacity(count);
    for _ in 0..count {
        let status = bytes.get_u8();
        let start = bytes.get_u64_le();
        let end = bytes.get_u64_le();
        outcomes.push(match status {
            0 => Outcome::Appended(start..end),
            1 => Outcome::Duplicate(start..end),
            2 => Outcome::TooOld { latest: end },
            other => return Err(malformed(WHAT, format!("status {other}"))),
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_should_decode_to_what_was_encoded() {
        let append = Append {
            timestamp_ms: 1_700_000_000_123,
            topic: "orders".into(),
            requests: vec![
                Request {
                    tag: Some(ProducerSeq {
                        producer: 7,
                        sequence: 42,
                    }),
                    values: vec![Bytes::from_static(b"a"), Bytes::new()],
                },
                Request {
                    tag: None,
                    values: vec![Bytes::from(vec![9u8; 1000])],
                },
            ],
        };
        assert_eq!(Append::decode(append.encode()).expect("decodes"), append);
        let outcomes = vec![
            Outcome::Appended(3..5),
            Outcome::Duplicate(0..1),
            Outcome::TooOld { latest: 99 },
        ];
        assert_eq!(
            decode_reply(encode_reply(&outcomes)).expect("decodes"),
            outcomes
        );
    }

    #[test]
    fn truncated_or_padded_commands_should_be_refused() {
        let bytes = Append {
            timestamp_ms: 1,
            topic: "t".into(),
            requests: vec![Request {
                tag: None,
                values: vec![Bytes::from_static(b"hello")],
            }],
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(Append::decode(bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.to_vec();
        padded.push(0);
        assert!(Append::decode(Bytes::from(padded)).is_err());
    }
}
