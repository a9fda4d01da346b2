//! The chunked transfer coding (RFC 9112 §7.1), read as it streams by: which bytes
//! are data and which are framing, and whether the framing can be trusted. It keeps
//! no more than its position and buffers nothing.

/// What the next bytes of a chunked body are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// The next `n` bytes are data.
    Data(usize),
    /// The next `n` bytes are framing (a size line, a chunk's CRLF, trailers).
    Framing(usize),
    /// The next `n` bytes are framing and end the body.
    End(usize),
}

/// Reads the chunked transfer coding as it streams by, a piece at a time, keeping no
/// more than its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Chunked {
    /// In a chunk size (`digits` read so far).
    #[default]
    Size,
    SizeDigits {
        size: u64,
        digits: u8,
    },
    /// In chunk extensions, up to CR.
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: a trailer field or the final CRLF.
    TrailerStart,
    /// In a trailer field's name.
    TrailerName,
    /// In a trailer field's value.
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Whether the body has ended.
    pub(crate) fn is_done(self) -> bool {
        self == Self::Done
    }

    /// The next piece at the start of `input`, or `None` when `input` is empty or the
    /// body has ended.
    ///
    /// # Errors
    ///
    /// A message naming what is malformed.
    pub(crate) fn next(&mut self, input: &[u8]) -> Result<Option<Piece>, String> {
        if input.is_empty() || self.is_done() {
            return Ok(None);
        }
        if let Self::Data { left } = *self {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
            *self = if n as u64 == left {
                Self::DataCr
            } else {
                Self::Data {
                    left: left - n as u64,
                }
            };
            return Ok(Some(Piece::Data(n)));
        }
        for (at, &byte) in input.iter().enumerate() {
            *self = self.framing_byte(byte)?;
            match self {
                Self::Data { .. } => return Ok(Some(Piece::Framing(at + 1))),
                Self::Done => return Ok(Some(Piece::End(at + 1))),
                _ => {}
            }
        }
        Ok(Some(Piece::Framing(input.len())))
    }

    fn framing_byte(self, byte: u8) -> Result<Self, String> {
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        Ok(match (self, byte) {
            (Self::Size, b) => match hex(b) {
                Some(d) => Self::SizeDigits { size: d, digits: 1 },
                None => return Err("a chunk size is not hexadecimal".into()),
            },
            (Self::SizeDigits { size, digits }, b) if hex(b).is_some() => {
                if digits >= 15 {
                    return Err("a chunk size is too large".into());
                }
                Self::SizeDigits {
                    size: size * 16 + hex(b).unwrap_or(0),
                    digits: digits + 1,
                }
            }
            (Self::SizeDigits { size, .. }, b';' | b' ' | b'\t') => Self::Extension { size },
            (Self::SizeDigits { size, .. } | Self::Extension { size }, b'\r') => {
                Self::SizeLf { size }
            }
            (Self::Extension { size }, b'\n') => {
                return Err(format!(
                    "a bare LF ends the size line of a {size}-byte chunk"
                ));
            }
            (Self::Extension { .. }, b) if is_control(b) => {
                return Err("a control byte in a chunk extension".into());
            }
            (Self::Extension { size }, _) => Self::Extension { size },
            (Self::SizeLf { size: 0 }, b'\n') => Self::TrailerStart,
            (Self::SizeLf { size }, b'\n') => Self::Data { left: size },
            (Self::DataCr, b'\r') => Self::DataLf,
            (Self::DataLf, b'\n') => Self::Size,
            (Self::TrailerStart, b'\r') => Self::EndLf,
            (Self::TrailerStart | Self::TrailerName | Self::TrailerValue, b'\n') => {
                return Err("a bare LF in the trailers".into());
            }
            (Self::TrailerStart | Self::TrailerName, b) if is_tchar(b) => Self::TrailerName,
            (Self::TrailerName, b':') => Self::TrailerValue,
            (Self::TrailerStart | Self::TrailerName, _) => {
                return Err("a trailer line is not a field (name, then ':')".into());
            }
            (Self::TrailerValue, b'\r') => Self::TrailerLf,
            (Self::TrailerValue, b) if is_control(b) => {
                return Err("a control byte in a trailer field".into());
            }
            (Self::TrailerValue, _) => Self::TrailerValue,
            (Self::TrailerLf, b'\n') => Self::TrailerStart,
            (Self::EndLf, b'\n') => Self::Done,
            (state, b) => {
                return Err(format!(
                    "unexpected byte {:?} in chunked framing ({state:?})",
                    b as char
                ));
            }
        })
    }
}

/// A byte of a token (RFC 9110 §5.6.2): a field name, a chunk extension's name.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A control byte, which no field value or extension may hold (horizontal tab aside).
fn is_control(byte: u8) -> bool {
    (byte < 0x20 && byte != b'\t') || byte == 0x7f
}
