//! Shipping a service's log lines to the log service.
//!
//! [`log_shipping`] returns a `tracing` layer and a handle. The layer formats each
//! event as one line and puts it in a bounded buffer without ever waiting; a
//! background task sends the buffer to the log service's `logs` topic in batches (one
//! request per batch). When the buffer is full or the log service is down, lines are
//! dropped and counted, and the count is reported in the log once it is back.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Lines sent per request at most.
const BATCH: usize = 500;

/// What shipping did so far.
#[derive(Debug, Clone, Default)]
pub struct LogShipping {
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl LogShipping {
    /// Lines the log service acknowledged.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Lines dropped: the buffer was full, or the log service could not be reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The `tracing` layer that feeds the buffer.
#[derive(Debug)]
pub struct LogLayer {
    service: String,
    lines: mpsc::Sender<String>,
    stats: LogShipping,
}

/// A layer that ships `service`'s log lines to the log service at `log_url` (its
/// base URL) through a buffer of `capacity` lines, and a handle with its counts.
/// Must be called within a tokio runtime (the sender runs on it).
pub fn log_shipping(service: &str, log_url: &str, capacity: usize) -> (LogLayer, LogShipping) {
    let (lines, queue) = mpsc::channel(capacity.max(1));
    let stats = LogShipping::default();
    let endpoint = format!("{}/v1/topics/logs/records", log_url.trim_end_matches('/'));
    tokio::spawn(send_batches(queue, endpoint, stats.clone()));
    (
        LogLayer {
            service: service.to_owned(),
            lines,
            stats: stats.clone(),
        },
        stats,
    )
}

/// Events of the HTTP stack would be shipped by the HTTP stack: a feedback loop.
fn is_shipping_noise(target: &str) -> bool {
    ["hyper", "h2", "reqwest", "tower", "keel::service::logship"]
        .iter()
        .any(|prefix| target.starts_with(prefix))
}

#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        if is_shipping_noise(metadata.target()) {
            return;
        }
        let mut line = Line(format!(
            "{} {} {}:",
            metadata.level(),
            self.service,
            metadata.target()
        ));
        event.record(&mut line);
        if self.lines.try_send(line.0).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn send_batches(mut queue: mpsc::Receiver<String>, endpoint: String, stats: LogShipping) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            eprintln!("log shipping disabled: cannot build an HTTP client: {err}");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut reported = 0;
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let dropped = stats.dropped();
        if dropped > reported {
            batch.push(format!(
                "WARN keel log shipping: {} lines were dropped",
                dropped - reported
            ));
        }
        let records: Vec<serde_json::Value> = batch
            .iter()
            .map(|line| serde_json::json!({"value": base64::engine::general_purpose::STANDARD.encode(line)}))
            .collect();
        let sent = client
            .post(&endpoint)
            .json(&serde_json::json!({"records": records}))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                reported = dropped;
            }
            _ => {
                stats
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                // Do not hammer a log service that is down; lines keep being counted.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        batch.clear();
    }
}
