//! A local table of where services run, and choosing an instance from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;

/// An instance of another service, as the registry describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceInstance {
    /// Unique within its service.
    pub id: String,
    /// The service.
    pub name: String,
    /// Its base URL, e.g. `http://127.0.0.1:20002`.
    pub url: String,
}

/// How [`Discovery::pick`] chooses among instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Uniformly at random (what the original system did).
    Random,
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Of two random instances, the one with fewer requests in flight (through
    /// [`Picked`] guards).
    PowerOfTwoChoices,
}

#[derive(Debug)]
struct Entry {
    /// Shared with every [`Picked`] of it: picking copies no strings.
    instance: Arc<ServiceInstance>,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Table {
    services: HashMap<String, Vec<Entry>>,
}

/// A cheap, cloneable view of where required services run.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    table: Arc<RwLock<Table>>,
    turn: Arc<AtomicUsize>,
    seed: Arc<AtomicU64>,
}

/// A chosen instance; counts as one request in flight until dropped.
#[derive(Debug)]
pub struct Picked {
    /// The instance.
    pub instance: Arc<ServiceInstance>,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for Picked {
    type Target = ServiceInstance;

    fn deref(&self) -> &ServiceInstance {
        &self.instance
    }
}

impl Discovery {
    /// The names of every service in the table.
    pub fn services(&self) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.services.keys().cloned().collect()
    }

    /// The known instances of `name`.
    pub fn instances(&self, name: &str) -> Vec<ServiceInstance> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table
            .services
            .get(name)
            .map(|entries| entries.iter().map(|e| (*e.instance).clone()).collect())
            .unwrap_or_default()
    }

    /// Chooses an instance of `name`, or `None` when none is known.
    pub fn pick(&self, name: &str, policy: Policy) -> Option<Picked> {
        self.pick_where(name, policy, |_| true)
    }

    /// Chooses among the instances of `name` that `allowed` accepts (say, not ejected
    /// and not tried yet), or `None` when there are none.
    pub fn pick_where(
        &self,
        name: &str,
        policy: Policy,
        allowed: impl Fn(&ServiceInstance) -> bool,
    ) -> Option<Picked> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let all = table.services.get(name)?;
        // The n-th allowed entry, found without collecting them (this runs per request).
        let allowed_count = all.iter().filter(|e| allowed(&e.instance)).count();
        let nth = |n: usize| all.iter().filter(|e| allowed(&e.instance)).nth(n);
        if allowed_count == 0 {
            return None;
        }
        let entry = match policy {
            Policy::Random => nth(self.random() % allowed_count)?,
            Policy::RoundRobin => nth(self.turn.fetch_add(1, Ordering::Relaxed) % allowed_count)?,
            Policy::PowerOfTwoChoices => {
                let a = nth(self.random() % allowed_count)?;
                let b = nth(self.random() % allowed_count)?;
                if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
        };
        entry.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            instance: Arc::clone(&entry.instance),
            in_flight: Arc::clone(&entry.in_flight),
        })
    }

    /// xorshift64*: fast, and good enough to spread load.
    fn random(&self) -> usize {
        let mut x = self.seed.load(Ordering::Relaxed);
        if x == 0 {
            x = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
                | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize
    }

    /// Adds an instance (what a `POST` notification says).
    pub fn add(&self, instance: ServiceInstance) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let entries = table.services.entry(instance.name.clone()).or_default();
        if !entries.iter().any(|e| e.instance.id == instance.id) {
            entries.push(Entry {
                instance: Arc::new(instance),
                in_flight: Arc::default(),
            });
        }
    }

    /// Removes an instance (what a `DELETE` notification says).
    pub fn remove(&self, name: &str, id: &str) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entries) = table.services.get_mut(name) {
            entries.retain(|e| e.instance.id != id);
        }
    }

    /// Replaces what is known of `name` (from a watch answer), keeping in-flight counts.
    pub fn replace(&self, name: &str, instances: Vec<ServiceInstance>) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let old = table.services.remove(name).unwrap_or_default();
        let entries = instances
            .into_iter()
            .map(|instance| {
                let in_flight = old
                    .iter()
                    .find(|e| e.instance.id == instance.id)
                    .map_or_else(Arc::default, |e| Arc::clone(&e.in_flight));
                Entry {
                    instance: Arc::new(instance),
                    in_flight,
                }
            })
            .collect();
        table.services.insert(name.to_owned(), entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            name: "log".into(),
            url: format!("http://{id}"),
        }
    }

    #[test]
    fn round_robin_should_take_turns_and_random_should_reach_every_instance() {
        let discovery = Discovery::default();
        assert!(discovery.pick("log", Policy::RoundRobin).is_none());
        for id in ["a:1", "b:1", "c:1"] {
            discovery.add(instance(id));
        }
        discovery.add(instance("a:1"));
        assert_eq!(
            discovery.instances("log").len(),
            3,
            "adding twice keeps one"
        );
        let turns: Vec<String> = (0..6)
            .map(|_| {
                discovery
                    .pick("log", Policy::RoundRobin)
                    .unwrap()
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(turns[..3], turns[3..], "a full cycle repeats");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(discovery.pick("log", Policy::Random).unwrap().id.clone());
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn power_of_two_should_avoid_the_busy_instance() {
        let discovery = Discovery::default();
        discovery.add(instance("busy:1"));
        discovery.add(instance("idle:1"));
        let held: Vec<Picked> = (0..50)
            .filter_map(|_| discovery.pick("log", Policy::RoundRobin))
            .filter(|p| p.id == "busy:1")
            .collect();
        assert!(!held.is_empty());
        let picks: Vec<String> = (0..100)
            .map(|_| {
                discovery
                    .pick("log", Policy::PowerOfTwoChoices)
                    .unwrap()
                    .id
                    .clone()
            })
            .collect();
        let busy = picks.iter().filter(|id| *id == "busy:1").count();
        assert!(busy < 40, "{busy} of 100 picks went to the busy instance");
        drop(held);
    }

    #[test]
    fn remove_and_replace_should_update_the_table() {
        let discovery = Discovery::default();
        discovery.add(instance("a:1"));
        discovery.add(instance("b:1"));
        discovery.remove("log", "a:1");
        assert_eq!(discovery.instances("log"), [instance("b:1")]);
        discovery.replace("log", vec![instance("c:1")]);
        assert_eq!(discovery.instances("log"), [instance("c:1")]);
    }
}
