//! The log service as the demos use it: found through discovery, spoken to over
//! HTTP/JSON (docs/api/log.md).

use bytes::Bytes;
use keel_sdk::{Discovery, Policy};
use serde::Deserialize;

use crate::DemoError;

/// The log service, wherever discovery says it runs.
#[derive(Debug, Clone)]
pub struct LogService {
    discovery: Discovery,
    http: reqwest::Client,
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

impl LogService {
    /// The log service found through `discovery`, called with `http`.
    pub fn new(discovery: Discovery, http: reqwest::Client) -> Self {
        Self { discovery, http }
    }

    /// The base URL of a log service instance.
    fn base(&self) -> Result<String, DemoError> {
        self.discovery
            .pick("log", Policy::RoundRobin)
            .map(|picked| picked.url.clone())
            .ok_or_else(|| DemoError::Unavailable("no log service instance is available".into()))
    }

    /// Appends `value` to `topic` and returns its offset, once the log service has
    /// acknowledged it.
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when the log service cannot be reached or refuses.
    pub async fn append(&self, topic: &str, value: Bytes) -> Result<u64, DemoError> {
        let base = self.base()?;
        let failed = |err: String| DemoError::Unavailable(format!("the log service failed: {err}"));
        let response = self
            .http
            .post(format!("{base}/v1/topics/{topic}/records"))
            .header("content-type", "application/octet-stream")
            .body(value)
            .send()
            .await
            .map_err(|err| failed(err.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("status {}", response.status())));
        }
        let appended: Appended = response
            .json()
            .await
            .map_err(|err| failed(err.to_string()))?;
        Ok(appended.first_offset)
    }

    /// Sends `line` to the log sink (the `logs` topic) in the background; a failure
    /// is only logged locally, never delays the caller.
    pub fn line(&self, line: String) {
        let base = match self.base() {
            Ok(base) => base,
            Err(err) => {
                tracing::warn!(%err, line, "log line not shipped");
                return;
            }
        };
        let http = self.http.clone();
        tokio::spawn(async move {
            let sent = http.post(format!("{base}/log")).body(line).send().await;
            match sent {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => tracing::warn!(status = %response.status(), "log line refused"),
                Err(err) => tracing::warn!(%err, "log line not shipped"),
            }
        });
    }

    /// The last `count` records of `topic` (fewer if it is shorter; none if it does
    /// not exist yet).
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when the log service cannot be reached.
    pub async fn last(&self, topic: &str, count: u64) -> Result<Vec<LogLine>, DemoError> {
        let base = self.base()?;
        let failed = |err: reqwest::Error| {
            DemoError::Unavailable(format!("reading the log service failed: {err}"))
        };
        let topics: Topics = self
            .http
            .get(format!("{base}/v1/topics"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        let Some(info) = topics.topics.iter().find(|t| t.name == topic) else {
            return Ok(Vec::new());
        };
        // Retention may have dropped older records.
        let from = info
            .next_offset
            .saturating_sub(count)
            .max(info.lowest_offset);
        let records: Records = self
            .http
            .get(format!(
                "{base}/v1/topics/{topic}/records?from={from}&max={count}"
            ))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        Ok(records.records)
    }
}
