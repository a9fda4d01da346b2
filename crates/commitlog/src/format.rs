//! The bytes on disk: file headers, record frames and index entries.
//!
//! This module is the single source of truth for the layout that
//! `docs/commitlog-format.md` specifies; nothing else in the crate computes a byte
//! position of the format by hand.
//!
//! ```text
//! store file:  header(16) frame frame frame ...
//! frame:       crc32c u32 | len u32 | offset u64 | timestamp_ms u64 | value[len]
//!              (little-endian; the CRC covers every byte after itself)
//! index file:  header(16) entry entry entry ...
//! entry:       relative offset u32 | store position u32
//! ```

use crate::Offset;
use crate::error::Corruption;

/// The format version this build writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Length of the header at the start of both files.
pub(crate) const HEADER_LEN: u64 = 16;
/// Magic bytes of a store file.
pub(crate) const STORE_MAGIC: [u8; 4] = *b"KLST";
/// Magic bytes of an index file.
pub(crate) const INDEX_MAGIC: [u8; 4] = *b"KLIX";
/// Length of a record frame's header (everything before the value).
pub(crate) const FRAME_HEADER_LEN: usize = 24;
/// Length of one index entry.
pub(crate) const INDEX_ENTRY_LEN: u64 = 8;
/// The largest value the format allows, whatever the configuration says.
pub(crate) const MAX_VALUE_LEN: u32 = 256 * 1024 * 1024;
/// Byte of the index header that holds its flags.
pub(crate) const INDEX_FLAGS_POSITION: u64 = 5;
/// Index flag: the segment was synced when it was sealed, and is complete.
pub(crate) const FLAG_DURABLE: u8 = 1;

/// Index flag: every entry in the index was written after its record was synced,
/// so an entry vouches for its record (kept by a writer under the `always` policy).
pub(crate) const FLAG_VOUCHED: u8 = 2;

/// Whether an index header (already checked) carries the vouched flag.
pub(crate) fn is_vouched(header: &[u8]) -> bool {
    header
        .get(INDEX_FLAGS_POSITION as usize)
        .is_some_and(|flags| flags & FLAG_VOUCHED != 0)
}

/// Whether an index header (already checked) carries the durable flag.
pub(crate) fn is_durable(header: &[u8]) -> bool {
    header
        .get(INDEX_FLAGS_POSITION as usize)
        .is_some_and(|flags| flags & FLAG_DURABLE != 0)
}

/// The 16-byte header of a store or index file.
pub(crate) fn encode_header(magic: [u8; 4], base: Offset) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[0..4].copy_from_slice(&magic);
    header[4] = VERSION;
    header[8..16].copy_from_slice(&base.to_le_bytes());
    header
}

/// Checks a file header against the magic and the base offset from the file name.
pub(crate) fn check_header(bytes: &[u8], magic: [u8; 4], base: Offset) -> Result<(), Corruption> {
    let Some(bytes) = bytes.get(..HEADER_LEN as usize) else {
        return Err(Corruption::ShortHeader { len: HEADER_LEN });
    };
    let found: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found != magic {
        return Err(Corruption::BadMagic { found });
    }
    if bytes[4] != VERSION {
        return Err(Corruption::UnsupportedVersion {
            found: bytes[4],
            supported: VERSION,
        });
    }
    let header_base = read_u64(&bytes[8..16]);
    if header_base != base {
        return Err(Corruption::BaseMismatch {
            expected: base,
            found: header_base,
        });
    }
    Ok(())
}

/// The length of the frame that holds a value of `value_len` bytes.
pub(crate) fn frame_len(value_len: usize) -> u64 {
    (FRAME_HEADER_LEN + value_len) as u64
}

/// Appends the frame of one record to `buf`.
pub(crate) fn encode_frame(buf: &mut Vec<u8>, offset: Offset, timestamp_ms: u64, value: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    buf.extend_from_slice(value);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A frame decoded in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub(crate) offset: Offset,
    pub(crate) timestamp_ms: u64,
    pub(crate) value: &'a [u8],
}

impl Frame<'_> {
    /// The length of the whole frame in bytes.
    pub(crate) fn len(&self) -> u64 {
        frame_len(self.value.len())
    }
}

/// Why a frame could not be decoded from a byte slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The slice ends before the frame does; `frame_len` is known once the length
    /// field was readable.
    Incomplete { frame_len: Option<u64> },
    /// The bytes are not a valid frame for the expected offset.
    Corrupt(Corruption),
}

/// Decodes the frame at the start of `bytes`, which must carry `expected` as offset.
pub(crate) fn decode_frame(bytes: &[u8], expected: Offset) -> Result<Frame<'_>, FrameError> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Incomplete { frame_len: None });
    }
    let stored = read_u32(&bytes[0..4]);
    let len = read_u32(&bytes[4..8]);
    if len > MAX_VALUE_LEN {
        return Err(FrameError::Corrupt(Corruption::LengthLimit {
            len: len.into(),
        }));
    }
    let total = frame_len(len as usize);
    let Some(frame) = bytes.get(..total as usize) else {
        return Err(FrameError::Incomplete {
            frame_len: Some(total),
        });
    };
    let computed = crc32c::crc32c(&frame[4..]);
    if computed != stored {
        return Err(FrameError::Corrupt(Corruption::Checksum {
            stored,
            computed,
        }));
    }
    let offset = read_u64(&frame[8..16]);
    if offset != expected {
        return Err(FrameError::Corrupt(Corruption::OffsetMismatch {
            expected,
            found: offset,
        }));
    }
    Ok(Frame {
        offset,
        timestamp_ms: read_u64(&frame[16..24]),
        value: &frame[FRAME_HEADER_LEN..],
    })
}

/// Appends one index entry to `buf`.
pub(crate) fn encode_index_entry(buf: &mut Vec<u8>, relative: u32, position: u32) {
    buf.extend_from_slice(&relative.to_le_bytes());
    buf.extend_from_slice(&position.to_le_bytes());
}

/// Decodes the index entry in `bytes` (at least [`INDEX_ENTRY_LEN`] long).
pub(crate) fn decode_index_entry(bytes: &[u8]) -> (u32, u32) {
    (read_u32(&bytes[0..4]), read_u32(&bytes[4..8]))
}

/// The byte position of index entry `slot` in an index file.
pub(crate) fn index_entry_position(slot: u64) -> u64 {
    HEADER_LEN + slot * INDEX_ENTRY_LEN
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(raw)
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        // Fuzzing the frame decoder: any bytes, whole frames damaged or not, never a
        // panic, and a frame found is within the bytes and carries the offset asked
        // for. `PROPTEST_CASES=10000000` runs it long by hand.
        #![proptest_config(ProptestConfig { cases: cases(2000), ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_should_decode_to_a_frame_within_them_or_an_error(
            value in proptest::collection::vec(any::<u8>(), 0..64),
            damage in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
            offset in 0u64..4,
        ) {
            let mut bytes = Vec::new();
            encode_frame(&mut bytes, 2, 1_700_000_000_000, &value);
            for (at, byte) in damage {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(frame) = decode_frame(&bytes, offset) {
                prop_assert!(frame.len() <= bytes.len() as u64);
                prop_assert_eq!(offset, 2);
            }
        }
    }

    /// `PROPTEST_CASES` when set (a long run by hand), else `default`: a config that
    /// names its cases would otherwise ignore the variable.
    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    }

    fn frame_of(offset: Offset, value: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(&mut buf, offset, 1_700_000_000_000, value);
        buf
    }

    #[test]
    fn given_encoded_frame_when_decoded_should_return_same_fields() {
        let buf = frame_of(42, b"hello");
        assert_eq!(buf.len() as u64, frame_len(5));
        let frame = decode_frame(&buf, 42).expect("valid frame");
        assert_eq!(frame.offset, 42);
        assert_eq!(frame.timestamp_ms, 1_700_000_000_000);
        assert_eq!(frame.value, b"hello");
        assert_eq!(frame.len(), buf.len() as u64);
    }

    #[test]
    fn given_frame_layout_should_match_the_documented_bytes() {
        let buf = frame_of(7, b"ab");
        assert_eq!(&buf[4..8], &2u32.to_le_bytes());
        assert_eq!(&buf[8..16], &7u64.to_le_bytes());
        assert_eq!(&buf[16..24], &1_700_000_000_000u64.to_le_bytes());
        assert_eq!(&buf[24..], b"ab");
        assert_eq!(&buf[0..4], &crc32c::crc32c(&buf[4..]).to_le_bytes());
    }

    #[test]
    fn given_empty_value_when_decoded_should_round_trip() {
        let buf = frame_of(0, b"");
        assert_eq!(decode_frame(&buf, 0).expect("valid").value, b"");
    }

    #[test]
    fn given_any_single_bit_flip_when_decoded_should_never_return_the_frame() {
        let buf = frame_of(3, b"some record value");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_frame(&bad, 3).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn given_every_prefix_when_decoded_should_be_incomplete() {
        let buf = frame_of(3, b"0123456789");
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    decode_frame(&buf[..cut], 3),
                    Err(FrameError::Incomplete { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn given_wrong_expected_offset_should_report_offset_mismatch() {
        let buf = frame_of(3, b"x");
        assert_eq!(
            decode_frame(&buf, 4),
            Err(FrameError::Corrupt(Corruption::OffsetMismatch {
                expected: 4,
                found: 3
            }))
        );
    }

    #[test]
    fn given_zeroed_bytes_when_decoded_should_be_corrupt() {
        let zeros = [0u8; 64];
        assert!(matches!(
            decode_frame(&zeros, 0),
            Err(FrameError::Corrupt(_))
        ));
    }

    #[test]
    fn given_header_when_checked_should_catch_each_mismatch() {
        let good = encode_header(STORE_MAGIC, 100);
        assert_eq!(check_header(&good, STORE_MAGIC, 100), Ok(()));
        assert!(matches!(
            check_header(&good, INDEX_MAGIC, 100),
            Err(Corruption::BadMagic { .. })
        ));
        assert!(matches!(
            check_header(&good, STORE_MAGIC, 101),
            Err(Corruption::BaseMismatch { .. })
        ));
        assert!(matches!(
            check_header(&good[..10], STORE_MAGIC, 100),
            Err(Corruption::ShortHeader { .. })
        ));
        let mut future = good;
        future[4] = VERSION + 1;
        assert!(matches!(
            check_header(&future, STORE_MAGIC, 100),
            Err(Corruption::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn durable_flag_should_live_in_header_byte_5_and_start_clear() {
        let mut header = encode_header(INDEX_MAGIC, 7);
        assert!(!is_durable(&header));
        header[INDEX_FLAGS_POSITION as usize] = FLAG_DURABLE;
        assert!(is_durable(&header));
        assert_eq!(
            check_header(&header, INDEX_MAGIC, 7),
            Ok(()),
            "flags do not break the header"
        );
        assert!(!is_durable(&header[..5]), "a short header is not durable");
    }

    #[test]
    fn given_index_entry_should_round_trip() {
        let mut buf = Vec::new();
        encode_index_entry(&mut buf, 9, 1234);
        assert_eq!(buf.len() as u64, INDEX_ENTRY_LEN);
        assert_eq!(decode_index_entry(&buf), (9, 1234));
        assert_eq!(index_entry_position(2), HEADER_LEN + 16);
    }
}
