//! keel-demo owns the demo services, the SDK's first users:
//!
//! - [`visit`]: `GET /` counts a visit (the count is the `visits` topic of the log
//!   service, so every instance shares it) and logs `visit N`;
//! - [`grading`]: students and their grades: events in the log service's `grading`
//!   topic, each instance serving them from a SQLite view of its own;
//! - [`portal`]: a web page with the students, a form to add a grade, the registry's
//!   table of instances and the last lines of the `logs` topic.
//!
//! Each runs alone (`keel demo visit`) or under `keel up`, and each finds the
//! services it requires through the registry ([`keel_sdk::Discovery`]).

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

mod discovered_log;
pub mod grading;
mod html;
pub mod portal;
pub mod visit;

pub use discovered_log::DiscoveredLog;

/// One of the demo services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demo {
    /// The visit counter.
    Visit,
    /// Students and grades on SQLite.
    Grading,
    /// The web page.
    Portal,
}

impl Demo {
    /// Every demo, in the order `keel up` starts them.
    pub const ALL: [Self; 3] = [Self::Grading, Self::Visit, Self::Portal];

    /// The name it registers under.
    pub fn name(self) -> &'static str {
        match self {
            Self::Visit => "visit",
            Self::Grading => "grading",
            Self::Portal => "portal",
        }
    }

    /// The services it requires.
    pub fn requires(self) -> &'static [&'static str] {
        match self {
            Self::Visit | Self::Grading => &["log"],
            Self::Portal => &["grading", "log"],
        }
    }
}

/// How a demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The SDK settings: name, address, registry.
    pub service: keel_sdk::ServiceConfig,
    /// Where a demo keeps files (grading's view, `<instance>.sqlite3`).
    pub data_dir: PathBuf,
    /// The instance's name, which names its files: stable across restarts, and
    /// unique among the instances sharing `data_dir`.
    pub instance: String,
}

impl DemoConfig {
    /// `demo` listening on `addr`, registered with `registry`, files in `data_dir`.
    pub fn new(demo: Demo, addr: &str, registry: &str, data_dir: PathBuf) -> Self {
        let mut service = keel_sdk::ServiceConfig::new(demo.name(), addr, registry);
        service.required_services = demo.requires().iter().map(|s| (*s).to_owned()).collect();
        Self {
            service,
            data_dir,
            instance: default_instance(demo),
        }
    }
}

/// An instance's name when none is given: the host's name (a container's is its
/// own), else the demo's.
fn default_instance(demo: Demo) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| grading::valid_instance(name))
        .unwrap_or_else(|| demo.name().to_owned())
}

/// Runs `demo` until `shutdown` completes (see [`keel_sdk::Service::run`]).
///
/// # Errors
///
/// The database cannot be opened (grading), the address cannot be bound, serving
/// fails.
pub async fn run(
    demo: Demo,
    config: DemoConfig,
    on_bound: impl FnOnce(std::net::SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    let mut service = keel_sdk::Service::new(config.service.clone());
    let discovery = service.discovery();
    let tls = config.service.tls.as_ref();
    let http = keel_serve::client::with_tls(keel_serve::client::builder(), tls)
        .map_err(|err| DemoError::Start(err.to_string()))?
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|err| DemoError::Start(err.to_string()))?;
    let token = config.service.token.as_deref();
    let logs = DiscoveredLog::new(discovery.clone(), http.clone(), (token, tls));
    let me = std::sync::Arc::new(std::sync::OnceLock::new());
    // The follower of grading's topic, stopped when the service is.
    let mut _follower = None;
    let router = match demo {
        Demo::Visit => visit::router(logs, me.clone()),
        Demo::Grading => {
            let db = open_view(&config).await?;
            let credentials = log_credentials(token, tls)?;
            let log = grading::LogLink::new(discovery, credentials);
            let started = grading::start(db, &config.instance, log, logs);
            service = service.with_readiness(started.readiness);
            _follower = Some(AbortOnDrop(started.follower));
            started.router
        }
        Demo::Portal => portal::router(portal::Portal::new(
            discovery,
            http,
            (&config.service.registry, token),
            logs,
        )),
    };
    // How the instance names itself: where others reach it.
    let advertised = config.service.advertise.clone().filter(|at| at != "auto");
    service
        .run(
            router,
            move |addr| {
                let _ = me.set(advertised.unwrap_or_else(|| addr.to_string()));
                on_bound(addr);
            },
            shutdown,
        )
        .await
        .map_err(|err| DemoError::Start(err.to_string()))
}

/// Opens (or rebuilds) grading's view, `<instance>.sqlite3` under the data dir.
async fn open_view(config: &DemoConfig) -> Result<grading::Db, DemoError> {
    if !grading::valid_instance(&config.instance) {
        return Err(DemoError::Start(format!(
            "instance name {:?}: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
            config.instance
        )));
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|err| {
        DemoError::Start(format!("creating {}: {err}", config.data_dir.display()))
    })?;
    let path = config.data_dir.join(format!("{}.sqlite3", config.instance));
    let (db, opened) = tokio::task::spawn_blocking(move || grading::Db::open(&path))
        .await
        .map_err(|err| DemoError::Start(err.to_string()))??;
    match opened {
        grading::Opened::Kept => {
            tracing::info!(next_offset = db.next_offset(), "grading view opened");
        }
        grading::Opened::Created => {
            tracing::info!("no grading view yet: building it from the topic")
        }
        grading::Opened::Rebuilt { reason, set_aside } => tracing::warn!(
            reason,
            set_aside = %set_aside.display(),
            "the grading view could not be used: set it aside, building it again from the topic"
        ),
    }
    Ok(db)
}

/// How grading calls the log service over gRPC: with the token, over TLS.
fn log_credentials(
    token: Option<&str>,
    tls: Option<&keel_serve::tls::ClientTlsFiles>,
) -> Result<keel_log_client::Credentials, DemoError> {
    let mut credentials = match token {
        Some(token) => keel_log_client::Credentials::bearer(token)
            .map_err(|why| DemoError::Start(format!("the token: {why}")))?,
        None => keel_log_client::Credentials::default(),
    };
    if let Some(files) = tls {
        let config = keel_serve::tls::client_config(files, &[b"h2"])
            .map_err(|err| DemoError::Start(err.to_string()))?;
        credentials = credentials.with_tls(config);
    }
    Ok(credentials)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The base URL of an available instance of `service`, from discovery.
fn pick_url(discovery: &keel_sdk::Discovery, service: &str) -> Result<String, DemoError> {
    discovery
        .pick(service, keel_sdk::Policy::RoundRobin)
        .map(|picked| picked.url.clone())
        .ok_or_else(|| DemoError::Unavailable(format!("no {service} instance is available")))
}

/// Sends `request` and reads its JSON answer; any failure (unreachable, an error
/// status, a body of the wrong shape) is [`DemoError::Unavailable`] naming `source`.
async fn get_json<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    source: &str,
) -> Result<T, DemoError> {
    let failed = |err: reqwest::Error| DemoError::Unavailable(format!("{source} failed: {err}"));
    request
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(failed)?
        .json()
        .await
        .map_err(failed)
}

/// Why a demo failed: at start, or one request (answered as JSON with a status).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The service could not start or serve.
    #[error("{0}")]
    Start(String),
    /// The request is invalid: 400.
    #[error("{0}")]
    BadRequest(String),
    /// What the request names does not exist: 404.
    #[error("{0}")]
    NotFound(String),
    /// A required service is unavailable or failed: 503.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed: 500.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
}

impl DemoError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Start(_) | Self::Database(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for DemoError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        keel_serve::http::ErrorBody::new(code, &self.to_string()).response(status)
    }
}
