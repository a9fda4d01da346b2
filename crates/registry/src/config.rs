//! The registry server's configuration.

use std::time::Duration;

use keel_serve::InvalidConfig;
use serde::{Deserialize, Serialize};

use keel_auth::AllowTargets;

/// Everything the registry server needs besides its listener. Defaults follow the
/// original system: health checks every 30 s, three attempts 1 s apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// The address `keel registry serve` binds. Default `127.0.0.1:20000`.
    pub addr: String,
    /// How often every instance's heartbeat URL is checked. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// How long one check may take. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Consecutive failed attempts that turn an instance critical. Default 3.
    pub check_failures: u32,
    /// Pause between the attempts of one check. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub check_retry_delay: Duration,
    /// Checks that may run at once. Default 64.
    pub check_workers: usize,
    /// How long an instance may stay critical before it is removed. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub deregister_after: Duration,
    /// How long one notification delivery may take. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub notify_timeout: Duration,
    /// Retries of a failed notification. Default 3.
    pub notify_retries: u32,
    /// Notifications that may wait for one dependent before new ones are dropped
    /// (and counted). Default 1024.
    pub notify_queue: usize,
    /// The largest request body. Default 64 KiB.
    pub max_body_bytes: u64,
    /// Connections open at once; more wait in the accept backlog until one closes.
    /// Default 1024.
    pub max_connections: usize,
    /// How long a request head may take to arrive before the connection is closed.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Instances the registry holds at most; a registration of one more is 507
    /// `registry_full` (updating a registered instance is always accepted). Default
    /// 10 000.
    pub max_instances: usize,
    /// The longest a blocking watch may wait. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub max_watch_wait: Duration,
    /// The addresses instances may register, and so the only ones health checks
    /// and notifications reach (see [`AllowTargets`]); none: any address. Default
    /// none.
    #[serde(with = "targets_text")]
    pub allow_targets: Option<AllowTargets>,
    /// Requests a second (and burst) the registry sends to any one target
    /// (`host:port`), health checks and notifications together; 0: no limit.
    /// Default 20.
    pub max_requests_per_target: u32,
    /// Serve TLS only, with this certificate and key (and, with `client_ca`, verify
    /// client certificates, which name principals). None: plain HTTP.
    pub tls: Option<keel_serve::tls::ServerTlsFiles>,
    /// The ACL file (see `docs/security.md`): who may register, deregister and read
    /// which services. None: everyone may do everything. Reloaded on `SIGHUP` and
    /// when the file changes.
    pub acl: Option<std::path::PathBuf>,
    /// The CA (PEM) that `https` instances' certificates chain to, for health
    /// checks and notifications. None: the platform's roots.
    pub instances_ca: Option<std::path::PathBuf>,
}

/// `allow_targets` as the text of `--allow-targets`.
mod targets_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use keel_auth::AllowTargets;

    pub(super) fn serialize<S: Serializer>(
        targets: &Option<AllowTargets>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match targets {
            Some(targets) => serializer.serialize_some(&targets.to_string()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<AllowTargets>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:20000".into(),
            check_interval: Duration::from_secs(30),
            check_timeout: Duration::from_secs(2),
            check_failures: 3,
            check_retry_delay: Duration::from_secs(1),
            check_workers: 64,
            deregister_after: Duration::from_secs(60),
            notify_timeout: Duration::from_secs(2),
            notify_retries: 3,
            notify_queue: 1024,
            max_body_bytes: 64 * 1024,
            max_instances: 10_000,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            max_watch_wait: Duration::from_secs(300),
            allow_targets: None,
            max_requests_per_target: 20,
            tls: None,
            acl: None,
            instances_ca: None,
        }
    }
}

impl RegistryConfig {
    /// Checks every limit.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let positive = [
            ("check_interval", self.check_interval),
            ("check_timeout", self.check_timeout),
            ("notify_timeout", self.notify_timeout),
            ("max_watch_wait", self.max_watch_wait),
            ("header_timeout", self.header_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(InvalidConfig::new(field, "must be longer than zero"));
            }
        }
        if self.check_failures == 0 {
            return Err(InvalidConfig::new("check_failures", "must be at least 1"));
        }
        for (field, value) in [
            ("check_workers", self.check_workers),
            ("notify_queue", self.notify_queue),
            ("max_instances", self.max_instances),
            ("max_connections", self.max_connections),
        ] {
            if value == 0 {
                return Err(InvalidConfig::new(field, "must be at least 1"));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(InvalidConfig::new(
                "max_body_bytes",
                format!("{} is below the minimum of 1024", self.max_body_bytes),
            ));
        }
        Ok(())
    }
}
