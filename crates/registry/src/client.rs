//! Talking to the registry from elsewhere: the SDK and the gateway.
//!
//! [`Discovery`] is a local table of instances, answered without a registry round
//! trip; [`RegistryClient`] registers, deregisters, lists and watches; [`follow`] keeps a
//! `Discovery` current from the registry's blocking watch.

mod discovery;

use std::collections::BTreeMap;
use std::time::Duration;

pub use discovery::{Discovery, Picked, Policy, ServiceInstance};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{Registration, RegistryClientError};

/// The registry's answer to a watch: its change index and every instance.
#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    /// The change index.
    pub index: u64,
    /// Every instance.
    pub instances: Vec<WatchedInstance>,
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
}

/// An HTTP client of one registry.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

impl RegistryClient {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:20000`).
    pub fn new(base: &str, http: reqwest::Client) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
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
        let url = format!("{}/services", self.base);
        let response = self
            .http
            .post(&url)
            .json(&registration.to_canonical_json())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|source| RegistryClientError::Unreachable { url, source })?;
        let response = refused_unless_success(response, "the registration").await?;
        response
            .json()
            .await
            .map_err(|source| RegistryClientError::Malformed {
                what: "the registration",
                source,
            })
    }

    /// Deregisters instance `id` of `name`.
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached or refuses.
    pub async fn deregister(&self, name: &str, id: &str) -> Result<(), RegistryClientError> {
        let url = format!("{}/v1/services/{name}/{id}", self.base);
        let response = self
            .http
            .delete(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|source| RegistryClientError::Unreachable { url, source })?;
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
            format!("{}/v1/services", self.base),
            Duration::from_secs(5),
            "the listing",
        )
        .await
    }

    /// A blocking watch: the registry's state once its index is past `index`, or after
    /// `wait`.
    ///
    /// # Errors
    ///
    /// [`RegistryClientError`]: the registry cannot be reached, refuses, or answers
    /// nonsense.
    pub async fn watch(&self, index: u64, wait: Duration) -> Result<Snapshot, RegistryClientError> {
        let url = format!(
            "{}/v1/watch?index={index}&wait={}ms",
            self.base,
            wait.as_millis()
        );
        self.snapshot(url, wait + Duration::from_secs(10), "the watch")
            .await
    }

    async fn snapshot(
        &self,
        url: String,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Snapshot, RegistryClientError> {
        let response = self
            .http
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| RegistryClientError::Unreachable { url, source })?;
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
/// `services`, when given) until `stop`, calling `on_snapshot` with each answer.
/// Survives registry restarts: after an error it waits (backing off up to
/// `max_backoff`) and starts over from index 0.
pub async fn follow(
    client: RegistryClient,
    discovery: Discovery,
    services: Option<Vec<String>>,
    wait: Duration,
    max_backoff: Duration,
    stop: CancellationToken,
    mut on_snapshot: impl FnMut(&Snapshot) + Send,
) {
    let mut index = 0;
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
                for name in names {
                    discovery.replace(&name, snapshot.passing(&name));
                }
                index = snapshot.index;
                on_snapshot(&snapshot);
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
