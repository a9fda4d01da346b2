//! Limits and policies of one log, with defaults and validation.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{LogError, Result};
use crate::format::MAX_VALUE_LEN;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The largest segment store file the format can address (positions are `u32`).
const MAX_SEGMENT_BYTES: u64 = 2 * GIB;

/// Configuration of one log. Every field has a default; call [`LogConfig::validate`]
/// (which [`crate::Log::open`] does) to check the limits.
///
/// In TOML, sizes may be integers (bytes) or strings such as `"64MiB"`, and durations
/// strings such as `"10ms"` or `"7days"`:
///
/// ```
/// let config: keel_commitlog::LogConfig = toml::from_str(r#"
///     max_record_bytes = "1MiB"
///     segment_bytes = "256MiB"
///     sync = "interval:10ms"
///     [retention]
///     bytes = "10GiB"
///     age = "7days"
/// "#).unwrap();
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// The largest value one record may hold. Default 1 MiB; at most 256 MiB.
    #[serde(with = "size")]
    pub max_record_bytes: u64,
    /// The active segment rolls before its store file would grow past this size.
    /// Default 256 MiB; from 4 KiB to 2 GiB.
    #[serde(with = "size")]
    pub segment_bytes: u64,
    /// The active segment rolls when it holds this many records (its index entries).
    /// Default 4 Mi (a 32 MiB index file).
    pub segment_max_records: u64,
    /// The active store file is extended this much at a time (zero-filled, with
    /// `fallocate`) ahead of the writer, so that a sync after an append flushes data
    /// without a change of file size, which costs a journal commit on most
    /// filesystems. Default 4 MiB; 0 turns it off; never past `segment_bytes`.
    #[serde(with = "size")]
    pub preallocate_bytes: u64,
    /// When appended records are forced to disk.
    pub sync: SyncPolicy,
    /// How much old data is kept.
    pub retention: Retention,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_record_bytes: MIB,
            segment_bytes: 256 * MIB,
            segment_max_records: 4 * 1024 * 1024,
            preallocate_bytes: 4 * MIB,
            sync: SyncPolicy::Always,
            retention: Retention::default(),
        }
    }
}

impl LogConfig {
    /// Checks every limit.
    ///
    /// # Errors
    ///
    /// [`LogError::InvalidConfig`] naming the first field out of range and its
    /// allowed range.
    pub fn validate(&self) -> Result<()> {
        fn invalid(field: &'static str, message: String) -> Result<()> {
            Err(LogError::InvalidConfig { field, message })
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > u64::from(MAX_VALUE_LEN) {
            return invalid(
                "max_record_bytes",
                format!(
                    "{} is out of range; allowed: 1 byte to {} bytes (256MiB)",
                    self.max_record_bytes, MAX_VALUE_LEN
                ),
            );
        }
        if !(4 * KIB..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return invalid(
                "segment_bytes",
                format!(
                    "{} is out of range; allowed: 4096 bytes (4KiB) to {MAX_SEGMENT_BYTES} bytes (2GiB)",
                    self.segment_bytes
                ),
            );
        }
        if !(1..=u64::from(u32::MAX)).contains(&self.segment_max_records) {
            return invalid(
                "segment_max_records",
                format!(
                    "{} is out of range; allowed: 1 to {}",
                    self.segment_max_records,
                    u32::MAX
                ),
            );
        }
        if self.preallocate_bytes > MAX_SEGMENT_BYTES {
            return invalid(
                "preallocate_bytes",
                format!(
                    "{} is out of range; allowed: 0 (off) to {MAX_SEGMENT_BYTES} bytes (2GiB)",
                    self.preallocate_bytes
                ),
            );
        }
        if let SyncPolicy::Interval(every) = self.sync
            && every.is_zero()
        {
            return invalid(
                "sync",
                "interval must be longer than zero; use \"always\" to sync every append".into(),
            );
        }
        if self.retention.bytes == Some(0) {
            return invalid(
                "retention.bytes",
                "0 would drop every sealed segment; leave it unset to keep all data".into(),
            );
        }
        if self.retention.age.is_some_and(|age| age.is_zero()) {
            return invalid(
                "retention.age",
                "0 would drop every sealed segment; leave it unset to keep all data".into(),
            );
        }
        Ok(())
    }
}

/// When appended records are forced to disk with `fdatasync`.
///
/// | policy | an append returns after | lost on power failure |
/// | --- | --- | --- |
/// | `Always` | the record is on disk | nothing acknowledged |
/// | `Interval(d)` | the record is in the page cache; a sync runs on the first append at least `d` after the last one | up to `d` of appends (more if no append comes) |
/// | `Never` | the record is in the page cache | whatever the kernel had not written back |
///
/// A process crash (as opposed to a power failure or kernel panic) loses nothing
/// under any policy: written data is in the page cache. Segments are always synced
/// when they are sealed, and [`crate::Log::sync`] and [`crate::Log::close`] sync
/// whatever the policy. Batch appends with [`crate::Log::append_batch`] to pay one
/// sync for many records (group commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// Sync after every append or batch, before returning.
    #[default]
    Always,
    /// Sync on an append when the last sync is at least this long ago.
    Interval(Duration),
    /// Leave write-back to the kernel.
    Never,
}

impl fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Never => f.write_str("never"),
            Self::Interval(every) => {
                write!(
                    f,
                    "interval:{}",
                    humantime_serde::re::humantime::format_duration(*every)
                )
            }
        }
    }
}

impl FromStr for SyncPolicy {
    type Err = ParseError;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => {
                let every =
                    text.strip_prefix("interval:")
                        .ok_or_else(|| ParseError::SyncPolicy {
                            text: text.to_owned(),
                        })?;
                humantime_serde::re::humantime::parse_duration(every)
                    .map(Self::Interval)
                    .map_err(|reason| ParseError::SyncInterval {
                        text: every.to_owned(),
                        reason,
                    })
            }
        }
    }
}

impl Serialize for SyncPolicy {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SyncPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How much old data a log keeps. Retention drops whole sealed segments, oldest
/// first; the active segment is never dropped, so a log keeps at least its newest
/// segment whatever the limits say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Drop the oldest sealed segments while the store files together are larger
    /// than this. Unset: no limit.
    #[serde(with = "size::option")]
    pub bytes: Option<u64>,
    /// Drop sealed segments whose newest record is older than this. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub age: Option<Duration>,
}

/// A setting given as text that does not parse: a size or a sync policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// A size that does not start with a whole number.
    #[error("bad size {text:?}: expected a whole number with an optional unit such as 64MiB")]
    SizeNumber {
        /// The text as given.
        text: String,
    },
    /// A size with a unit that is not one of the known ones.
    #[error("bad size unit {unit:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")]
    SizeUnit {
        /// The text as given.
        text: String,
        /// The unit.
        unit: String,
    },
    /// A size larger than 64 bits can count.
    #[error("size {text:?} does not fit in 64 bits")]
    SizeOverflow {
        /// The text as given.
        text: String,
    },
    /// A sync policy that is none of the known ones.
    #[error(
        "unknown sync policy {text:?}; expected always, never or interval:<duration> (e.g. interval:10ms)"
    )]
    SyncPolicy {
        /// The text as given.
        text: String,
    },
    /// An `interval:` sync policy whose duration does not parse.
    #[error("bad sync interval {text:?}: {reason}")]
    SyncInterval {
        /// The duration as given.
        text: String,
        /// What is wrong with it.
        reason: humantime_serde::re::humantime::DurationError,
    },
}

/// Parses a byte size: a whole number with an optional unit, `B`, `KiB`, `MiB`,
/// `GiB`, `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000).
///
/// # Errors
///
/// [`ParseError`] saying what is wrong with `text`.
///
/// ```
/// assert_eq!(keel_commitlog::parse_size("64MiB"), Ok(64 << 20));
/// assert_eq!(keel_commitlog::parse_size("1 KB"), Ok(1000));
/// assert_eq!(keel_commitlog::parse_size("512"), Ok(512));
/// ```
pub fn parse_size(text: &str) -> std::result::Result<u64, ParseError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| ParseError::SizeNumber {
        text: text.to_owned(),
    })?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "TiB" => 1024 * GIB,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "TB" => 1000 * 1000 * 1000 * 1000,
        other => {
            return Err(ParseError::SizeUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| ParseError::SizeOverflow {
            text: text.to_owned(),
        })
}

/// Serde for sizes: an integer (bytes) or a string for [`parse_size`].
mod size {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    impl Raw {
        fn bytes<E: serde::de::Error>(self) -> Result<u64, E> {
            match self {
                Self::Bytes(bytes) => Ok(bytes),
                Self::Text(text) => super::parse_size(&text).map_err(E::custom),
            }
        }
    }

    pub(super) fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(*bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        Raw::deserialize(deserializer)?.bytes()
    }

    pub(super) mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub(in super::super) fn serialize<S: Serializer>(
            bytes: &Option<u64>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(bytes) => serializer.serialize_some(bytes),
                None => serializer.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<u64>, D::Error> {
            Option::<super::Raw>::deserialize(deserializer)?
                .map(super::Raw::bytes)
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_should_be_valid() {
        LogConfig::default().validate().expect("defaults are valid");
    }

    #[test]
    fn given_out_of_range_fields_validate_should_name_the_field() {
        let cases: Vec<(&str, LogConfig)> = vec![
            (
                "max_record_bytes",
                LogConfig {
                    max_record_bytes: 0,
                    ..LogConfig::default()
                },
            ),
            (
                "max_record_bytes",
                LogConfig {
                    max_record_bytes: 257 * MIB,
                    ..LogConfig::default()
                },
            ),
            (
                "segment_bytes",
                LogConfig {
                    segment_bytes: 100,
                    ..LogConfig::default()
                },
            ),
            (
                "segment_bytes",
                LogConfig {
                    segment_bytes: 3 * GIB,
                    ..LogConfig::default()
                },
            ),
            (
                "segment_max_records",
                LogConfig {
                    segment_max_records: 0,
                    ..LogConfig::default()
                },
            ),
            (
                "preallocate_bytes",
                LogConfig {
                    preallocate_bytes: 3 * GIB,
                    ..LogConfig::default()
                },
            ),
            (
                "sync",
                LogConfig {
                    sync: SyncPolicy::Interval(Duration::ZERO),
                    ..LogConfig::default()
                },
            ),
            (
                "retention.bytes",
                LogConfig {
                    retention: Retention {
                        bytes: Some(0),
                        age: None,
                    },
                    ..LogConfig::default()
                },
            ),
            (
                "retention.age",
                LogConfig {
                    retention: Retention {
                        bytes: None,
                        age: Some(Duration::ZERO),
                    },
                    ..LogConfig::default()
                },
            ),
        ];
        for (expected, config) in cases {
            match config.validate() {
                Err(LogError::InvalidConfig { field, .. }) => assert_eq!(field, expected),
                other => panic!("{expected}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn sync_policy_should_parse_and_display_round_trip() {
        for text in ["always", "never", "interval:10ms", "interval:2s"] {
            let policy: SyncPolicy = text.parse().expect("valid policy");
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(
            "interval:10ms".parse::<SyncPolicy>(),
            Ok(SyncPolicy::Interval(Duration::from_millis(10)))
        );
        assert!("sometimes".parse::<SyncPolicy>().is_err());
        assert!("interval:soon".parse::<SyncPolicy>().is_err());
    }

    #[test]
    fn parse_size_should_accept_units_and_reject_junk() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("2 GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn toml_config_should_accept_human_readable_values() {
        let config: LogConfig = toml::from_str(
            r#"
            max_record_bytes = 2048
            segment_bytes = "64MiB"
            segment_max_records = 1000
            sync = "never"
            [retention]
            bytes = "1GiB"
            age = "36h"
            "#,
        )
        .expect("parses");
        assert_eq!(config.max_record_bytes, 2048);
        assert_eq!(config.segment_bytes, 64 * MIB);
        assert_eq!(config.sync, SyncPolicy::Never);
        assert_eq!(config.retention.bytes, Some(GIB));
        assert_eq!(config.retention.age, Some(Duration::from_secs(36 * 3600)));
        let empty: LogConfig = toml::from_str("").expect("parses");
        assert_eq!(empty, LogConfig::default());
        assert!(toml::from_str::<LogConfig>("segment_bytez = 1").is_err());
    }

    #[test]
    fn config_should_survive_a_serde_round_trip() {
        let config = LogConfig {
            sync: SyncPolicy::Interval(Duration::from_millis(250)),
            retention: Retention {
                bytes: Some(5 * GIB),
                age: Some(Duration::from_secs(60)),
            },
            ..LogConfig::default()
        };
        let json = serde_json::to_string(&config).expect("serialises");
        let back: LogConfig = serde_json::from_str(&json).expect("parses back");
        assert_eq!(back, config);
    }
}
