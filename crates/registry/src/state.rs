//! The registry's state machine: commands in, events out, no I/O and no clock.
//!
//! Everything that changes the registry is a [`Command`] applied with
//! [`RegistryState::apply`]; time enters as data (`at_ms`, `now_ms`). So the same
//! commands in the same order give the same state on every node, which is what lets
//! the registry be replicated through a consensus log. The HTTP API, the health
//! checker and the notifier live around it: they turn requests and check results
//! into commands, and events into notifications.
//!
//! An instance is **available** while it is registered and passing. Events report
//! changes of availability, which is what dependents are told about.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{RegistryError, Result};
use crate::registration::Registration;

/// An instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Serving; returned by discovery.
    Passing,
    /// Failing its checks (or its TTL ran out); hidden from discovery, and removed
    /// when critical for longer than the deregister-after period.
    Critical,
}

/// A registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique within its service: the URL without its scheme.
    pub id: String,
    /// The service it belongs to.
    pub name: String,
    /// Its base URL.
    pub url: String,
    /// Services it needs.
    pub required_services: Vec<String>,
    /// Where it takes notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_url: Option<String>,
    /// What the health checker polls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_url: Option<String>,
    /// Free-form labels.
    pub meta: BTreeMap<String, String>,
    /// Current health.
    pub health: Health,
    /// When it (last) registered.
    pub registered_at_ms: u64,
    /// When it turned critical, while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critical_since_ms: Option<u64>,
    /// With a TTL, it must heartbeat at least this often or turn critical.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Its last TTL heartbeat (or registration).
    pub last_seen_ms: u64,
}

impl Instance {
    /// Whether discovery returns it.
    pub fn is_available(&self) -> bool {
        self.health == Health::Passing
    }
}

/// A change to the registry; replicated as JSON (`{"register": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Registers an instance, or updates it if the same name and id are registered.
    Register {
        /// What it registered with (including an optional TTL).
        registration: Registration,
        /// The time of registration.
        at_ms: u64,
    },
    /// Removes an instance.
    Deregister {
        /// Its service.
        name: String,
        /// Its id.
        id: String,
    },
    /// Records the verdict of the health checker.
    SetHealth {
        /// Its service.
        name: String,
        /// Its id.
        id: String,
        /// The new health.
        health: Health,
        /// The time of the verdict.
        at_ms: u64,
    },
    /// A TTL heartbeat: the instance is alive.
    Heartbeat {
        /// Its service.
        name: String,
        /// Its id.
        id: String,
        /// The time of the heartbeat.
        at_ms: u64,
    },
    /// The leader has sent (or given up on) every notification of the changes up to
    /// this index: they leave the outbox.
    Notified {
        /// The change index.
        up_to: u64,
    },
    /// Turns instances whose TTL ran out critical, and removes instances critical
    /// for at least `deregister_after_ms`.
    Reap {
        /// Now.
        now_ms: u64,
        /// How long an instance may stay critical.
        deregister_after_ms: u64,
        /// No TTL runs out before this time plus the TTL: a registry that took over
        /// (a new leader) first gives every instance a full TTL to heartbeat to it.
        #[serde(default)]
        grace_from_ms: u64,
    },
}

/// What a command changed that others may need to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An instance became available: newly registered, or passing again.
    Available(Instance),
    /// An instance stopped being available: deregistered, turned critical, or removed.
    Unavailable(Instance),
}

impl Event {
    /// The instance the event is about.
    pub fn instance(&self) -> &Instance {
        match self {
            Self::Available(instance) | Self::Unavailable(instance) => instance,
        }
    }
}

/// A notification owed to a dependent: part of the state, so that a registry that
/// takes over (a new leader) sends what its predecessor may not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The change index of the change it tells of.
    pub index: u64,
    /// The dependent's update URL.
    pub url: String,
    /// `POST` (the instance became available) or `DELETE` (it stopped being).
    pub available: bool,
    /// The instance it is about.
    pub instance: Instance,
    /// The dependent's secret, which the notification is signed with (see
    /// [`keel_auth::signature`]); none for an instance registered before secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Who registered an instance, and the secret its notifications are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The principal that registered it (`anonymous` without an ACL).
    pub principal: String,
    /// The key of the HMAC that signs its notifications, returned at registration.
    pub secret: String,
}

/// Who asks for a change, when the registry checks ownership: only an instance's
/// owner, or an admin of its service, may change or remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The caller.
    pub principal: String,
    /// Whether it may act on any instance of the service.
    pub admin: bool,
    /// The secret a new instance gets (an instance keeps the one it has).
    pub secret: String,
}

/// Notifications the outbox holds at most; past it, the oldest are forgotten (a
/// registry that takes over does not send them again).
pub const MAX_OUTBOX: usize = 10_000;

/// Services whose last instance left that the state still remembers for watchers,
/// beyond those it holds; older ones are forgotten, and a watcher that last looked
/// before the forgetting gets the whole table.
const REMEMBERED_REMOVALS: usize = 1024;

/// What changed since an index, for a watcher (see [`RegistryState::changes_since`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The change index now.
    pub index: u64,
    /// Whether this is the whole table (the watcher's index is 0, too old, or from
    /// before a restart): services not in it are gone.
    pub full: bool,
    /// The services that changed (every service, when `full`); one with no instance
    /// left in `instances` is gone.
    pub changed: Vec<String>,
    /// Every instance of the changed services.
    pub instances: Vec<Instance>,
}

/// The registry's state; serialized whole as a cluster's snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    /// By service name, then id: iteration is deterministic.
    services: BTreeMap<String, BTreeMap<String, Instance>>,
    /// Grows by one with every command that changes what watchers see.
    index: u64,
    /// The index of each service's latest change, for watchers' deltas.
    modified: BTreeMap<String, u64>,
    /// Changes at or below this index may have been forgotten (see
    /// [`REMEMBERED_REMOVALS`]).
    forgotten: u64,
    /// Notifications not yet known to be sent (or given up on), oldest first.
    #[serde(default)]
    outbox: VecDeque<Notice>,
    /// The idempotency keys of the latest keyed writes applied.
    #[serde(default)]
    requests: RecentRequests,
    /// Each instance's owner, by service name, then id.
    #[serde(default)]
    owners: BTreeMap<String, BTreeMap<String, Owner>>,
}

/// Keyed writes remembered, at most: a copy of one that arrives later (a retry
/// whose first attempt was only delayed) is recognised and not applied again.
pub(crate) const REMEMBERED_REQUESTS: usize = 10_000;

/// The idempotency keys of the latest keyed writes, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct RecentRequests {
    order: VecDeque<String>,
    #[serde(skip)]
    index: std::collections::HashSet<String>,
}

impl PartialEq for RecentRequests {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}

impl Eq for RecentRequests {}

impl RecentRequests {
    fn indexed(&mut self) -> &mut std::collections::HashSet<String> {
        // Keys are unique in `order`: a set of another size was not rebuilt since a
        // snapshot was read.
        if self.index.len() != self.order.len() {
            self.index = self.order.iter().cloned().collect();
        }
        &mut self.index
    }

    /// Whether a write with this key was applied (among the latest remembered).
    pub(crate) fn contains(&mut self, key: &str) -> bool {
        self.indexed().contains(key)
    }

    /// Remembers a key, forgetting the oldest past [`REMEMBERED_REQUESTS`].
    pub(crate) fn insert(&mut self, key: String) {
        if self.indexed().insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > REMEMBERED_REQUESTS {
            if let Some(oldest) = self.order.pop_front() {
                self.index.remove(&oldest);
            }
        }
    }
}

impl RegistryState {
    /// The keyed writes applied lately.
    pub(crate) fn requests(&mut self) -> &mut RecentRequests {
        &mut self.requests
    }

    /// The change index: grows with every change.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Applies a command and returns the availability changes it caused.
    ///
    /// # Errors
    ///
    /// [`RegistryError::UnknownInstance`] for a command about an instance that is not
    /// registered; the state is unchanged.
    pub fn apply(&mut self, command: Command) -> Result<Vec<Event>> {
        self.apply_noting(command).map(|(events, _)| events)
    }

    /// Applies a command; returns the availability changes it caused and the
    /// notifications it owes dependents (also kept in the outbox until a
    /// [`Command::Notified`]): each change to the dependents of its service, and a
    /// new registration's required instances to the new instance.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`].
    pub fn apply_noting(&mut self, command: Command) -> Result<(Vec<Event>, Vec<Notice>)> {
        self.apply_claimed(command, None)
    }

    /// As [`RegistryState::apply_noting`], by `claim`'s caller: a registration,
    /// deregistration or heartbeat of an instance another principal owns is refused
    /// unless the caller is an admin; a new instance is owned by the caller.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`]; [`RegistryError::NotOwner`].
    pub fn apply_claimed(
        &mut self,
        command: Command,
        claim: Option<&Claim>,
    ) -> Result<(Vec<Event>, Vec<Notice>)> {
        let target = match &command {
            Command::Register { registration, .. } => {
                Some((registration.name.clone(), registration.id().to_owned()))
            }
            Command::Deregister { name, id } | Command::Heartbeat { name, id, .. } => {
                Some((name.clone(), id.clone()))
            }
            _ => None,
        };
        if let (Some(claim), Some((name, id))) = (claim, &target)
            && let Some(owner) = self.owner(name, id)
            && owner.principal != claim.principal
            && !claim.admin
        {
            return Err(RegistryError::NotOwner {
                name: name.clone(),
                id: id.clone(),
                owner: owner.principal.clone(),
            });
        }
        // A new instance's owner first, so that what it is told at once is signed.
        let mut new_owner = None;
        if matches!(command, Command::Register { .. })
            && let (Some(claim), Some((name, id))) = (claim, target)
            && self.owner(&name, &id).is_none()
        {
            self.owners.entry(name.clone()).or_default().insert(
                id.clone(),
                Owner {
                    principal: claim.principal.clone(),
                    secret: claim.secret.clone(),
                },
            );
            new_owner = Some((name, id));
        }
        let result = self.apply_unclaimed(command);
        if result.is_err()
            && let Some((name, id)) = new_owner
        {
            self.forget_owner(&name, &id);
        }
        result
    }

    fn forget_owner(&mut self, name: &str, id: &str) {
        if let Some(owners) = self.owners.get_mut(name) {
            owners.remove(id);
            if owners.is_empty() {
                self.owners.remove(name);
            }
        }
    }

    /// The owner of an instance, if it has one.
    pub fn owner(&self, name: &str, id: &str) -> Option<&Owner> {
        self.owners.get(name).and_then(|owners| owners.get(id))
    }

    fn apply_unclaimed(&mut self, command: Command) -> Result<(Vec<Event>, Vec<Notice>)> {
        // A new instance that takes notifications is told of what it requires, as it
        // would have been had it registered before them.
        let registrant = match &command {
            Command::Register { registration, .. } => registration.update_url.clone().map(|url| {
                let secret = self
                    .owner(&registration.name, registration.id())
                    .map(|owner| owner.secret.clone());
                (url, registration.required_services.clone(), secret)
            }),
            _ => None,
        };
        let events = self.apply_command(command)?;
        let mut notices = Vec::new();
        for event in &events {
            let (available, instance) = match event {
                Event::Available(instance) => (true, instance),
                Event::Unavailable(instance) => (false, instance),
            };
            for dependent in self.dependents(&instance.name) {
                if let Some(url) = dependent.update_url {
                    notices.push(Notice {
                        index: self.index,
                        url,
                        available,
                        instance: instance.clone(),
                        secret: self
                            .owner(&dependent.name, &dependent.id)
                            .map(|owner| owner.secret.clone()),
                    });
                }
            }
        }
        if let Some((url, required, secret)) = registrant {
            for instance in required.iter().flat_map(|name| self.available(name)) {
                notices.push(Notice {
                    index: self.index,
                    url: url.clone(),
                    available: true,
                    instance,
                    secret: secret.clone(),
                });
            }
        }
        self.outbox.extend(notices.iter().cloned());
        while self.outbox.len() > MAX_OUTBOX {
            self.outbox.pop_front();
        }
        Ok((events, notices))
    }

    /// The notifications not yet known to be sent.
    pub fn outbox(&self) -> impl Iterator<Item = &Notice> {
        self.outbox.iter()
    }

    /// Whether a [`Command::Notified`] up to `up_to` would empty anything from the
    /// outbox.
    pub fn notified_due(&self, up_to: u64) -> bool {
        self.outbox
            .front()
            .is_some_and(|notice| notice.index <= up_to)
    }

    fn apply_command(&mut self, command: Command) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        // The services whose instances, as watchers see them, change.
        let mut touched = Vec::new();
        let changed = match command {
            Command::Register {
                registration,
                at_ms,
            } => {
                touched.push(registration.name.clone());
                self.register(registration, at_ms, &mut events);
                true
            }
            Command::Deregister { name, id } => {
                let instance = self.remove(&name, &id)?;
                if instance.is_available() {
                    events.push(Event::Unavailable(instance));
                }
                touched.push(name);
                true
            }
            Command::SetHealth {
                name,
                id,
                health,
                at_ms,
            } => {
                let instance = self.get_mut(&name, &id)?;
                set_health(instance, health, at_ms, &mut events)
            }
            Command::Heartbeat { name, id, at_ms } => {
                let instance = self.get_mut(&name, &id)?;
                instance.last_seen_ms = at_ms;
                // A sign of life that changes no health changes nothing a watcher sees.
                set_health(instance, Health::Passing, at_ms, &mut events)
            }
            Command::Notified { up_to } => {
                while self.notify_done_front(up_to) {}
                // Nothing a watcher sees.
                false
            }
            Command::Reap {
                now_ms,
                deregister_after_ms,
                grace_from_ms,
            } => self.reap(
                Reaping {
                    now_ms,
                    deregister_after_ms,
                    grace_from_ms,
                },
                &mut events,
                &mut touched,
            ),
        };
        if changed {
            self.index += 1;
            let index = self.index;
            touched.extend(events.iter().map(|event| event.instance().name.clone()));
            for name in touched {
                self.modified.insert(name, index);
            }
            self.forget_old_removals();
        }
        Ok(events)
    }

    /// What a watcher that has seen the state at index `after` needs: the services
    /// changed since, with their instances; or the whole table when `after` is 0,
    /// older than what the state remembers, or ahead of the state (the registry
    /// restarted since).
    pub fn changes_since(&self, after: u64) -> Delta {
        if after == 0 || after < self.forgotten || after > self.index {
            return Delta {
                index: self.index,
                full: true,
                changed: self.services.keys().cloned().collect(),
                instances: self.all().cloned().collect(),
            };
        }
        let changed: Vec<String> = self
            .modified
            .iter()
            .filter(|(_, index)| **index > after)
            .map(|(name, _)| name.clone())
            .collect();
        let instances = changed
            .iter()
            .flat_map(|name| self.instances(name))
            .cloned()
            .collect();
        Delta {
            index: self.index,
            full: false,
            changed,
            instances,
        }
    }

    /// Forgets the removals of services changed longest ago once more than
    /// [`REMEMBERED_REMOVALS`] are remembered, so that names come and go without the
    /// state growing.
    fn forget_old_removals(&mut self) {
        if self.modified.len() <= self.services.len() + REMEMBERED_REMOVALS {
            return;
        }
        let mut gone: Vec<(u64, String)> = self
            .modified
            .iter()
            .filter(|(name, _)| !self.services.contains_key(*name))
            .map(|(name, &index)| (index, name.clone()))
            .collect();
        gone.sort_unstable();
        let excess = gone.len().saturating_sub(REMEMBERED_REMOVALS / 2);
        for (index, name) in gone.into_iter().take(excess) {
            self.forgotten = self.forgotten.max(index);
            self.modified.remove(&name);
        }
    }

    fn register(&mut self, registration: Registration, at_ms: u64, events: &mut Vec<Event>) {
        let id = registration.id().to_owned();
        let instances = self.services.entry(registration.name.clone()).or_default();
        let Registration {
            name,
            url,
            required_services,
            update_url,
            heartbeat_url,
            meta,
            ttl_ms,
        } = registration;
        match instances.get_mut(&id) {
            Some(existing) => {
                existing.required_services = required_services;
                existing.update_url = update_url;
                existing.heartbeat_url = heartbeat_url;
                existing.meta = meta;
                existing.ttl_ms = ttl_ms;
                existing.registered_at_ms = at_ms;
                existing.last_seen_ms = at_ms;
                // Registering again is a sign of life.
                set_health(existing, Health::Passing, at_ms, events);
            }
            None => {
                let instance = Instance {
                    id: id.clone(),
                    name,
                    url,
                    required_services,
                    update_url,
                    heartbeat_url,
                    meta,
                    health: Health::Passing,
                    registered_at_ms: at_ms,
                    critical_since_ms: None,
                    ttl_ms,
                    last_seen_ms: at_ms,
                };
                events.push(Event::Available(instance.clone()));
                instances.insert(id, instance);
            }
        }
    }

    fn notify_done_front(&mut self, up_to: u64) -> bool {
        if self
            .outbox
            .front()
            .is_some_and(|notice| notice.index <= up_to)
        {
            self.outbox.pop_front();
            true
        } else {
            false
        }
    }

    /// Whether a [`Command::Reap`] with these times would change anything: a
    /// registry proposes one only then.
    pub fn reap_due(&self, now_ms: u64, deregister_after_ms: u64, grace_from_ms: u64) -> bool {
        let reaping = Reaping {
            now_ms,
            deregister_after_ms,
            grace_from_ms,
        };
        self.all()
            .any(|i| reaping.ttl_ran_out(i) || reaping.critical_too_long(i))
    }

    fn reap(
        &mut self,
        reaping: Reaping,
        events: &mut Vec<Event>,
        touched: &mut Vec<String>,
    ) -> bool {
        let mut changed = false;
        let mut removed = Vec::new();
        for instances in self.services.values_mut() {
            for instance in instances.values_mut() {
                if reaping.ttl_ran_out(instance) {
                    changed |= set_health(instance, Health::Critical, reaping.now_ms, events);
                }
                if reaping.critical_too_long(instance) {
                    removed.push((instance.name.clone(), instance.id.clone()));
                }
            }
        }
        for (name, id) in removed {
            // Already unavailable (critical), so no event; the removal is a change.
            if self.remove(&name, &id).is_ok() {
                changed = true;
                touched.push(name);
            }
        }
        changed
    }

    fn get_mut(&mut self, name: &str, id: &str) -> Result<&mut Instance> {
        self.services
            .get_mut(name)
            .and_then(|instances| instances.get_mut(id))
            .ok_or_else(|| RegistryError::UnknownInstance {
                name: name.to_owned(),
                id: id.to_owned(),
            })
    }

    fn remove(&mut self, name: &str, id: &str) -> Result<Instance> {
        let instances = self.services.get_mut(name);
        let removed = instances.and_then(|instances| instances.remove(id));
        let removed = removed.ok_or_else(|| RegistryError::UnknownInstance {
            name: name.to_owned(),
            id: id.to_owned(),
        })?;
        if self.services.get(name).is_some_and(BTreeMap::is_empty) {
            self.services.remove(name);
        }
        self.forget_owner(name, id);
        Ok(removed)
    }

    /// An instance, if registered.
    pub fn instance(&self, name: &str, id: &str) -> Option<&Instance> {
        self.services
            .get(name)
            .and_then(|instances| instances.get(id))
    }

    /// Every instance of a service, available or not.
    pub fn instances(&self, name: &str) -> impl Iterator<Item = &Instance> {
        self.services
            .get(name)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    /// The available instances of a service.
    pub fn available(&self, name: &str) -> Vec<Instance> {
        self.instances(name)
            .filter(|i| i.is_available())
            .cloned()
            .collect()
    }

    /// How many instances are registered, of every service.
    pub fn len(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }

    /// Whether no instance is registered.
    pub fn is_empty(&self) -> bool {
        self.services.values().all(BTreeMap::is_empty)
    }

    /// Every instance of every service, by service name then id.
    pub fn all(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flat_map(BTreeMap::values)
    }

    /// Instances that require `name` and take notifications.
    pub fn dependents(&self, name: &str) -> Vec<Instance> {
        self.all()
            .filter(|i| i.update_url.is_some() && i.required_services.iter().any(|r| r == name))
            .cloned()
            .collect()
    }

    /// For each service `registration` requires, its available instances (an empty
    /// list when there are none): the answer to a registration.
    pub fn required_by(&self, required: &[String]) -> BTreeMap<String, Vec<Instance>> {
        required
            .iter()
            .map(|name| (name.clone(), self.available(name)))
            .collect()
    }
}

/// The times a [`Command::Reap`] judges instances by.
#[derive(Debug, Clone, Copy)]
struct Reaping {
    now_ms: u64,
    deregister_after_ms: u64,
    grace_from_ms: u64,
}

impl Reaping {
    /// A passing TTL instance whose last sign of life (or the grace's start) is
    /// older than its TTL.
    fn ttl_ran_out(self, instance: &Instance) -> bool {
        instance.ttl_ms.is_some_and(|ttl| {
            instance.health == Health::Passing
                && self
                    .now_ms
                    .saturating_sub(instance.last_seen_ms.max(self.grace_from_ms))
                    > ttl
        })
    }

    /// An instance critical for at least the deregister-after period.
    fn critical_too_long(self, instance: &Instance) -> bool {
        instance
            .critical_since_ms
            .is_some_and(|since| self.now_ms.saturating_sub(since) >= self.deregister_after_ms)
    }
}

/// Sets an instance's health; returns whether it changed, pushing the event.
fn set_health(
    instance: &mut Instance,
    health: Health,
    at_ms: u64,
    events: &mut Vec<Event>,
) -> bool {
    if instance.health == health {
        return false;
    }
    instance.health = health;
    match health {
        Health::Passing => {
            instance.critical_since_ms = None;
            events.push(Event::Available(instance.clone()));
        }
        Health::Critical => {
            instance.critical_since_ms = Some(at_ms);
            events.push(Event::Unavailable(instance.clone()));
        }
    }
    true
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
