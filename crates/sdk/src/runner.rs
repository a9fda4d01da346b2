//! Running a service: serve, register, stay registered and informed, leave cleanly.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;

use keel_registry::client::{Discovery, RegistryClient, ServiceInstance};
use keel_registry::{Registration, base_url};
use keel_serve::tls::{ClientTlsFiles, ServerTlsFiles, TlsError};

use crate::Readiness;

/// What a service is and where it finds the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service's name, e.g. `visit`.
    pub name: String,
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub addr: String,
    /// The registry's base URL, e.g. `http://127.0.0.1:20000`, or a registry
    /// cluster's nodes, comma-separated (any node takes any call).
    pub registry: String,
    /// Services this one needs; [`Discovery`] knows their instances.
    pub required_services: Vec<String>,
    /// Free-form labels sent with the registration.
    pub meta: BTreeMap<String, String>,
    /// The longest wait between registration attempts while the registry is away.
    pub max_backoff: Duration,
    /// How long a blocking watch of the registry lasts before it is renewed.
    pub watch_wait: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// The bearer token this service calls the registry with, when the registry
    /// has an ACL.
    pub token: Option<String>,
    /// How this service reaches the registry (and the log service) over TLS: the
    /// CA their certificates chain to, and the certificate it presents, if any
    /// (its common name is then the service's principal). `None`: plain HTTP.
    pub tls: Option<ClientTlsFiles>,
    /// Serve TLS only, with this certificate and key: the instance registers an
    /// `https` URL, so the registry's checks and notifications and the gateway
    /// reach it over TLS (they trust its CA through `--instances-ca` and `--ca`).
    /// `None`: plain HTTP.
    pub serve_tls: Option<ServerTlsFiles>,
    /// The `host:port` others reach this instance at, when it is not where it
    /// listens (`0.0.0.0:8080` in a container, say): the registered URL names it.
    /// `auto`: this host's address on the route to the registry, with the bound
    /// port (for replicas that share one configuration). `None`: the bound address.
    pub advertise: Option<String>,
}

impl ServiceConfig {
    /// A config with defaults for everything but the name, address and registry.
    pub fn new(
        name: impl Into<String>,
        addr: impl Into<String>,
        registry: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
            registry: registry.into(),
            required_services: Vec::new(),
            meta: BTreeMap::new(),
            max_backoff: Duration::from_secs(5),
            watch_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            token: None,
            tls: None,
            serve_tls: None,
            advertise: None,
        }
    }
}

/// Why a service could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The HTTP client could not be built.
    #[error("building the HTTP client failed: {0}")]
    Client(#[source] reqwest::Error),
    /// A TLS file cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `advertise = "auto"` found no address on the route to the registry.
    #[error("cannot find this host's address on the route to the registry: {0}")]
    Advertise(#[source] std::io::Error),
    /// The instance's URL cannot be registered.
    #[error("cannot register: {0}")]
    Registration(#[source] keel_registry::RegistryError),
}

/// A service about to run; see the module docs.
#[derive(Debug)]
pub struct Service {
    config: ServiceConfig,
    discovery: Discovery,
    /// `None`: always ready, checked through `/heart-beat`.
    readiness: Option<Readiness>,
}

impl Service {
    /// A service with `config`; nothing runs until [`Service::run`].
    pub fn new(config: ServiceConfig) -> Self {
        Self {
            config,
            discovery: Discovery::default(),
            readiness: None,
        }
    }

    /// Registers only once `readiness` says ready, and has the registry check the
    /// instance through `GET /readyz` (see [`Readiness`]). Until then the instance
    /// serves and learns where its required services are, but nothing is routed
    /// to it.
    #[must_use]
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// Where required services run; cheap to clone into handlers.
    pub fn discovery(&self) -> Discovery {
        self.discovery.clone()
    }

    /// Binds, serves `router` (plus `GET /heart-beat`, `GET /readyz` and
    /// `POST|DELETE /services`),
    /// registers and keeps registered until `shutdown` completes; then deregisters,
    /// stops accepting and drains in-flight requests. `on_bound` is told the bound
    /// address first.
    ///
    /// # Errors
    ///
    /// [`SdkError::Bind`] when the address is taken; serving failures.
    pub async fn run(
        self,
        router: Router,
        on_bound: impl FnOnce(std::net::SocketAddr),
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SdkError> {
        let Self {
            config,
            discovery,
            readiness,
        } = self;
        let tls = config
            .serve_tls
            .as_ref()
            .map(keel_serve::tls::server_config)
            .transpose()?;
        let listener = tokio::net::TcpListener::bind(&config.addr)
            .await
            .map_err(|source| SdkError::Bind {
                addr: config.addr.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(SdkError::Serve)?;
        on_bound(addr);
        let url = advertised_url(&config, addr, tls.is_some()).await?;
        let client = registry_http(&config)?;

        let updates = Notifications {
            discovery: discovery.clone(),
            seen: Arc::default(),
            secret: Arc::default(),
        };
        let secret = Arc::clone(&updates.secret);
        let check = if readiness.is_some() {
            "readyz"
        } else {
            "heart-beat"
        };
        let readiness = readiness.unwrap_or_default();
        let ready = readiness.clone();
        let app = router
            .route("/heart-beat", get(|| async { StatusCode::OK }))
            .route("/readyz", get(move || async move { ready.answer() }))
            .route(
                "/services",
                any(
                    move |method: Method, headers: HeaderMap, body: axum::body::Bytes| {
                        let updates = updates.clone();
                        async move { updates.take(&method, &headers, &body) }
                    },
                ),
            );

        let token = CancellationToken::new();
        let registration = registration(
            &config,
            &url,
            Some(format!("{url}/services")),
            &format!("{url}/{check}"),
        )?;
        let deregister = registered_until(
            &config,
            Registered {
                registration,
                discovery,
                secret,
                readiness,
            },
            client,
            token.clone(),
            shutdown,
        );
        // Deregistered first; then no new connections, and those open finish what
        // they are doing, for the grace period at most.
        let stop = CancellationToken::new();
        let limits = keel_serve::AppLimits {
            header_timeout: HEADER_TIMEOUT,
            max_connections: None,
            tls,
        };
        let server = async {
            tokio::join!(
                keel_serve::serve_app(listener, app, limits, stop.clone()),
                async {
                    deregister.await;
                    stop.cancel();
                }
            )
        };
        let grace = config.shutdown_grace;
        let drained = async {
            token.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            _ = server => {}
            () = drained => tracing::warn!(?grace, "grace period over; dropping open connections"),
        }
        Ok(())
    }
}

/// The URL the instance registers: where others reach it.
async fn advertised_url(
    config: &ServiceConfig,
    addr: std::net::SocketAddr,
    tls: bool,
) -> Result<String, SdkError> {
    let scheme = if tls { "https" } else { "http" };
    Ok(match config.advertise.as_deref() {
        Some(ADVERTISE_AUTO) => {
            let ip = own_address(&config.registry)
                .await
                .map_err(SdkError::Advertise)?;
            format!("{scheme}://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
        Some(at) => format!("{scheme}://{at}"),
        None => format!("{scheme}://{addr}"),
    })
}

/// The `advertise` that asks for this host's address on the route to the registry.
pub(crate) const ADVERTISE_AUTO: &str = "auto";

/// This host's address on the route to the first of `registry`'s nodes: the source
/// address the kernel picks to reach it (a UDP socket connected to it, which sends
/// nothing).
async fn own_address(registry: &str) -> std::io::Result<std::net::IpAddr> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    let bases = keel_registry::client::node_urls(registry);
    let first = bases.first().map_or("", String::as_str);
    let url = reqwest::Url::parse(first).map_err(|err| invalid(format!("{first}: {err}")))?;
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(invalid(format!("{first}: no host and port")));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let target = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}:{port} resolves to nothing"),
            )
        })?;
    let unspecified: std::net::SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified)?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// How long a request head may take to arrive before its connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a registration keeps up to date: the instance, its table of required
/// services, and the secret its notifications are signed with.
struct Registered {
    registration: Registration,
    discovery: Discovery,
    secret: Arc<RwLock<Option<String>>>,
    /// Registration waits for it; the registry's table is watched meanwhile.
    readiness: Readiness,
}

/// Instances whose last notification index is remembered at most.
const MAX_SEEN: usize = 4096;

/// Notifications from the registry, applied to the discovery table. Each carries
/// its change index (`Keel-Index`); one older than the last applied for the same
/// instance is dropped, so that a notification sent again by a registry that took
/// over never undoes a later one.
#[derive(Clone)]
struct Notifications {
    discovery: Discovery,
    /// The change index last applied, by service and instance id.
    seen: Arc<Mutex<HashMap<(String, String), u64>>>,
    /// The secret the registry gave at registration: once there is one, a
    /// notification without its signature is refused (401), so that nobody else
    /// can rewrite the table.
    secret: Arc<RwLock<Option<String>>>,
}

impl Notifications {
    fn take(&self, method: &Method, headers: &HeaderMap, body: &[u8]) -> StatusCode {
        let Ok(instance) = serde_json::from_slice::<ServiceInstance>(body) else {
            return StatusCode::BAD_REQUEST;
        };
        if *method != Method::POST && *method != Method::DELETE {
            return StatusCode::METHOD_NOT_ALLOWED;
        }
        let index = headers
            .get(keel_registry::INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(secret) = &*self.secret.read().unwrap_or_else(PoisonError::into_inner) {
            let signature = headers
                .get(keel_auth::signature::SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let signed = index.is_some_and(|index| {
                keel_auth::signature::verify(secret, signature, method.as_str(), index, body)
            });
            if !signed {
                tracing::warn!(
                    service = instance.name,
                    instance = instance.id,
                    "a notification without the registry's signature; refused"
                );
                return StatusCode::UNAUTHORIZED;
            }
        }
        if let Some(index) = index {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= MAX_SEEN {
                // Instances come and go; start over rather than grow without end.
                seen.clear();
            }
            let last = seen
                .entry((instance.name.clone(), instance.id.clone()))
                .or_default();
            if index < *last {
                tracing::debug!(
                    service = instance.name,
                    instance = instance.id,
                    index,
                    last = *last,
                    "an older notification; dropped"
                );
                return StatusCode::OK;
            }
            *last = index;
        }
        if *method == Method::POST {
            self.discovery.add(instance);
        } else {
            self.discovery.remove(&instance.name, &instance.id);
        }
        StatusCode::OK
    }
}

/// Keeps a server that is not run by [`Service::run`] (the log service, say)
/// registered as `config.name` at `url`, checked through `heartbeat_url`, until
/// `shutdown` completes; then deregisters it. Await the returned future before the
/// server stops accepting, so that nothing is routed to it while it drains.
///
/// # Errors
///
/// [`SdkError::Client`] when the HTTP client cannot be built.
pub async fn stay_registered(
    config: &ServiceConfig,
    url: &str,
    heartbeat_url: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SdkError> {
    let client = registry_http(config)?;
    let registration = registration(config, url, None, heartbeat_url)?;
    let registered = Registered {
        registration,
        discovery: Discovery::default(),
        secret: Arc::default(),
        readiness: Readiness::default(),
    };
    registered_until(
        config,
        registered,
        client,
        CancellationToken::new(),
        shutdown,
    )
    .await;
    Ok(())
}

/// What `config` registers for the instance at `url`.
fn registration(
    config: &ServiceConfig,
    url: &str,
    update_url: Option<String>,
    heartbeat_url: &str,
) -> Result<Registration, SdkError> {
    Ok(Registration {
        name: config.name.clone(),
        url: base_url(url, "addr").map_err(SdkError::Registration)?,
        required_services: config.required_services.clone(),
        update_url,
        heartbeat_url: Some(heartbeat_url.to_owned()),
        meta: config.meta.clone(),
        ttl_ms: None,
    })
}

/// An HTTP client for the registry whose timeout outlasts a blocking watch.
fn registry_http(config: &ServiceConfig) -> Result<reqwest::Client, SdkError> {
    keel_serve::client::with_tls(keel_serve::client::builder(), config.tls.as_ref())?
        .timeout(config.watch_wait + Duration::from_secs(10))
        .build()
        .map_err(SdkError::Client)
}

/// Registers `registration` and keeps it registered (see [`keep_registered`]) from
/// now on; the returned future completes once `shutdown` has completed, `token` is
/// cancelled and the instance is deregistered.
fn registered_until(
    config: &ServiceConfig,
    registered: Registered,
    client: reqwest::Client,
    token: CancellationToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let id = registered.registration.id().to_owned();
    let registry =
        RegistryClient::new(&config.registry, client).with_token(config.token.as_deref());
    let keeper = tokio::spawn(keep_registered(
        registry.clone(),
        config.clone(),
        registered,
        token.clone(),
    ));
    let name = config.name.clone();
    async move {
        shutdown.await;
        token.cancel();
        keeper.abort();
        // Leave the registry first, so no new work is routed here.
        match registry.deregister(&name, &id).await {
            Ok(()) => tracing::info!(service = name, "deregistered"),
            Err(err) => tracing::warn!(
                error = %err,
                "deregistration failed; the registry will drop this instance by its health checks"
            ),
        }
    }
}

/// Registers (with backoff until the registry answers), then watches the registry:
/// refreshes the table of required services, and registers again whenever the
/// registry no longer lists this instance (a restart, or removal after a failed
/// check).
async fn keep_registered(
    registry: RegistryClient,
    config: ServiceConfig,
    registered: Registered,
    stop: CancellationToken,
) {
    let Registered {
        registration,
        discovery,
        secret,
        readiness,
    } = registered;
    let me = registration.url.clone();
    let mut registered = false;
    let mut index = 0u64;
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        let failure = if registered || !readiness.is_ready() {
            // Not ready: watch the table (for the required services) but do not
            // register; once ready, register at once.
            let watched = tokio::select! {
                watched = registry.watch(index, config.watch_wait) => watched,
                () = readiness.ready(), if !registered => continue,
                () = stop.cancelled() => return,
            };
            match watched {
                Ok(snapshot) => {
                    if snapshot.index < index {
                        tracing::info!("the registry's index went back: it restarted");
                    }
                    index = snapshot.index;
                    for name in &config.required_services {
                        if snapshot.covers(name) {
                            discovery.replace(name, snapshot.passing(name));
                        }
                    }
                    // A watch answer says only what changed: look for this instance
                    // when its service did.
                    if registered
                        && snapshot.covers(&config.name)
                        && !snapshot
                            .instances
                            .iter()
                            .any(|i| i.name == config.name && i.url == me)
                    {
                        tracing::info!(
                            service = config.name,
                            "not listed by the registry; registering again"
                        );
                        registered = false;
                    }
                    None
                }
                Err(err) => Some(format!("watch failed: {err}")),
            }
        } else {
            match registry.register_signed(&registration).await {
                Ok((answer, given)) => {
                    // Notifications are signed with it from now on; a registry
                    // that gives none (an older one) signs nothing.
                    *secret.write().unwrap_or_else(PoisonError::into_inner) = given;
                    for (name, instances) in answer {
                        discovery.replace(&name, instances);
                    }
                    registered = true;
                    index = 0;
                    backoff = Duration::from_millis(50);
                    tracing::info!(service = config.name, url = me, "registered");
                    None
                }
                Err(err) => Some(format!("registration failed: {err}")),
            }
        };
        if let Some(failure) = failure {
            // The registry is away: start over once it is back.
            tracing::warn!(error = failure, retry_in = ?backoff, "registry unavailable; will retry");
            registered = false;
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(config.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(updates: &Notifications, method: Method, index: u64) -> StatusCode {
        let mut headers = HeaderMap::new();
        headers.insert(keel_registry::INDEX_HEADER, index.into());
        let body = serde_json::json!({
            "id": "127.0.0.1:7", "name": "grading", "url": "http://127.0.0.1:7"
        });
        updates.take(&method, &headers, body.to_string().as_bytes())
    }

    #[test]
    fn a_notification_sent_again_should_never_undo_a_later_one() {
        let updates = Notifications {
            discovery: Discovery::default(),
            seen: Arc::default(),
            secret: Arc::default(),
        };
        let known = || updates.discovery.instances("grading").len();
        assert_eq!(notify(&updates, Method::POST, 10), StatusCode::OK);
        assert_eq!(known(), 1);
        assert_eq!(notify(&updates, Method::DELETE, 12), StatusCode::OK);
        assert_eq!(known(), 0);
        // The registry's next leader sends the appearance again: dropped.
        assert_eq!(notify(&updates, Method::POST, 10), StatusCode::OK);
        assert_eq!(known(), 0);
        // The same change twice is the same change.
        assert_eq!(notify(&updates, Method::DELETE, 12), StatusCode::OK);
        assert_eq!(known(), 0);
        assert_eq!(notify(&updates, Method::POST, 13), StatusCode::OK);
        assert_eq!(known(), 1);
        assert_eq!(
            updates.take(&Method::PUT, &HeaderMap::new(), b"{}"),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn a_notification_not_signed_by_the_registry_should_be_refused() {
        let updates = Notifications {
            discovery: Discovery::default(),
            seen: Arc::default(),
            secret: Arc::new(RwLock::new(Some("the-secret".into()))),
        };
        let body = serde_json::json!({
            "id": "10.9.9.9:80", "name": "grading", "url": "http://10.9.9.9:80"
        })
        .to_string();
        let send = |signature: Option<String>| {
            let mut headers = HeaderMap::new();
            headers.insert(keel_registry::INDEX_HEADER, 5u64.into());
            if let Some(signature) = signature {
                headers.insert(
                    keel_auth::signature::SIGNATURE_HEADER,
                    signature.parse().expect("a header"),
                );
            }
            updates.take(&Method::POST, &headers, body.as_bytes())
        };
        // A stranger's, unsigned or signed with another secret, changes nothing.
        assert_eq!(send(None), StatusCode::UNAUTHORIZED);
        let forged = keel_auth::signature::sign("guessed", "POST", 5, body.as_bytes());
        assert_eq!(send(Some(forged)), StatusCode::UNAUTHORIZED);
        assert!(updates.discovery.instances("grading").is_empty());
        let signed = keel_auth::signature::sign("the-secret", "POST", 5, body.as_bytes());
        assert_eq!(send(Some(signed)), StatusCode::OK);
        assert_eq!(updates.discovery.instances("grading").len(), 1);
    }
}
