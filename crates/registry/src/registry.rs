//! [`Registry`]: the state machine behind a lock, with what changes fan out to:
//! watchers (a change index and a stream of changes) and dependents (notifications).
//!
//! A single registry applies commands itself. A cluster node proposes them through
//! Raft ([`crate::replica`]), and every node applies what is committed; only the
//! leader notifies dependents and runs health checks.

use std::collections::BTreeMap;
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::error::{RegistryError, Result};
use crate::notifier::{Delivery, Notifier};
use crate::registration::Registration;
use crate::replica::Replication;
use crate::state::{Claim, Command, Delta, Event, Health, Instance, Notice, RegistryState};

/// The available instances of each service a registration requires.
pub type Required = BTreeMap<String, Vec<Instance>>;

/// What applying a command did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The availability changes.
    pub events: Vec<Event>,
    /// For a registration, the answer to it: the available instances of each
    /// service it requires.
    pub required: Option<Required>,
    /// For a registration by a caller with a claim, the instance's secret.
    pub secret: Option<String>,
}

/// One availability change, as watchers see it.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// The registry's change index after it.
    pub index: u64,
    /// `available` or `unavailable`.
    pub kind: &'static str,
    /// The instance.
    pub instance: Instance,
}

/// The live registry. Commands take the write lock only to apply and compute their
/// notifications; lookups share the read lock; notifications go out after both.
#[derive(Debug)]
pub struct Registry {
    state: RwLock<RegistryState>,
    /// Instances the registry holds at most.
    max_instances: usize,
    index: watch::Sender<u64>,
    changes: broadcast::Sender<Change>,
    notifier: Notifier,
    /// Set on a cluster node: commands go through Raft.
    replication: OnceLock<Replication>,
    /// Since when (ms since the epoch) this registry leads: it notifies dependents
    /// and checks health only then. A single registry leads from its start.
    leading_since: watch::Sender<Option<u64>>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis().try_into().unwrap_or(u64::MAX))
}

impl Registry {
    pub(crate) fn new(notifier: Notifier, max_instances: usize) -> Self {
        Self {
            state: RwLock::new(RegistryState::default()),
            max_instances,
            index: watch::channel(0).0,
            changes: broadcast::channel(1024).0,
            notifier,
            replication: OnceLock::new(),
            leading_since: watch::channel(Some(now_ms())).0,
        }
    }

    /// Makes this registry a cluster node's: commands go through `replication`, and
    /// it leads only when told so ([`Registry::set_leading`]).
    pub(crate) fn set_replication(&self, replication: Replication) {
        self.leading_since.send_replace(None);
        let _ = self.replication.set(replication);
    }

    pub(crate) fn replication(&self) -> Option<&Replication> {
        self.replication.get()
    }

    /// Records whether this node leads; taking the lead starts its grace period.
    /// Taking the lead, it sends what the outbox holds: notifications its
    /// predecessor may not have sent (a dependent drops those it has seen, by their
    /// change index).
    pub(crate) fn set_leading(&self, leads: bool) {
        // Raft's metrics change with every commit: most calls change nothing, and
        // need not take the lock that lookups share.
        if leads == self.leading_since().is_some() {
            return;
        }
        let owed: Vec<Notice> = {
            let state = self.state_mut();
            let took_lead = self
                .leading_since
                .send_if_modified(|since| match (leads, *since) {
                    (true, None) => {
                        *since = Some(now_ms());
                        true
                    }
                    (false, Some(_)) => {
                        *since = None;
                        true
                    }
                    _ => false,
                })
                && leads;
            if !took_lead {
                return;
            }
            let owed: Vec<Notice> = state.outbox().cloned().collect();
            self.notifier.expect(&owed);
            owed
        };
        if !owed.is_empty() {
            tracing::info!(
                notifications = owed.len(),
                "took the lead: sending the notifications not known to be sent"
            );
        }
        for notice in &owed {
            self.notifier.deliver(Delivery::of(notice));
        }
    }

    /// Since when this registry leads, if it does.
    pub fn leading_since(&self) -> Option<u64> {
        *self.leading_since.borrow()
    }

    /// Replaces the whole state (a cluster node opening or installing a snapshot).
    pub(crate) fn replace_state(&self, state: RegistryState) {
        let index = state.index();
        *self.state_mut() = state;
        self.index.send_replace(index);
    }

    /// The whole state, encoded (a cluster node's checkpoint).
    pub(crate) fn encode_state(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&*self.state())
    }

    fn state(&self) -> RwLockReadGuard<'_, RegistryState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, RegistryState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries out a command: applies it here, or on a cluster node proposes it
    /// and returns once it is committed and applied by the leader.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`]; [`RegistryError::Unavailable`] when the cluster
    /// could not commit it in time (it may still be committed).
    pub async fn execute(&self, command: Command) -> Result<Applied> {
        self.execute_once(command, None).await
    }

    /// As [`Registry::execute`], for a client's write with an idempotency key: a
    /// copy of it with the same key (a retry whose first attempt was delayed, not
    /// lost) is answered but not applied again.
    ///
    /// # Errors
    ///
    /// As [`Registry::execute`].
    pub async fn execute_once(&self, command: Command, request: Option<String>) -> Result<Applied> {
        self.execute_as(command, request, None).await
    }

    /// As [`Registry::execute_once`], by `claim`'s caller (see
    /// [`RegistryState::apply_claimed`]).
    ///
    /// # Errors
    ///
    /// As [`Registry::execute`]; [`RegistryError::NotOwner`].
    pub async fn execute_as(
        &self,
        command: Command,
        request: Option<String>,
        claim: Option<Claim>,
    ) -> Result<Applied> {
        match self.replication() {
            None => self.apply_as(command, request, claim.as_ref()),
            Some(replication) => replication.propose(&command, request, claim).await,
        }
    }

    /// Waits until this node has applied every change acknowledged before the
    /// call, by any node: a linearizable read follows. A no-op on a single registry.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Unavailable`]: no leader confirmed, or this node lags.
    pub async fn read_barrier(&self) -> Result<()> {
        match self.replication() {
            None => Ok(()),
            Some(replication) => replication.read_barrier().await,
        }
    }

    /// Applies a command, then tells watchers what changed and (when this registry
    /// leads) dependents.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`].
    pub fn apply(&self, command: Command) -> Result<Applied> {
        self.apply_once(command, None)
    }

    /// As [`Registry::apply`]; a command whose idempotency key `request` was
    /// applied already changes nothing (a registration's answer is given again).
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`].
    pub fn apply_once(&self, command: Command, request: Option<String>) -> Result<Applied> {
        self.apply_as(command, request, None)
    }

    /// As [`Registry::apply_once`], by `claim`'s caller.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`]; [`RegistryError::NotOwner`].
    pub fn apply_as(
        &self,
        command: Command,
        request: Option<String>,
        claim: Option<&Claim>,
    ) -> Result<Applied> {
        let registrant = match &command {
            Command::Register { registration, .. } => Some((
                registration.name.clone(),
                registration.id().to_owned(),
                registration.required_services.clone(),
            )),
            _ => None,
        };
        let answer = |state: &RegistryState| {
            registrant.as_ref().map(|(name, id, required)| {
                (
                    state.required_by(required),
                    state.owner(name, id).map(|owner| owner.secret.clone()),
                )
            })
        };
        let (events, required, notices, index) = {
            let mut state = self.state_mut();
            if let Some(key) = &request
                && state.requests().contains(key)
            {
                let (required, secret) = answer(&state).unzip();
                return Ok(Applied {
                    events: Vec::new(),
                    required,
                    secret: secret.flatten(),
                });
            }
            let (events, notices) = state.apply_claimed(command, claim)?;
            if let Some(key) = request {
                state.requests().insert(key);
            }
            let (required, secret) = answer(&state).unzip();
            // Read under the lock that taking the lead also holds: a notice is either
            // delivered here or found in the outbox by the new leader, never neither.
            let leads = self.leading_since().is_some();
            if leads {
                self.notifier.expect(&notices);
            }
            (
                events,
                (required, secret.flatten()),
                leads.then_some(notices),
                state.index(),
            )
        };
        self.index.send_replace(index);
        for event in &events {
            let (kind, instance) = match event {
                Event::Available(instance) => ("available", instance.clone()),
                Event::Unavailable(instance) => ("unavailable", instance.clone()),
            };
            // No watcher is not an error.
            let _ = self.changes.send(Change {
                index,
                kind,
                instance,
            });
        }
        for notice in notices.iter().flatten() {
            self.notifier.deliver(Delivery::of(notice));
        }
        let (required, secret) = required;
        Ok(Applied {
            events,
            required,
            secret,
        })
    }

    /// The change index up to which every notification has been sent (or given up
    /// on) by this registry, if that would empty anything from the outbox.
    pub(crate) fn notified_due(&self) -> Option<u64> {
        let state = self.state();
        let up_to = match self.notifier.oldest_pending() {
            Some(oldest) => oldest - 1,
            None => state.index(),
        };
        state.notified_due(up_to).then_some(up_to)
    }

    /// Registers (or updates) an instance and returns, for each service it requires,
    /// the available instances. It is also sent a `POST` for each of those, as it
    /// would have been had it registered before them.
    ///
    /// # Errors
    ///
    /// As [`Registry::execute`]; [`RegistryError::Full`] when a new instance would
    /// pass the limit (on a cluster, judged by this node's state).
    pub async fn register(
        &self,
        registration: Registration,
        request: Option<String>,
    ) -> Result<Required> {
        self.register_as(registration, request, None)
            .await
            .map(|(required, _)| required)
    }

    /// As [`Registry::register`], by `claim`'s caller; returns the instance's secret
    /// too.
    ///
    /// # Errors
    ///
    /// As [`Registry::register`]; [`RegistryError::NotOwner`].
    pub async fn register_as(
        &self,
        registration: Registration,
        request: Option<String>,
        claim: Option<Claim>,
    ) -> Result<(Required, Option<String>)> {
        {
            let state = self.state();
            let known = state
                .instance(&registration.name, registration.id())
                .is_some();
            if !known && state.len() >= self.max_instances {
                return Err(RegistryError::Full {
                    max: self.max_instances,
                });
            }
        }
        let applied = self
            .execute_as(
                Command::Register {
                    registration,
                    at_ms: now_ms(),
                },
                request,
                claim,
            )
            .await?;
        Ok((applied.required.unwrap_or_default(), applied.secret))
    }

    /// An instance's health, if it is registered.
    pub(crate) fn health(&self, name: &str, id: &str) -> Option<Health> {
        self.state().instance(name, id).map(|i| i.health)
    }

    /// Whether a reap at these times would change anything.
    pub(crate) fn reap_due(
        &self,
        now_ms: u64,
        deregister_after: Duration,
        grace_from_ms: u64,
    ) -> bool {
        let after = deregister_after.as_millis().try_into().unwrap_or(u64::MAX);
        self.state().reap_due(now_ms, after, grace_from_ms)
    }

    /// The change index and every instance.
    pub fn snapshot(&self) -> (u64, Vec<Instance>) {
        let state = self.state();
        (state.index(), state.all().cloned().collect())
    }

    /// What changed since index `after` (see [`RegistryState::changes_since`]).
    pub fn changes_since(&self, after: u64) -> Delta {
        self.state().changes_since(after)
    }

    /// The instances of a service: the available ones, or all with `all`.
    pub fn instances(&self, name: &str, all: bool) -> Vec<Instance> {
        let state = self.state();
        state
            .instances(name)
            .filter(|i| all || i.is_available())
            .cloned()
            .collect()
    }

    /// [`Registry::instances`] encoded as a JSON array, straight from the state
    /// (no instance is copied), into a buffer sized for the answer.
    ///
    /// # Errors
    ///
    /// An instance that cannot be encoded (none can: every field is a string, a
    /// number or a map of strings).
    pub fn instances_json(&self, name: &str, all: bool) -> serde_json::Result<Vec<u8>> {
        /// Bytes of JSON an instance takes, about: enough room for most answers
        /// without growing the buffer.
        const INSTANCE_JSON: usize = 256;
        let state = self.state();
        let instances: Vec<&Instance> = state
            .instances(name)
            .filter(|i| all || i.is_available())
            .collect();
        let mut body = Vec::with_capacity(2 + instances.len() * INSTANCE_JSON);
        serde_json::to_writer(&mut body, &instances)?;
        Ok(body)
    }

    /// Instances the health checker polls: those with a heartbeat URL and no TTL.
    pub(crate) fn check_targets(&self) -> Vec<(String, String, String)> {
        self.state()
            .all()
            .filter(|i| i.ttl_ms.is_none())
            .filter_map(|i| {
                i.heartbeat_url
                    .clone()
                    .map(|url| (i.name.clone(), i.id.clone(), url))
            })
            .collect()
    }

    /// A receiver of the change index.
    pub fn watch_index(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }

    /// A receiver of every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub(crate) fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Method};

    use super::*;

    /// A dependent that records (method, change index, instance id) of what it gets.
    async fn dependent() -> (String, Arc<Mutex<Vec<(Method, u64, String)>>>) {
        let got: Arc<Mutex<Vec<(Method, u64, String)>>> = Arc::default();
        let record = Arc::clone(&got);
        let app = axum::Router::new().route(
            "/services",
            axum::routing::any(
                move |method: Method, headers: HeaderMap, body: axum::body::Bytes| {
                    let record = Arc::clone(&record);
                    async move {
                        let index = headers[crate::notifier::INDEX_HEADER]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let instance: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let id = instance["id"].as_str().unwrap().to_owned();
                        record.lock().unwrap().push((method, index, id));
                        "ok"
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/services", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, got)
    }

    fn registration(name: &str, port: u16, required: &[&str], update_url: Option<&str>) -> Command {
        Command::Register {
            registration: Registration {
                name: name.into(),
                url: format!("http://127.0.0.1:{port}"),
                required_services: required.iter().map(|s| (*s).to_owned()).collect(),
                update_url: update_url.map(str::to_owned),
                heartbeat_url: None,
                meta: BTreeMap::new(),
                ttl_ms: None,
            },
            at_ms: 1,
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The fault suite's registry/link-down: a registration held by a node cut
    /// off reached the leader after the client had retried it elsewhere and then
    /// deregistered the instance, and brought it back. A write applied once under
    /// its idempotency key is not applied again.
    #[tokio::test]
    async fn a_late_copy_of_a_keyed_registration_should_not_bring_back_the_instance() {
        let notifier = Notifier::new(
            keel_serve::client::new(),
            Duration::from_secs(5),
            1,
            64,
            std::sync::Arc::new(crate::pacer::Pacer::new(0)),
        );
        let registry = Registry::new(notifier, 100);
        let key = Some("client-1-write-7".to_owned());
        registry
            .apply_once(registration("visit", 7, &[], None), key.clone())
            .unwrap();
        registry
            .apply_once(
                Command::Deregister {
                    name: "visit".into(),
                    id: "127.0.0.1:7".into(),
                },
                Some("client-1-write-8".into()),
            )
            .unwrap();
        // The late copy: answered, not applied.
        let answer = registry
            .apply_once(registration("visit", 7, &["log"], None), key)
            .unwrap();
        assert_eq!(answer.required.map(|r| r.len()), Some(1));
        assert!(registry.instances("visit", true).is_empty());
        // A new write (another key, or none) registers it again.
        registry
            .apply_once(registration("visit", 7, &[], None), None)
            .unwrap();
        assert_eq!(registry.instances("visit", true).len(), 1);
        // The keys survive a snapshot.
        let copy = Registry::new(
            Notifier::new(
                keel_serve::client::new(),
                Duration::from_secs(5),
                1,
                64,
                std::sync::Arc::new(crate::pacer::Pacer::new(0)),
            ),
            100,
        );
        copy.replace_state(serde_json::from_slice(&registry.encode_state().unwrap()).unwrap());
        copy.apply_once(
            Command::Deregister {
                name: "visit".into(),
                id: "127.0.0.1:7".into(),
            },
            Some("client-1-write-8".into()),
        )
        .unwrap();
        assert_eq!(
            copy.instances("visit", true).len(),
            1,
            "a late deregistration"
        );
    }

    #[tokio::test]
    async fn a_registry_taking_the_lead_should_send_what_the_outbox_holds_once() {
        let (url, got) = dependent().await;
        let notifier = Notifier::new(
            keel_serve::client::new(),
            Duration::from_secs(5),
            1,
            64,
            std::sync::Arc::new(crate::pacer::Pacer::new(0)),
        );
        let registry = Registry::new(notifier, 100);
        // A follower: applies, notifies nobody.
        registry.set_leading(false);
        registry
            .apply(registration("portal", 7, &["grading"], Some(&url)))
            .unwrap();
        registry
            .apply(registration("grading", 8, &[], None))
            .unwrap();
        assert_eq!(registry.state().outbox().count(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(got.lock().unwrap().is_empty(), "a follower sends nothing");

        // It takes the lead: the notification its predecessor owed goes out, with the
        // index of its change.
        registry.set_leading(true);
        until("the owed notification", || got.lock().unwrap().len() == 1).await;
        assert_eq!(
            got.lock().unwrap()[0],
            (Method::POST, 2, "127.0.0.1:8".to_owned())
        );
        until("sent, as the notifier knows", || {
            registry.notified_due() == Some(2)
        })
        .await;
        registry.apply(Command::Notified { up_to: 2 }).unwrap();
        assert_eq!(registry.state().outbox().count(), 0);
        assert_eq!(registry.notified_due(), None, "nothing left to record");

        // Losing and taking the lead again sends nothing twice; a new change is sent
        // at once.
        registry.set_leading(false);
        registry.set_leading(true);
        registry
            .apply(Command::Deregister {
                name: "grading".into(),
                id: "127.0.0.1:8".into(),
            })
            .unwrap();
        until("the new change", || got.lock().unwrap().len() == 2).await;
        assert_eq!(
            got.lock().unwrap()[1],
            (Method::DELETE, 3, "127.0.0.1:8".to_owned())
        );
    }
}
