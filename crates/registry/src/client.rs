//! Talking to the registry from elsewhere: the SDK and the gateway.
//!
//! [`Discovery`] is a local table of instances, answered without a registry round
//! trip; [`RegistryClient`] registers, deregisters, lists and watches; [`follow`] keeps a
//! `Discovery` current from the registry's blocking watch.

mod discovery;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use discovery::{Discovery, Picked, Policy, ServiceInstance};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{Registration, RegistryClientError};

/// The registry's answer to a listing or a watch: its change index and every
/// instance, or (from [`RegistryClient::watch`]) the instances of the services that
/// changed.
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    /// The change index.
    pub index: u64,
    /// Every instance, or those of the `changed` services.
    pub instances: Vec<WatchedInstance>,
    /// The services that changed since the index asked about, when the answer is a
    /// delta (`full` false): a listed service with no instance here is gone, and a
    /// service not listed is as it was. `None` for the whole table.
    #[serde(default)]
    pub changed: Option<Vec<String>>,
    /// Whether this is the whole table: services not in it are gone.
    #[serde(default = "whole")]
    pub full: bool,
}

fn whole() -> bool {
    true
}

/// An instance as a watch reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchedInstance {
    /// Unique within its service.
    pub id: String,
    /// The service.
    pub name: String,
    /// Its base URL.
    pub url: String,
    /// `passing` or `critical`.
    pub health: String,
}

impl WatchedInstance {
    /// Whether discovery should offer it.
    pub fn is_passing(&self) -> bool {
        self.health == "passing"
    }

    fn to_instance(&self) -> ServiceInstance {
        ServiceInstance {
            id: self.id.clone(),
            name: self.name.clone(),
            url: self.url.clone(),
        }
    }
}

impl Snapshot {
    /// The passing instances of `name`.
    pub fn passing(&self, name: &str) -> Vec<ServiceInstance> {
        self.instances
            .iter()
            .filter(|i| i.name == name && i.is_passing())
            .map(WatchedInstance::to_instance)
            .collect()
    }

    /// Every service name in the snapshot.
    pub fn services(&self) -> std::collections::BTreeSet<String> {
        self.instances.iter().map(|i| i.name.clone()).collect()
    }

    /// Whether the snapshot says anything about `name`: it is the whole table, or
    /// `name` changed.
    pub fn covers(&self, name: &str) -> bool {
        self.full
            || self
                .changed
                .as_ref()
                .is_none_or(|changed| changed.iter().any(|c| c == name))
    }

    /// Applies the snapshot to `known`, the names of every service the registry
    /// has (passing or not): replaced by a whole table, updated by a delta.
    pub fn update_known(&self, known: &mut std::collections::BTreeSet<String>) {
        match &self.changed {
            Some(changed) if !self.full => {
                let present = self.services();
                for name in changed {
                    if present.contains(name) {
                        known.insert(name.clone());
                    } else {
                        known.remove(name);
                    }
                }
            }
            _ => *known = self.services(),
        }
    }
}

/// How long a call keeps trying the nodes of a registry cluster while none takes
/// it (an election under way, a node restarting).
const CLUSTER_RETRY_FOR: Duration = Duration::from_secs(5);

/// The pause between rounds over a cluster's nodes.
const CLUSTER_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// An HTTP client of a registry: one node, or the nodes of a cluster.
///
/// With several nodes (`http://a,http://b,http://c`), a call goes to the node that
/// answered last; a node that cannot be reached, or answers 503 (no leader yet),
/// passes the call to the next, round after round for up to 5 s. Any node takes any
/// call: writes are forwarded to the leader, and every node answers lookups and
/// watches from the same replicated state, with the same change index.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    bases: Arc<Vec<String>>,
    /// The node that answered last.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer` with every call, when the registry has an ACL.
    token: Option<Arc<str>>,
}

/// The base URLs of a registry's nodes given as `base` (comma-separated; a bare
/// `host:port` is `http://host:port`).
pub fn node_urls(base: &str) -> Vec<String> {
    let mut bases: Vec<String> = base
        .split(',')
        .map(|b| b.trim().trim_end_matches('/'))
        .filter(|b| !b.is_empty())
        .map(|b| {
            if b.contains("://") {
                b.to_owned()
            } else {
                format!("http://{b}")
            }
        })
        .collect();
    if bases.is_empty() {
        bases.push(base.trim().to_owned());
    }
    bases
}

impl RegistryClient {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:20000`), or of a
    /// cluster's nodes, comma-separated.
    pub fn new(base: &str, http: reqwest::Client) -> Self {
        Self {
            bases: Arc::new(node_urls(base)),
            current: Arc::new(AtomicUsize::new(0)),
            http,
            token: None,
        }
    }

    /// The same client, calling with `token` (`Authorization: Bearer`), if any.
    #[must_use]
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(Arc::from);
        self
    }

    /// The registry's nodes, as given.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// Sends the request `build` makes for a node's base URL, to the node that
    /// answered last and, while nodes cannot take it, to the others in turn.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryClientError> {
        let count = self.bases.len();
        let deadline = tokio::time::Instant::now() + CLUSTER_RETRY_FOR;
        loop {
            let first = self.current.load(Ordering::Relaxed);
            let mut last_error = None;
            for step in 0..count {
                let at = (first + step) % count;
                let base = &self.bases[at];
                let mut request = build(&self.http, base);
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token);
                }
                match request.send().await {
                    Ok(response)
                        if count > 1 && response.status() == StatusCode::SERVICE_UNAVAILABLE =>
                    {
                        tracing::debug!(node = base, "the registry node cannot take the call yet");
                        last_error = Some(RegistryClientError::Refused {
                            what: "the call",
                            status: response.status().as_u16(),
                            body: response.text().await.unwrap_or_default(),
                        });
                    }
                    Ok(response) => {
                        self.current.store(at, Ordering::Relaxed);
                        return Ok(response);
                    }
                    Err(source) => {
                        tracing::debug!(node = base, error = %source, "the registry node is unreachable");
                        last_error = Some(RegistryClientError::Unreachable {
                            url: base.clone(),
                            source,
                        });
                    }
                }
            }
            let Some(err) = last_error else {
                unreachable!("a registry client has at least one node")
            };
            if count == 1 || tokio::time::Instant::now() + CLUSTER_RETRY_PAUSE >= deadline {
                return Err(err);
            }
            tokio::time::sleep(CLUSTER_RETRY_PAUSE).await;
        }
    }

    /// Registers `registration` (sent in the canonical shape); returns, per required
    /// service, its available instances.
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached, refuses, or answers
    /// nonsense.
    pub async fn register(
        &self,
        registration: &Registration,
    ) -> Result<BTreeMap<String, Vec<ServiceInstance>>, RegistryClientError> {
        self.register_signed(registration)
            .await
            .map(|(answer, _)| answer)
    }

    /// As [`RegistryClient::register`]; also returns the instance's secret, which
    /// the registry signs its notifications with (see [`keel_auth::signature`]).
    ///
    /// # Errors
    ///
    /// As [`RegistryClient::register`].
    pub async fn register_signed(
        &self,
        registration: &Registration,
    ) -> Result<(BTreeMap<String, Vec<ServiceInstance>>, Option<String>), RegistryClientError> {
        let body = registration.to_canonical_json();
        let key = idempotency_key();
        let response = self
            .send(|http, base| {
                http.post(format!("{base}/services"))
                    .header("idempotency-key", &key)
                    .json(&body)
                    .timeout(Duration::from_secs(5))
            })
            .await?;
        let response = refused_unless_success(response, "the registration").await?;
        let secret = response
            .headers()
            .get(keel_auth::signature::SECRET_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let answer = response
            .json()
            .await
            .map_err(|source| RegistryClientError::Malformed {
                what: "the registration",
                source,
            })?;
        Ok((answer, secret))
    }

    /// Deregisters instance `id` of `name`.
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached or refuses.
    pub async fn deregister(&self, name: &str, id: &str) -> Result<(), RegistryClientError> {
        let key = idempotency_key();
        let response = self
            .send(|http, base| {
                http.delete(format!("{base}/v1/services/{name}/{id}"))
                    .header("idempotency-key", &key)
                    .timeout(Duration::from_secs(2))
            })
            .await?;
        refused_unless_success(response, "the deregistration").await?;
        Ok(())
    }

    /// Every instance the registry knows, with its health (`GET /v1/services`).
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached, refuses, or answers
    /// nonsense.
    pub async fn services(&self) -> Result<Snapshot, RegistryClientError> {
        self.snapshot(
            "/v1/services".to_owned(),
            Duration::from_secs(5),
            "the listing",
        )
        .await
    }

    /// A blocking watch: what changed once the registry's index is past `index`, or
    /// after `wait`: the services changed since `index` ([`Snapshot::changed`]), or
    /// the whole table for index 0 (or one the registry no longer knows).
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached, refuses, or answers
    /// nonsense.
    pub async fn watch(&self, index: u64, wait: Duration) -> Result<Snapshot, RegistryClientError> {
        let path = format!(
            "/v1/watch?index={index}&wait={}ms&changes=true",
            wait.as_millis()
        );
        self.snapshot(path, wait + Duration::from_secs(10), "the watch")
            .await
    }

    async fn snapshot(
        &self,
        path: String,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Snapshot, RegistryClientError> {
        let response = self
            .send(|http, base| http.get(format!("{base}{path}")).timeout(timeout))
            .await?;
        refused_unless_success(response, what)
            .await?
            .json()
            .await
            .map_err(|source| RegistryClientError::Malformed { what, source })
    }
}

/// `response` if its status is a success, else [`RegistryClientError::Refused`] with
/// its body.
async fn refused_unless_success(
    response: reqwest::Response,
    what: &'static str,
) -> Result<reqwest::Response, RegistryClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(RegistryClientError::Refused {
        what,
        status: status.as_u16(),
        body: response.text().await.unwrap_or_default(),
    })
}

/// Keeps `discovery` current with every service the registry knows (or only those in
/// `services`, when given) until `stop`, calling `on_change` with the names of every
/// service the registry has (passing or not) after each answer. Each answer carries
/// only the services that changed. Survives registry restarts: after an error it
/// waits (backing off up to `max_backoff`) and starts over from index 0.
pub async fn follow(
    client: RegistryClient,
    discovery: Discovery,
    services: Option<Vec<String>>,
    wait: Duration,
    max_backoff: Duration,
    stop: CancellationToken,
    mut on_change: impl FnMut(&std::collections::BTreeSet<String>) + Send,
) {
    let mut index = 0;
    let mut known = std::collections::BTreeSet::new();
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        let answer = tokio::select! {
            answer = client.watch(index, wait) => answer,
            () = stop.cancelled() => return,
        };
        match answer {
            Ok(snapshot) => {
                backoff = Duration::from_millis(50);
                let names = match &services {
                    Some(names) => names.clone(),
                    None => snapshot
                        .services()
                        .into_iter()
                        .chain(discovery.services())
                        .collect::<Vec<_>>(),
                };
                for name in names.iter().filter(|name| snapshot.covers(name)) {
                    discovery.replace(name, snapshot.passing(name));
                }
                index = snapshot.index;
                snapshot.update_known(&mut known);
                on_change(&known);
            }
            Err(err) => {
                tracing::debug!(error = %err, "registry watch failed; retrying");
                index = 0;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// A key for one write, sent with each attempt at it, so that the registry applies
/// it once however many attempts arrive: this process's random prefix and a count.
fn idempotency_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    format!("{prefix:016x}-{}", COUNT.fetch_add(1, Ordering::Relaxed))
}
