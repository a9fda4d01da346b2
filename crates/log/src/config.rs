//! The log service's configuration.

use std::path::PathBuf;
use std::time::Duration;

use keel_commitlog::LogConfig;
use keel_serve::InvalidConfig;
use serde::{Deserialize, Serialize};

use crate::error::LogServiceError;
use crate::topic_name::validate_topic_name;

/// Everything the log service needs besides its listener. Every field has a
/// default; [`LogServiceConfig::validate`] checks the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogServiceConfig {
    /// The address `keel log serve` binds (gRPC and HTTP share it). Default
    /// `127.0.0.1:20002`, the original log service's port. [`crate::run`] takes a
    /// bound listener instead, so that tests can bind port 0.
    pub addr: String,
    /// Where topics live (`<data_dir>/topics/<name>`). Default `keel-data/log`.
    pub data_dir: PathBuf,
    /// The topic of requests that name none (the original clients). Default `default`.
    pub default_topic: String,
    /// The topic `POST /log` appends to. Default `logs`.
    pub log_sink_topic: String,
    /// Create a topic on its first write; when off, writing to an unknown topic is
    /// `NOT_FOUND`. Default on.
    pub auto_create_topics: bool,
    /// Connections open at once; more wait in the accept backlog until one closes.
    /// Default 4096.
    pub max_connections: usize,
    /// How long an HTTP/1.1 request head may take to arrive before the connection is
    /// closed. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Topics the service holds at most; creating one more is `RESOURCE_EXHAUSTED`
    /// (HTTP 507, `too_many_topics`). Default 1024.
    pub max_topics: usize,
    /// The largest HTTP body or gRPC message accepted. Default 8 MiB.
    pub max_body_bytes: u64,
    /// Appends that may wait for a topic's writer. Default 1024.
    pub queue_depth: usize,
    /// How long a producer waits for room in a full queue before `RESOURCE_EXHAUSTED`
    /// (HTTP 429). Default 5 s.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    /// The most bytes one group commit takes. Default 4 MiB.
    pub max_batch_bytes: u64,
    /// Bytes of records per message of a batched stream when the client asks for
    /// none. Default 1 MiB.
    pub consume_max_bytes: u64,
    /// Bytes one streaming reader (a tail, `ConsumeStream`, `ConsumeBatchStream`) may
    /// have read ahead of its connection (or one record, when a record is larger);
    /// half of it caps the records per message of a batched stream. A reader that
    /// stops reading holds no more. Default 1 MiB.
    pub read_ahead_bytes: u64,
    /// Bytes all streaming readers together may have read ahead; when they hold it
    /// all, readers wait for room. Default 64 MiB.
    pub read_ahead_total_bytes: u64,
    /// How long shutdown waits for in-flight requests. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve TLS only, with this certificate and key (and, with `client_ca`, verify
    /// client certificates, which name principals). None: plain HTTP and gRPC.
    pub tls: Option<keel_serve::tls::ServerTlsFiles>,
    /// The ACL file (see `docs/security.md`): who may produce to, consume from and
    /// manage which topics. None: everyone may do everything. Reloaded on `SIGHUP`
    /// and when the file changes.
    pub acl: Option<std::path::PathBuf>,
    /// Serving threads, each with its own connections on a single-threaded runtime.
    /// Default 0: one per core.
    pub workers: usize,
    /// The storage settings of every topic.
    pub log: LogConfig,
}

impl Default for LogServiceConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:20002".into(),
            data_dir: PathBuf::from("keel-data/log"),
            default_topic: "default".into(),
            log_sink_topic: "logs".into(),
            auto_create_topics: true,
            max_topics: 1024,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            max_body_bytes: 8 * 1024 * 1024,
            queue_depth: 1024,
            enqueue_timeout: Duration::from_secs(5),
            max_batch_bytes: 4 * 1024 * 1024,
            consume_max_bytes: 1024 * 1024,
            read_ahead_bytes: 1024 * 1024,
            read_ahead_total_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            acl: None,
            workers: 0,
            log: LogConfig::default(),
        }
    }
}

impl LogServiceConfig {
    /// Checks every limit.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] naming the first field out of range and what to change.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.log.validate().map_err(|err| match err {
            keel_commitlog::LogError::InvalidConfig { field, message } => {
                InvalidConfig::new(field, message).within("log")
            }
            other => InvalidConfig::new("log", other.to_string()),
        })?;
        for (field, name) in [
            ("default_topic", &self.default_topic),
            ("log_sink_topic", &self.log_sink_topic),
        ] {
            validate_topic_name(name)
                .map_err(|err: LogServiceError| InvalidConfig::new(field, err.to_string()))?;
        }
        let min_body = self.log.max_record_bytes + 1024;
        if self.max_body_bytes < min_body {
            return Err(InvalidConfig::new(
                "max_body_bytes",
                format!(
                    "{} is smaller than log.max_record_bytes plus 1 KiB of framing ({min_body}); raise it or lower the record limit",
                    self.max_body_bytes
                ),
            ));
        }
        if self.queue_depth == 0 || self.queue_depth > 1 << 20 {
            return Err(InvalidConfig::new(
                "queue_depth",
                format!("{} is out of range 1..=1048576", self.queue_depth),
            ));
        }
        if self.max_connections == 0 {
            return Err(InvalidConfig::new("max_connections", "must be at least 1"));
        }
        if self.header_timeout.is_zero() {
            return Err(InvalidConfig::new(
                "header_timeout",
                "must be longer than zero",
            ));
        }
        if self.max_topics < 2 {
            return Err(InvalidConfig::new(
                "max_topics",
                "must be at least 2: the default topic and the log sink",
            ));
        }
        if self.max_batch_bytes == 0 {
            return Err(InvalidConfig::new("max_batch_bytes", "must be at least 1"));
        }
        if self.consume_max_bytes == 0 || self.consume_max_bytes > self.max_body_bytes {
            return Err(InvalidConfig::new(
                "consume_max_bytes",
                format!(
                    "{} must be between 1 and max_body_bytes ({})",
                    self.consume_max_bytes, self.max_body_bytes
                ),
            ));
        }
        if self.read_ahead_bytes < 1024 || self.read_ahead_bytes > self.read_ahead_total_bytes {
            return Err(InvalidConfig::new(
                "read_ahead_bytes",
                format!(
                    "{} must be between 1KiB and read_ahead_total_bytes ({})",
                    self.read_ahead_bytes, self.read_ahead_total_bytes
                ),
            ));
        }
        if self.read_ahead_total_bytes > u64::from(u32::MAX) {
            return Err(InvalidConfig::new(
                "read_ahead_total_bytes",
                format!(
                    "{} is more than the allowed 4GiB",
                    self.read_ahead_total_bytes
                ),
            ));
        }
        if self.workers > 256 {
            return Err(InvalidConfig::new(
                "workers",
                format!(
                    "{} is more than the allowed 256 (0 means one per core)",
                    self.workers
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_should_be_valid() {
        LogServiceConfig::default().validate().expect("valid");
    }

    #[test]
    fn validate_should_name_the_field() {
        let cases = [
            (
                "max_body_bytes",
                LogServiceConfig {
                    max_body_bytes: 10,
                    ..Default::default()
                },
            ),
            (
                "queue_depth",
                LogServiceConfig {
                    queue_depth: 0,
                    ..Default::default()
                },
            ),
            (
                "default_topic",
                LogServiceConfig {
                    default_topic: "../etc".into(),
                    ..Default::default()
                },
            ),
            (
                "consume_max_bytes",
                LogServiceConfig {
                    consume_max_bytes: 0,
                    ..Default::default()
                },
            ),
            (
                "workers",
                LogServiceConfig {
                    workers: 257,
                    ..Default::default()
                },
            ),
            (
                "log.",
                LogServiceConfig {
                    log: LogConfig {
                        segment_bytes: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
        ];
        for (field, config) in cases {
            let err = config.validate().expect_err(field);
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn toml_should_parse_with_nested_log_settings() {
        let config: LogServiceConfig = toml::from_str(
            r#"
            data_dir = "/var/lib/keel/log"
            enqueue_timeout = "250ms"
            [log]
            sync = "interval:5ms"
            segment_bytes = "64MiB"
            "#,
        )
        .expect("parses");
        assert_eq!(config.enqueue_timeout, Duration::from_millis(250));
        assert_eq!(config.log.segment_bytes, 64 << 20);
        config.validate().expect("valid");
    }
}
