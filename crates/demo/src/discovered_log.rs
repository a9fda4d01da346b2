//! The log service as the demos use it: found through discovery, spoken to over
//! HTTP/JSON (docs/api/log.md).

use std::time::Duration;

use bytes::Bytes;
use keel_sdk::{Discovery, Shipper};
use keel_serve::tls::ClientTlsFiles;
use reqwest::StatusCode;
use serde::Deserialize;

use crate::{DemoError, get_json, pick_url};

/// Log lines that may wait to be shipped; more are dropped and counted.
const LINE_BUFFER: usize = 4096;

/// How long an append (or a read) keeps trying log nodes that cannot take it.
const APPEND_RETRY_FOR: Duration = Duration::from_secs(5);

/// The pause between tries of an append.
const APPEND_RETRY_PAUSE: Duration = Duration::from_millis(25);

/// The log service, wherever discovery says it runs.
#[derive(Debug, Clone)]
pub struct DiscoveredLog {
    discovery: Discovery,
    http: reqwest::Client,
    lines: Shipper,
    /// Sent as `Authorization: Bearer` to the log service.
    token: Option<String>,
}

/// One record of a topic, as text.
#[derive(Debug, Clone, Deserialize)]
pub struct LogLine {
    /// Its offset.
    pub offset: u64,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The value, when it is UTF-8.
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize)]
struct Appended {
    first_offset: u64,
}

#[derive(Deserialize)]
struct Topics {
    topics: Vec<TopicInfo>,
}

#[derive(Deserialize)]
struct TopicInfo {
    name: String,
    lowest_offset: u64,
    next_offset: u64,
}

#[derive(Deserialize)]
struct Records {
    records: Vec<LogLine>,
}

impl DiscoveredLog {
    /// The log service found through `discovery`, called with `http`, and with
    /// `token` when given (a log service with an ACL); lines are shipped with
    /// `token` and `tls`. Must be called within a tokio runtime (it starts the line
    /// shipper).
    pub fn new(
        discovery: Discovery,
        http: reqwest::Client,
        (token, tls): (Option<&str>, Option<&ClientTlsFiles>),
    ) -> Self {
        let lines = {
            let discovery = discovery.clone();
            Shipper::resolving_as(
                move || pick_url(&discovery, "log").ok(),
                "logs",
                LINE_BUFFER,
                (token, tls),
            )
        };
        Self {
            discovery,
            http,
            lines,
            token: token.map(str::to_owned),
        }
    }

    /// `request`, with the bearer token when there is one.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The base URL of a log service instance.
    fn base(&self) -> Result<String, DemoError> {
        pick_url(&self.discovery, "log")
    }

    /// Appends `value` to `topic` and returns its offset, once the log service has
    /// acknowledged it. An append that a log node could not take (it is down, or
    /// its cluster is electing a leader) is sent again, to the next node discovery
    /// offers, for up to 5 s; it carries an idempotency key (a
    /// producer of its own, `keel-producer`), so that a replicated log stores it
    /// once however often it is sent.
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when no log node took it in time, or one refused.
    pub async fn append(&self, topic: &str, value: Bytes) -> Result<u64, DemoError> {
        let failed = |err: String| DemoError::Unavailable(format!("the log service failed: {err}"));
        let producer = keel_sdk::new_producer_id();
        let deadline = tokio::time::Instant::now() + APPEND_RETRY_FOR;
        loop {
            let retry = match self.base() {
                Ok(base) => {
                    let request = self
                        .http
                        .post(format!("{base}/v1/topics/{topic}/records"))
                        .header("content-type", "application/octet-stream")
                        .header("keel-producer", producer)
                        .header("keel-sequence", 1)
                        .body(value.clone());
                    let sent = self.authorized(request).send().await;
                    match sent {
                        Ok(response) if response.status().is_success() => {
                            let appended: Appended = response
                                .json()
                                .await
                                .map_err(|err| failed(err.to_string()))?;
                            return Ok(appended.first_offset);
                        }
                        Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                            failed(format!("status {}", response.status()))
                        }
                        Ok(response) => {
                            return Err(failed(format!("status {}", response.status())));
                        }
                        Err(err) => failed(err.to_string()),
                    }
                }
                Err(err) => err,
            };
            if tokio::time::Instant::now() + APPEND_RETRY_PAUSE >= deadline {
                return Err(retry);
            }
            tracing::debug!(error = %retry, "retrying the append on another log node");
            tokio::time::sleep(APPEND_RETRY_PAUSE).await;
        }
    }

    /// Sends `line` to the `logs` topic in the background, batched with others; never
    /// waits, and a full buffer drops the line (and counts it).
    pub fn line(&self, line: String) {
        self.lines.ship(line);
    }

    /// The last `count` records of `topic` (fewer if it is shorter; none if it does
    /// not exist yet).
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when the log service cannot be reached.
    pub async fn last(&self, topic: &str, count: u64) -> Result<Vec<LogLine>, DemoError> {
        // A read changes nothing: tried again on the next node while one fails.
        let deadline = tokio::time::Instant::now() + APPEND_RETRY_FOR;
        loop {
            match self.last_at(&self.base()?, topic, count).await {
                Ok(lines) => return Ok(lines),
                Err(err) if tokio::time::Instant::now() + APPEND_RETRY_PAUSE < deadline => {
                    tracing::debug!(error = %err, "retrying the read on another log node");
                    tokio::time::sleep(APPEND_RETRY_PAUSE).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn last_at(
        &self,
        base: &str,
        topic: &str,
        count: u64,
    ) -> Result<Vec<LogLine>, DemoError> {
        let source = "reading the log service";
        let topics: Topics = get_json(
            self.authorized(self.http.get(format!("{base}/v1/topics"))),
            source,
        )
        .await?;
        let Some(info) = topics.topics.iter().find(|t| t.name == topic) else {
            return Ok(Vec::new());
        };
        // Retention may have dropped older records.
        let from = info
            .next_offset
            .saturating_sub(count)
            .max(info.lowest_offset);
        let url = format!("{base}/v1/topics/{topic}/records?from={from}&max={count}");
        let records: Records = get_json(self.authorized(self.http.get(url)), source).await?;
        Ok(records.records)
    }
}
