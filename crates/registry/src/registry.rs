//! [`Registry`]: the state machine behind a lock, with what changes fan out to:
//! watchers (a change index and a stream of changes) and dependents (notifications).

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::error::{RegistryError, Result};
use crate::notifier::{Delivery, Notifier};
use crate::registration::Registration;
use crate::state::{Command, Delta, Event, Instance, RegistryState};

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
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, RegistryState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, RegistryState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a command, then tells watchers and dependents what changed.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`].
    pub fn apply(&self, command: Command) -> Result<Vec<Event>> {
        let (events, deliveries, index) = {
            let mut state = self.state_mut();
            let events = state.apply(command)?;
            let mut deliveries = Vec::new();
            for event in &events {
                let instance = event.instance();
                for dependent in state.dependents(&instance.name) {
                    if let Some(url) = dependent.update_url {
                        deliveries.push(Delivery::new(url, event));
                    }
                }
            }
            (events, deliveries, state.index())
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
        for delivery in deliveries {
            self.notifier.deliver(delivery);
        }
        Ok(events)
    }

    /// Registers (or updates) an instance and returns, for each service it requires,
    /// the available instances. It is also sent a `POST` for each of those, as it
    /// would have been had it registered before them.
    ///
    /// # Errors
    ///
    /// As [`RegistryState::apply`].
    pub fn register(&self, registration: Registration) -> Result<BTreeMap<String, Vec<Instance>>> {
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
        let required = registration.required_services.clone();
        let update_url = registration.update_url.clone();
        self.apply(Command::Register {
            registration,
            at_ms: now_ms(),
        })?;
        let answer = self.state().required_by(&required);
        if let Some(url) = update_url {
            for instance in answer.values().flatten() {
                self.notifier.deliver(Delivery::new(
                    url.clone(),
                    &Event::Available(instance.clone()),
                ));
            }
        }
        Ok(answer)
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
