//! Reading a store file frame by frame: what recovery, a suffix truncation and a
//! sealed segment's full check all do to find the valid records in a store.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::Offset;
use crate::error::{Corruption, IoContext, Result};
use crate::format::{self, FrameError, HEADER_LEN};

/// The result of reading a store file frame by frame.
#[derive(Debug)]
pub(crate) struct Scan {
    pub(crate) positions: Vec<u32>,
    /// End of the last valid frame.
    pub(crate) valid_end: u64,
    pub(crate) last_timestamp_ms: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub(crate) stop: Option<Corruption>,
}

const SCAN_BUFFER: usize = 1 << 20;

/// Reads `path` frame by frame from its header on, stopping at `limit` records, at
/// the end of the file, or at the first frame that is not valid.
pub(crate) fn scan_store(
    file: &File,
    path: &Path,
    base: Offset,
    store_len: u64,
    limit: Option<u64>,
) -> Result<Scan> {
    let mut scan = Scan {
        positions: Vec::new(),
        valid_end: HEADER_LEN,
        last_timestamp_ms: 0,
        stop: None,
    };
    let mut buf = vec![0u8; SCAN_BUFFER];
    // `buf[..filled]` holds the file's bytes from `buf_start` on.
    let mut buf_start = HEADER_LEN;
    let mut filled = 0usize;
    let mut at = 0usize;
    loop {
        if limit.is_some_and(|limit| scan.positions.len() as u64 >= limit) {
            break;
        }
        let position = buf_start + at as u64;
        if position == store_len {
            break;
        }
        match format::decode_frame(&buf[at..filled], base + scan.positions.len() as u64) {
            Ok(frame) => {
                scan.positions.push(position as u32);
                scan.last_timestamp_ms = frame.timestamp_ms;
                at += frame.len() as usize;
                scan.valid_end = buf_start + at as u64;
            }
            Err(FrameError::Incomplete { frame_len }) => {
                let needed = frame_len.unwrap_or(format::FRAME_HEADER_LEN as u64);
                if position + needed > store_len {
                    scan.stop = Some(Corruption::TruncatedFrame { len: needed });
                    break;
                }
                // Refill from the current position; grow for a frame larger than the buffer.
                if needed as usize > buf.len() {
                    buf.resize(needed as usize, 0);
                }
                let want = buf.len().min((store_len - position) as usize);
                file.read_exact_at(&mut buf[..want], position).at(path)?;
                buf_start = position;
                filled = want;
                at = 0;
            }
            Err(FrameError::Corrupt(reason)) => {
                scan.stop = Some(reason);
                break;
            }
        }
    }
    Ok(scan)
}

/// Whether the bytes of `file` from `from` to `to` are all zero: space the writer
/// preallocated and never wrote, rather than a torn or damaged frame.
pub(crate) fn is_zero_filled(file: &File, path: &Path, from: u64, to: u64) -> Result<bool> {
    let mut buf = vec![0u8; SCAN_BUFFER.min((to - from) as usize)];
    let mut at = from;
    while at < to {
        let len = buf.len().min((to - at) as usize);
        file.read_exact_at(&mut buf[..len], at).at(path)?;
        if buf[..len].iter().any(|&byte| byte != 0) {
            return Ok(false);
        }
        at += len as u64;
    }
    Ok(true)
}
