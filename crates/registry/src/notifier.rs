//! Telling dependents that an instance they require appeared (`POST`) or went
//! (`DELETE`), with the instance as JSON and the registry's change index in the
//! `Keel-Index` header (a notification sent again, after a leader change, carries
//! the same index: a dependent drops what it has seen).
//!
//! Each dependent's update URL has its own queue and worker: deliveries to one
//! dependent keep their order (a "gone" never overtakes the "appeared" before it),
//! and an unreachable dependent only delays its own queue. Deliveries time out and
//! are retried with backoff; a full queue drops new deliveries and counts them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::Method;
use tokio::sync::mpsc;

use crate::pacer::Pacer;
use crate::state::{Instance, Notice};

/// How long a dependent's worker waits for work before it stops (a new delivery
/// starts a new one), so that dependents that come and go leave nothing behind.
const IDLE: Duration = Duration::from_secs(60);

/// One notification to send.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    url: String,
    method: Method,
    instance: Instance,
    /// The change index of the change it tells of.
    index: u64,
    /// What the notification is signed with.
    secret: Option<String>,
}

/// The header that carries a notification's change index.
pub const INDEX_HEADER: &str = "keel-index";

impl Delivery {
    pub(crate) fn of(notice: &Notice) -> Self {
        Self {
            url: notice.url.clone(),
            method: if notice.available {
                Method::POST
            } else {
                Method::DELETE
            },
            instance: notice.instance.clone(),
            index: notice.index,
            secret: notice.secret.clone(),
        }
    }
}

/// Counts of what the notifier did.
#[derive(Debug, Default)]
pub(crate) struct NotifierStats {
    pub(crate) delivered: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

/// Sends notifications in the background.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    client: reqwest::Client,
    /// Paces requests to each target, checks included.
    pub(crate) pacer: Arc<Pacer>,
    queues: Arc<Mutex<HashMap<String, mpsc::Sender<Delivery>>>>,
    timeout: Duration,
    retries: u32,
    queue_depth: usize,
    /// How long an idle worker waits before it stops ([`IDLE`]).
    idle: Duration,
    /// Deliveries expected or under way, by change index.
    pending: Arc<Mutex<BTreeMap<u64, usize>>>,
    pub(crate) stats: Arc<NotifierStats>,
}

impl Notifier {
    pub(crate) fn new(
        client: reqwest::Client,
        timeout: Duration,
        retries: u32,
        queue_depth: usize,
        pacer: Arc<Pacer>,
    ) -> Self {
        Self {
            client,
            pacer,
            queues: Arc::default(),
            timeout,
            retries,
            queue_depth,
            idle: IDLE,
            pending: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Counts `notices` as under way before they are delivered, so that
    /// [`Notifier::oldest_pending`] never passes them.
    pub(crate) fn expect(&self, notices: &[Notice]) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for notice in notices {
            *pending.entry(notice.index).or_default() += 1;
        }
    }

    /// The change index of the oldest delivery expected or under way.
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.keys().next().copied()
    }

    fn finished(&self, index: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = pending.get_mut(&index) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&index);
            }
        }
    }

    /// Queues a delivery (expected by [`Notifier::expect`]); never waits. Must be
    /// called within the tokio runtime.
    pub(crate) fn deliver(&self, delivery: Delivery) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = queues
            .entry(delivery.url.clone())
            .or_insert_with(|| self.spawn_worker(delivery.url.clone()));
        if let Err(refused) = queue.try_send(delivery) {
            let delivery = match refused {
                mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
            };
            self.finished(delivery.index);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("a dependent's notification queue is full; dropping a notification");
        }
    }

    fn spawn_worker(&self, url: String) -> mpsc::Sender<Delivery> {
        let (tx, mut rx) = mpsc::channel::<Delivery>(self.queue_depth);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(this.idle, rx.recv()).await {
                    Ok(Some(delivery)) => {
                        this.send_with_retries(&delivery).await;
                        this.finished(delivery.index);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // Idle: leave, unless a delivery arrived meanwhile. Deliveries are
                        // queued under the same lock, so none can be lost in between.
                        let mut queues = this.queues.lock().unwrap_or_else(PoisonError::into_inner);
                        if rx.is_empty() {
                            queues.remove(&url);
                            break;
                        }
                    }
                }
            }
            tracing::debug!(url, "notification worker stopped");
        });
        tx
    }

    async fn send_with_retries(&self, delivery: &Delivery) {
        let mut backoff = Duration::from_millis(100);
        let body = match serde_json::to_vec(&delivery.instance) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!(error = %err, "a notification could not be encoded");
                return;
            }
        };
        let signature = delivery.secret.as_ref().map(|secret| {
            keel_auth::signature::sign(secret, delivery.method.as_str(), delivery.index, &body)
        });
        for attempt in 0..=self.retries {
            self.pacer.wait_turn(&delivery.url).await;
            let mut request = self
                .client
                .request(delivery.method.clone(), &delivery.url)
                .header(INDEX_HEADER, delivery.index)
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            if let Some(signature) = &signature {
                request = request.header(keel_auth::signature::SIGNATURE_HEADER, signature);
            }
            let sent = request
                .body(body.clone())
                .timeout(self.timeout)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(response) => {
                    tracing::debug!(url = delivery.url, status = %response.status(), attempt, "notification refused");
                }
                Err(err) => {
                    tracing::debug!(url = delivery.url, error = %err, attempt, "notification failed")
                }
            }
            if attempt < self.retries {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            url = delivery.url,
            instance = delivery.instance.id,
            service = delivery.instance.name,
            "could not notify a dependent; giving up on this notification"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::*;
    use crate::state::Health;

    fn notice(url: &str, index: u64) -> Notice {
        Notice {
            index,
            url: url.to_owned(),
            available: true,
            instance: instance(),
            secret: None,
        }
    }

    fn instance() -> Instance {
        Instance {
            id: "127.0.0.1:9".into(),
            name: "log".into(),
            url: "http://127.0.0.1:9".into(),
            required_services: Vec::new(),
            update_url: None,
            heartbeat_url: None,
            meta: BTreeMap::new(),
            health: Health::Passing,
            registered_at_ms: 0,
            critical_since_ms: None,
            ttl_ms: None,
            last_seen_ms: 0,
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn idle_workers_should_leave_and_come_back_when_needed() {
        let mut notifier = Notifier::new(
            keel_serve::client::new(),
            Duration::from_millis(200),
            0,
            8,
            Arc::new(Pacer::new(0)),
        );
        notifier.idle = Duration::from_millis(100);
        let queues = |n: &Notifier| n.queues.lock().unwrap().len();
        // Port 1 on loopback refuses at once: each delivery fails quickly.
        let url = "http://127.0.0.1:1/services".to_owned();
        let first = notice(&url, 1);
        notifier.expect(std::slice::from_ref(&first));
        assert_eq!(notifier.oldest_pending(), Some(1));
        notifier.deliver(Delivery::of(&first));
        assert_eq!(queues(&notifier), 1);
        until("the first delivery", || {
            notifier.stats.failed.load(Ordering::Relaxed) == 1
        })
        .await;
        until("the idle worker leaves", || queues(&notifier) == 0).await;
        assert_eq!(
            notifier.oldest_pending(),
            None,
            "given up on: no longer pending"
        );

        // A later delivery to the same dependent starts a new worker and is sent.
        notifier.deliver(Delivery::of(&notice(&url, 2)));
        assert_eq!(queues(&notifier), 1);
        until("the second delivery", || {
            notifier.stats.failed.load(Ordering::Relaxed) == 2
        })
        .await;
        until("the second worker leaves", || queues(&notifier) == 0).await;
    }
}
