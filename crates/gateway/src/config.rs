//! The gateway's configuration.

use std::time::Duration;

use keel_serve::InvalidConfig;
use serde::{Deserialize, Serialize};

/// How the gateway chooses an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Of two random instances, the one with fewer requests in flight.
    PowerOfTwoChoices,
}

/// Everything the gateway needs besides its listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The address `keel gateway serve` binds. Default `127.0.0.1:20001`.
    pub addr: String,
    /// The registry's base URL, or a registry cluster's nodes, comma-separated.
    /// Default `http://127.0.0.1:20000`.
    pub registry: String,
    /// The bearer token the gateway reads the registry with, when the registry has
    /// an ACL (it needs `read` on `*`). Default none.
    pub registry_token: Option<String>,
    /// How the gateway calls the registry and the log service over TLS: the CA
    /// their certificates chain to, and the certificate it presents, if any.
    /// Default none: plain HTTP.
    pub client_tls: Option<keel_serve::tls::ClientTlsFiles>,
    /// Serve the front port with TLS only, with this certificate and key (and, with
    /// `client_ca`, only to clients whose certificate chains to it). Instances see
    /// `X-Forwarded-Proto: https`. Default none: plaintext.
    pub tls: Option<keel_serve::tls::ServerTlsFiles>,
    /// How instances are chosen. Default round-robin.
    pub balance: Balance,
    /// How long an upstream may take to answer with headers before 504, and the most
    /// it may pause while reading a request body or sending a response body. A
    /// client's slowness never counts here. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a client connection may stay open with no request under way. Default
    /// 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a whole request head may take to arrive, from its first byte, before
    /// 408: a client trickling a byte at a time cannot hold a connection for longer.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The most a client may pause while sending a request body before 408. A slow
    /// client never counts against the instance its request was going to. Default
    /// 30 s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a client may stop reading a response before the gateway gives up on it
    /// and closes both its connection and the upstream's (nginx's `send_timeout`).
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// How long connecting to an upstream may take. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Extra attempts on other instances after a failure (see `docs/api/gateway.md`
    /// for which failures are retried). Default 2.
    pub retries: u32,
    /// Bodies up to this size are buffered so that a failed request can be retried;
    /// larger ones stream through and are not retried. Default 64 KiB.
    pub retry_body_bytes: u64,
    /// Consecutive failures that eject an instance. Default 3.
    pub eject_after: u32,
    /// How long an ejected instance is skipped. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub eject_for: Duration,
    /// Services whose `/{service}` prefix is removed before forwarding.
    pub strip_prefix: Vec<String>,
    /// How long a blocking watch of the registry lasts. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub watch_wait: Duration,
    /// The log service's URL for the access log (topic `access`); none: no access log.
    pub log_service: Option<String>,
    /// The bearer token the access log is shipped with, when the log service has
    /// an ACL (it needs `produce` on the topic `access`). Default none.
    pub log_service_token: Option<String>,
    /// Connections open at once. At the limit, a new client takes the slot of the
    /// connection that has waited longest for a request (it is closed); when every
    /// connection is mid-request, more wait to be accepted. Default 4096.
    pub max_connections: usize,
    /// Bytes of request headers (names and values) accepted; more is 431. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Serving threads, each with its own single-threaded runtime and upstream pool,
    /// accepting from the same socket; 0 means one per core. Default 0.
    pub workers: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:20001".into(),
            registry: "http://127.0.0.1:20000".into(),
            registry_token: None,
            client_tls: None,
            tls: None,
            balance: Balance::default(),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(1),
            retries: 2,
            retry_body_bytes: 64 * 1024,
            eject_after: 3,
            eject_for: Duration::from_secs(10),
            strip_prefix: Vec::new(),
            watch_wait: Duration::from_secs(30),
            log_service: None,
            log_service_token: None,
            max_connections: 4096,
            max_header_bytes: 16 * 1024,
            workers: 0,
        }
    }
}

impl GatewayConfig {
    /// Checks every limit.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        for (field, value) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
            ("send_timeout", self.send_timeout),
            ("eject_for", self.eject_for),
            ("watch_wait", self.watch_wait),
        ] {
            if value.is_zero() {
                return Err(InvalidConfig::new(field, "must be longer than zero"));
            }
        }
        if self.max_connections == 0 {
            return Err(InvalidConfig::new("max_connections", "must be at least 1"));
        }
        if self.max_header_bytes < 1024 {
            return Err(InvalidConfig::new(
                "max_header_bytes",
                format!("{} is below the minimum of 1024", self.max_header_bytes),
            ));
        }
        if self.eject_after == 0 {
            return Err(InvalidConfig::new("eject_after", "must be at least 1"));
        }
        if self.retries > 10 {
            return Err(InvalidConfig::new(
                "retries",
                format!("{} is more than the allowed 10", self.retries),
            ));
        }
        if self.workers > 256 {
            return Err(InvalidConfig::new(
                "workers",
                format!("{} is more than the allowed 256", self.workers),
            ));
        }
        Ok(())
    }
}
