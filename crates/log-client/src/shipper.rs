//! Sending lines to a topic from another service, in the background: the SDK's log
//! shipping and the gateway's access log.
//!
//! [`Shipper::ship`] never waits: lines go into a bounded buffer, or are dropped and
//! counted when it is full. A background task sends the buffer to the topic in
//! batches, one HTTP request per batch. Lines that cannot be delivered are counted as
//! dropped, and the count is reported in the topic once deliveries work again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use tokio::sync::mpsc;

/// Lines sent per request at most.
const BATCH: usize = 500;

/// What a shipper did so far.
#[derive(Debug, Clone, Default)]
pub struct ShipperStats {
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl ShipperStats {
    /// Lines the log service acknowledged.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Lines dropped: the buffer was full, or the log service could not be reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A handle that queues lines for a topic; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shipper {
    lines: mpsc::Sender<String>,
    stats: ShipperStats,
}

impl Shipper {
    /// Ships lines to `topic` of the log service at `log_url` (its base URL, e.g.
    /// `http://127.0.0.1:20002`) through a buffer of `capacity` lines. Must be called
    /// within a tokio runtime.
    pub fn new(log_url: &str, topic: &str, capacity: usize) -> Self {
        let log_url = log_url.to_owned();
        Self::resolving(move || Some(log_url.clone()), topic, capacity)
    }

    /// Like [`Shipper::new`], but the log service's base URL is asked of `resolve`
    /// for each batch (through discovery, say); while it answers `None`, lines are
    /// dropped and counted. Must be called within a tokio runtime.
    pub fn resolving(
        resolve: impl Fn() -> Option<String> + Send + 'static,
        topic: &str,
        capacity: usize,
    ) -> Self {
        let (lines, queue) = mpsc::channel(capacity.max(1));
        let stats = ShipperStats::default();
        tokio::spawn(send_batches(
            queue,
            resolve,
            topic.to_owned(),
            stats.clone(),
        ));
        Self { lines, stats }
    }

    /// Queues a line; never waits. A full buffer drops it (and counts it).
    pub fn ship(&self, line: String) {
        if self.lines.try_send(line).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts of this shipper.
    pub fn stats(&self) -> &ShipperStats {
        &self.stats
    }
}

async fn send_batches(
    mut queue: mpsc::Receiver<String>,
    resolve: impl Fn() -> Option<String>,
    topic: String,
    stats: ShipperStats,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            eprintln!(
                "line shipping to topic {topic} disabled: cannot build an HTTP client: {err}"
            );
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut reported = 0;
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let dropped = stats.dropped();
        // The report of earlier drops is the shipper's own line: when it cannot be
        // delivered either it is written anew next time, never counted as a drop.
        let reporting = dropped > reported;
        if reporting {
            batch.push(format!(
                "WARN keel line shipping: {} lines were dropped",
                dropped - reported
            ));
        }
        let records: Vec<serde_json::Value> = batch
            .iter()
            .map(|line| serde_json::json!({"value": base64::engine::general_purpose::STANDARD.encode(line)}))
            .collect();
        let sent = match resolve() {
            Some(base) => {
                let endpoint = format!("{}/v1/topics/{topic}/records", base.trim_end_matches('/'));
                client
                    .post(endpoint)
                    .json(&serde_json::json!({"records": records}))
                    .send()
                    .await
                    .ok()
            }
            None => None,
        };
        match sent {
            Some(response) if response.status().is_success() => {
                stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                reported = dropped;
            }
            _ => {
                let lines = batch.len() - usize::from(reporting);
                stats.dropped.fetch_add(lines as u64, Ordering::Relaxed);
                // Do not hammer a log service that is down; lines keep being counted.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_drop_count_should_be_exact_however_lines_are_batched() {
        let shipper = Shipper::resolving(|| None, "logs", 16);
        shipper.ship("first".into());
        while shipper.stats().dropped() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The next batch carries the report of the first drop as well: when that
        // fails too, only the two lines count.
        shipper.ship("second".into());
        shipper.ship("third".into());
        while shipper.stats().dropped() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(shipper.stats().dropped(), 3);
    }

    #[tokio::test]
    async fn lines_should_be_dropped_and_counted_while_no_log_service_is_known() {
        let shipper = Shipper::resolving(|| None, "logs", 16);
        for n in 0..3 {
            shipper.ship(format!("line {n}"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shipper.stats().dropped() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "lines not counted as dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shipper.stats().sent(), 0);
    }
}
