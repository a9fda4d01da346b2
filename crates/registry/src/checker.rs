//! Active health checks and reaping.
//!
//! Every `check_interval`, each instance with a heartbeat URL (and no TTL) is checked
//! by a pool of at most `check_workers` concurrent checks: up to `check_failures`
//! `GET`s, `check_retry_delay` apart, each limited to `check_timeout`. Any success
//! means passing; all failing means critical. A check still running from the last
//! round is not started again, so one slow instance never delays the others and the
//! round does not grow with the number of instances. Every second, TTL instances
//! that missed their heartbeat turn critical and instances critical for longer than
//! `deregister_after` are removed.
//!
//! Only a registry that leads checks and reaps (a single one always does), and it
//! records only changes of health, so a cluster's Raft log holds verdicts, not
//! checks. A node that takes the lead starts from scratch: every instance passes
//! until its own checks fail `check_failures` times, and no TTL runs out before a
//! full TTL after it took the lead.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RegistryConfig;
use crate::pacer::Pacer;
use crate::registry::{Registry, now_ms};
use crate::state::{Command, Health};

/// Checks made and failed, for metrics.
#[derive(Debug, Default)]
pub(crate) struct CheckStats {
    pub(crate) checks: std::sync::atomic::AtomicU64,
    pub(crate) failed: std::sync::atomic::AtomicU64,
}

pub(crate) async fn run(
    registry: Arc<Registry>,
    config: RegistryConfig,
    client: reqwest::Client,
    stats: Arc<CheckStats>,
    shutdown: CancellationToken,
) {
    let pool = Arc::new(Semaphore::new(config.check_workers));
    let in_flight: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let running = TaskTracker::new();
    let mut checks = tokio::time::interval(config.check_interval);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reaps = tokio::time::interval(Duration::from_secs(1).min(config.check_interval));
    reaps.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deregister_after_ms = config
        .deregister_after
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = reaps.tick() => {
                let Some(grace_from_ms) = registry.leading_since() else {
                    continue;
                };
                if let Some(up_to) = registry.notified_due() {
                    // The sent notifications leave the outbox, replicated: a next
                    // leader does not send them again.
                    if let Err(err) = registry.execute(Command::Notified { up_to }).await {
                        tracing::debug!(error = %err, "recording sent notifications failed");
                    }
                }
                let now_ms = now_ms();
                if registry.reap_due(now_ms, config.deregister_after, grace_from_ms) {
                    let reap = Command::Reap { now_ms, deregister_after_ms, grace_from_ms };
                    if let Err(err) = registry.execute(reap).await {
                        tracing::warn!(error = %err, "reaping failed; retrying at the next round");
                    }
                }
            }
            _ = checks.tick() => {
                if registry.leading_since().is_none() {
                    continue;
                }
                for (name, id, url) in registry.check_targets() {
                    let key = (name.clone(), id.clone());
                    if !in_flight.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone()) {
                        continue;
                    }
                    let check = Check {
                        registry: Arc::clone(&registry),
                        client: client.clone(),
                        config: config.clone(),
                        stats: Arc::clone(&stats),
                        name,
                        id,
                        url,
                    };
                    let (pool, in_flight, stop) =
                        (Arc::clone(&pool), Arc::clone(&in_flight), shutdown.clone());
                    // Waiting for a worker happens in the check's own task, never in
                    // this loop: reaping and shutdown do not wait behind slow checks.
                    running.spawn(async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = check.run(&pool) => {}
                        }
                        in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
                    });
                }
            }
        }
    }
    running.close();
    running.wait().await;
}

/// One health check of one instance.
struct Check {
    registry: Arc<Registry>,
    client: reqwest::Client,
    config: RegistryConfig,
    stats: Arc<CheckStats>,
    name: String,
    id: String,
    url: String,
}

impl Check {
    /// Takes a worker from `pool`, probes, and records the health.
    async fn run(self, pool: &Semaphore) {
        let Ok(_permit) = pool.acquire().await else {
            return;
        };
        let pacer = Arc::clone(&self.registry.notifier().pacer);
        let passing = probe(&self.client, &self.url, &self.config, &pacer).await;
        self.stats
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !passing {
            self.stats
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                service = self.name,
                instance = self.id,
                url = self.url,
                "health check failed"
            );
        }
        let health = if passing {
            Health::Passing
        } else {
            Health::Critical
        };
        // Only a change is recorded; the instance may have gone meanwhile, and this
        // registry may have stopped leading.
        if self.registry.health(&self.name, &self.id) == Some(health)
            || self.registry.leading_since().is_none()
        {
            return;
        }
        let (name, id) = (self.name, self.id);
        let verdict = Command::SetHealth {
            name,
            id,
            health,
            at_ms: now_ms(),
        };
        match self.registry.execute(verdict).await {
            Ok(_) | Err(crate::RegistryError::UnknownInstance { .. }) => {}
            Err(err) => tracing::warn!(error = %err, "recording a health verdict failed"),
        }
    }
}

/// Up to `check_failures` attempts; true at the first success.
async fn probe(
    client: &reqwest::Client,
    url: &str,
    config: &RegistryConfig,
    pacer: &Pacer,
) -> bool {
    for attempt in 1..=config.check_failures {
        pacer.wait_turn(url).await;
        // Only the status is read: the body of the answer never is.
        let answer = client.get(url).timeout(config.check_timeout).send().await;
        if answer.is_ok_and(|response| response.status().is_success()) {
            return true;
        }
        if attempt < config.check_failures {
            tokio::time::sleep(config.check_retry_delay).await;
        }
    }
    false
}
