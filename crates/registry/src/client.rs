//! Talking to the registry from elsewhere: the SDK and the gateway.
//!
//! [`Discovery`] is a local table of instances, answered without a registry round
//! trip; [`RegistryClient`] registers, deregisters, lists and watches; [`follow`] keeps a
//! `Discovery` current from the registry's blocking watch.

mod discovery;

use std::time::Duration;

pub use discovery::{Discovery, Picked, Policy, ServiceInstance};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

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

    /// Registers (a canonical registration body); returns, per required service, its
    /// available instances.
    ///
    /// # Errors
    ///
    /// A message when the registry cannot be reached or refuses.
    pub async fn register(
        &self,
        registration: &serde_json::Value,
    ) -> Result<std::collections::BTreeMap<String, Vec<ServiceInstance>>, String> {
        let response = self
            .http
            .post(format!("{}/services", self.base))
            .json(registration)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|err| err.to_string())?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(format!(
                "registry refused the registration ({status}): {body}"
            ));
        }
        response.json().await.map_err(|err| err.to_string())
    }

    /// Deregisters instance `id` of `name`.
    ///
    /// # Errors
    ///
    /// A message when the registry cannot be reached or refuses.
    pub async fn deregister(&self, name: &str, id: &str) -> Result<(), String> {
        let response = self
            .http
            .delete(format!("{}/v1/services/{name}/{id}", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|err| err.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("deregistration refused: {}", response.status()))
        }
    }

    /// Every instance the registry knows, with its health (`GET /v1/services`).
    ///
    /// # Errors
    ///
    /// A message when the registry cannot be reached, refuses, or answers nonsense.
    pub async fn services(&self) -> Result<Snapshot, String> {
        self.http
            .get(format!("{}/v1/services", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|err| err.to_string())?
            .json()
            .await
            .map_err(|err| err.to_string())
    }

    /// A blocking watch: the registry's state once its index is past `index`, or after
    /// `wait`.
    ///
    /// # Errors
    ///
    /// A message when the registry cannot be reached or answers nonsense.
    pub async fn watch(&self, index: u64, wait: Duration) -> Result<Snapshot, String> {
        let url = format!(
            "{}/v1/watch?index={index}&wait={}ms",
            self.base,
            wait.as_millis()
        );
        let response = self
            .http
            .get(url)
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|err| err.to_string())?;
        response.json().await.map_err(|err| err.to_string())
    }
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
