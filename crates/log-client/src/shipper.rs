//! Sending lines to a topic from another service, in the background: the SDK's log
//! shipping and the gateway's access log.
//!
//! [`Shipper::ship`] never waits: lines go into a bounded buffer, or are dropped and
//! counted when it is full. A background task sends the buffer to the topic in
//! batches, one HTTP request per batch, to any node of a cluster (a follower
//! forwards to the leader). A batch no node takes is kept and sent again, backing
//! off, while new lines wait in the buffer: while the log service is away, a shipper
//! holds its buffer's lines plus the batch in hand and drops (and counts) only what
//! does not fit. The count of dropped lines is reported in the topic once deliveries
//! work again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use keel_serve::tls::ClientTlsFiles;
use tokio::sync::mpsc;

/// Lines sent per request at most.
const BATCH: usize = 500;

/// Nodes asked per attempt at a batch, at most.
const NODES_PER_ATTEMPT: usize = 3;

/// The longest pause between attempts at a batch no node took.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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
    /// `http://127.0.0.1:20002`; a cluster's nodes, comma-separated) through a buffer
    /// of `capacity` lines. A node that does not take a batch passes it to the next.
    /// Must be called within a tokio runtime.
    pub fn new(log_url: &str, topic: &str, capacity: usize) -> Self {
        Self::new_as(log_url, topic, capacity, (None, None))
    }

    /// As [`Shipper::new`], with a token and TLS as [`Shipper::resolving_as`]
    /// takes them; a node given as `host:port` is then reached over `https`.
    pub fn new_as(
        log_url: &str,
        topic: &str,
        capacity: usize,
        (token, tls): (Option<&str>, Option<&ClientTlsFiles>),
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let nodes: Vec<String> = log_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                if url.contains("://") {
                    url.to_owned()
                } else {
                    format!("{scheme}://{url}")
                }
            })
            .collect();
        let next = AtomicU64::new(0);
        Self::resolving_as(
            move || {
                let at = next.fetch_add(1, Ordering::Relaxed) as usize;
                (!nodes.is_empty()).then(|| nodes[at % nodes.len()].clone())
            },
            topic,
            capacity,
            (token, tls),
        )
    }

    /// Like [`Shipper::new`], but the log service's base URL is asked of `resolve`
    /// for each attempt at a batch (through discovery, say); while it answers `None`,
    /// lines wait as while no node takes them. Must be called within a tokio runtime.
    pub fn resolving(
        resolve: impl Fn() -> Option<String> + Send + 'static,
        topic: &str,
        capacity: usize,
    ) -> Self {
        Self::resolving_as(resolve, topic, capacity, (None, None))
    }

    /// As [`Shipper::resolving`], sending `Authorization: Bearer <token>` with every
    /// batch when a token is given (for a log service with an ACL), and reaching
    /// `https` URLs with `tls` when given (the CA to trust, the certificate to
    /// present).
    pub fn resolving_as(
        resolve: impl Fn() -> Option<String> + Send + 'static,
        topic: &str,
        capacity: usize,
        (token, tls): (Option<&str>, Option<&ClientTlsFiles>),
    ) -> Self {
        let (lines, queue) = mpsc::channel(capacity.max(1));
        let stats = ShipperStats::default();
        match http_client(token, tls) {
            Ok(client) => {
                tokio::spawn(send_batches(
                    queue,
                    resolve,
                    (topic.to_owned(), client),
                    stats.clone(),
                ));
            }
            // Lines then fill the buffer and are dropped, counted.
            Err(err) => eprintln!("line shipping to topic {topic} disabled: {err}"),
        }
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

/// The client batches go out with: a 5 s timeout, the token on every request.
fn http_client(
    token: Option<&str>,
    tls: Option<&ClientTlsFiles>,
) -> Result<reqwest::Client, String> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    keel_serve::client::with_tls(keel_serve::client::builder(), tls)
        .map_err(|err| err.to_string())?
        .timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .map_err(|err| format!("cannot build an HTTP client: {err}"))
}

async fn send_batches(
    mut queue: mpsc::Receiver<String>,
    resolve: impl Fn() -> Option<String>,
    (topic, client): (String, reqwest::Client),
    stats: ShipperStats,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut reported = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        if batch.is_empty() && queue.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let dropped = stats.dropped();
        let mut records: Vec<serde_json::Value> = batch.iter().map(|line| record(line)).collect();
        // The report of earlier drops is the shipper's own line, made anew for each
        // attempt, never counted as sent or dropped.
        if dropped > reported {
            records.push(record(&format!(
                "WARN keel line shipping: {} lines were dropped",
                dropped - reported
            )));
        }
        let body = serde_json::json!({"records": records});
        let mut taken = false;
        for _ in 0..NODES_PER_ATTEMPT {
            let Some(base) = resolve() else { break };
            let endpoint = format!("{}/v1/topics/{topic}/records", base.trim_end_matches('/'));
            if client
                .post(endpoint)
                .json(&body)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success())
            {
                taken = true;
                break;
            }
        }
        if taken {
            stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            reported = dropped;
            batch.clear();
            backoff = Duration::from_millis(100);
        } else {
            // Kept for the next attempt; the buffer takes what comes meanwhile.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn record(line: &str) -> serde_json::Value {
    serde_json::json!({"value": base64::engine::general_purpose::STANDARD.encode(line)})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log service that takes nothing until `open` is set, then everything; it
    /// counts the lines it took.
    async fn log_service(
        open: Arc<std::sync::atomic::AtomicBool>,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use axum::http::StatusCode;
        let took: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let record = Arc::clone(&took);
        let app = axum::Router::new().route(
            "/v1/topics/{topic}/records",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let (open, record) = (Arc::clone(&open), Arc::clone(&record));
                async move {
                    if !open.load(Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    for r in body["records"].as_array().into_iter().flatten() {
                        let value = r["value"].as_str().unwrap_or_default();
                        let line = base64::engine::general_purpose::STANDARD
                            .decode(value)
                            .unwrap_or_default();
                        record
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&line).into_owned());
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, took)
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

    #[tokio::test]
    async fn lines_should_wait_out_a_log_service_that_is_away_and_go_to_any_node() {
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, took) = log_service(Arc::clone(&open)).await;
        // A dead node first: the batch passes to the next.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let shipper = Shipper::new(&format!("{closed},{url}"), "logs", 16);
        for n in 0..10 {
            shipper.ship(format!("line {n}"));
        }
        // Nobody takes lines for a while (an election): they wait, none is lost.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(shipper.stats().sent(), 0);
        assert_eq!(shipper.stats().dropped(), 0);
        open.store(true, Ordering::SeqCst);
        until("the waiting lines are sent", || {
            shipper.stats().sent() == 10
        })
        .await;
        assert_eq!(took.lock().unwrap().len(), 10);
        assert_eq!(took.lock().unwrap()[9], "line 9");

        // Past the buffer (and the batch in hand), lines are dropped and counted, and
        // the count is reported once lines go through again.
        open.store(false, Ordering::SeqCst);
        shipper.ship("held".into());
        until("the batch in hand", || shipper.lines.capacity() == 16).await;
        for n in 0..40 {
            shipper.ship(format!("more {n}"));
        }
        assert_eq!(shipper.stats().dropped(), 40 - 16);
        open.store(true, Ordering::SeqCst);
        until("the held lines are sent", || {
            shipper.stats().sent() == 10 + 1 + 16
        })
        .await;
        until("the report", || {
            took.lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("24 lines were dropped"))
        })
        .await;
    }

    #[tokio::test]
    async fn lines_should_wait_while_no_log_service_is_known() {
        let shipper = Shipper::resolving(|| None, "logs", 4);
        for n in 0..10 {
            shipper.ship(format!("line {n}"));
        }
        // At most the buffer and the batch in hand are kept; the rest is counted.
        until("the overflow is counted", || shipper.stats().dropped() >= 2).await;
        assert!(
            shipper.stats().dropped() <= 6,
            "{}",
            shipper.stats().dropped()
        );
        assert_eq!(shipper.stats().sent(), 0);
    }

    #[tokio::test]
    async fn a_shipper_with_a_token_should_send_it_with_every_batch() {
        let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let record = Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/v1/topics/{topic}/records",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let record = Arc::clone(&record);
                async move {
                    let authorization = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    record.lock().unwrap().push(authorization);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let shipper =
            Shipper::resolving_as(move || Some(url.clone()), "logs", 16, (Some("t0k"), None));
        shipper.ship("a line".into());
        until("a batch", || !seen.lock().unwrap().is_empty()).await;
        assert_eq!(seen.lock().unwrap()[0], "Bearer t0k");
    }
}
