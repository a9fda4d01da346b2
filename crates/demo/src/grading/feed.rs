//! Keeping a view up to date: the link to the log service, and the task that
//! follows the `grading` topic into the view.

use std::time::Duration;

use futures::StreamExt;
use keel_log_client::{Client, ClientError, Credentials};
use keel_sdk::{Discovery, Readiness};

use super::Db;
use super::event::{self, Event, TOPIC};
use crate::DemoError;

/// The log service as grading talks to it: a gRPC client over every log node
/// discovery knows, connected on first use and again after it failed.
#[derive(Debug)]
pub struct LogLink {
    discovery: Discovery,
    credentials: Credentials,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl LogLink {
    /// The log nodes `discovery` knows, called with `credentials`.
    pub fn new(discovery: Discovery, credentials: Credentials) -> Self {
        Self {
            discovery,
            credentials,
            client: tokio::sync::Mutex::default(),
        }
    }

    /// A client (a producer of its own) on the shared connection.
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when no log node is known or none answers.
    pub async fn client(&self) -> Result<Client, DemoError> {
        let mut held = self.client.lock().await;
        if let Some(client) = &*held {
            return Ok(client.clone());
        }
        let addrs: Vec<String> = self
            .discovery
            .instances("log")
            .into_iter()
            .map(|instance| instance.url)
            .collect();
        if addrs.is_empty() {
            return Err(DemoError::Unavailable(
                "no log instance is available".into(),
            ));
        }
        let client = Client::connect_with(&addrs.join(","), self.credentials.clone())
            .await
            .map_err(log_failed)?;
        *held = Some(client.clone());
        Ok(client)
    }

    /// Forgets the connection: the next call connects again, to the nodes
    /// discovery knows then.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Appends `event` and returns its offset once the log has acknowledged it.
    /// A retried append is stored once (the client is an idempotent producer).
    ///
    /// # Errors
    ///
    /// [`DemoError::Unavailable`] when the log service did not take it.
    pub async fn append(&self, event: &Event) -> Result<u64, DemoError> {
        let mut client = self.client().await?;
        match client.produce(TOPIC, event.to_bytes()).await {
            Ok(offset) => Ok(offset),
            Err(err) => {
                if matches!(err, ClientError::Connect { .. }) {
                    self.reset().await;
                }
                Err(log_failed(err))
            }
        }
    }
}

fn log_failed(err: ClientError) -> DemoError {
    DemoError::Unavailable(format!("the log service failed: {err}"))
}

/// The longest pause between attempts to reach the topic.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A round that lasted this long worked: the pause after it starts short again.
const HEALTHY_ROUND: Duration = Duration::from_secs(5);

/// Follows the topic into `db` for as long as it runs: seeds an empty topic,
/// applies every event from the view's offset, and says the instance is ready
/// once the view has applied every event the topic held when it started (or
/// started again after losing the log).
pub(super) async fn follow(db: Db, log: std::sync::Arc<LogLink>, readiness: Readiness) {
    let mut seeded = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = tokio::time::Instant::now();
        let failure = match round(&db, &log, &readiness, &mut seeded).await {
            Ok(()) => "the log service ended the stream".to_owned(),
            Err(err) => err.to_string(),
        };
        if started.elapsed() >= HEALTHY_ROUND {
            // It worked for a while: this is a new failure, tried again soon.
            backoff = Duration::from_millis(50);
        }
        if readiness.is_ready() {
            tracing::warn!(error = failure, retry_in = ?backoff, "following the grading topic failed; the view serves what it holds");
        } else {
            tracing::warn!(error = failure, retry_in = ?backoff, "building the grading view failed; will retry");
            readiness.set_not_ready(format!(
                "building the view from the grading topic: {failure}"
            ));
        }
        log.reset().await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's worth of following: returns when the stream ends or fails.
/// Sets `seeded` once this process has seeded the topic.
async fn round(
    db: &Db,
    log: &LogLink,
    readiness: &Readiness,
    seeded: &mut bool,
) -> Result<(), DemoError> {
    let mut client = log.client().await?;
    let mut end = topic_range(&mut client).await?;
    if !*seeded && end.is_none_or(|(_, next)| next == 0) {
        let offset = log.append(&event::seed()).await?;
        tracing::info!(
            offset,
            "the grading topic was empty: seeded it with the sample students"
        );
        *seeded = true;
        end = topic_range(&mut client).await?;
    }
    let (lowest, end) = end.unwrap_or((0, 0));
    let mut next = db.next_offset();
    if next > 0 && !same_topic(db, &mut client, (lowest, end), next).await? {
        db.reset().await?;
        next = 0;
    }
    if lowest > next {
        return Err(DemoError::Unavailable(format!(
            "the grading topic starts at offset {lowest} (retention dropped older records), \
             but this view needs them from offset {next}: it cannot be built; \
             keep the grading topic whole (no retention)"
        )));
    }
    if next >= end {
        readiness.set_ready();
    }
    let stream = client
        .subscribe(TOPIC, next, true, 0)
        .await
        .map_err(log_failed)?;
    let mut stream = std::pin::pin!(stream);
    while let Some(batch) = stream.next().await {
        let next = db.apply(batch.map_err(log_failed)?).await?;
        if next >= end && !readiness.is_ready() {
            tracing::info!(next_offset = next, "the grading view has caught up; ready");
            readiness.set_ready();
        }
    }
    Ok(())
}

/// Whether the topic is the one the view (of `next` events) was built from: it
/// is at least as long, and its record 0 is the one the view applied.
async fn same_topic(
    db: &Db,
    client: &mut Client,
    (lowest, end): (u64, u64),
    next: u64,
) -> Result<bool, DemoError> {
    if end < next {
        tracing::warn!(
            view = next,
            topic = end,
            "the grading topic is shorter than this view: it is not the topic the view was built from; building it again"
        );
        return Ok(false);
    }
    let Some(origin) = db.with(|view| view.origin_ms()).await? else {
        return Ok(true);
    };
    if lowest > 0 {
        // Record 0 is gone: the retention check that follows says so.
        return Ok(true);
    }
    let first = client.consume(TOPIC, 0).await.map_err(log_failed)?;
    if first.timestamp_ms != origin {
        tracing::warn!(
            view = origin,
            topic = first.timestamp_ms,
            "the grading topic's first record is not the one this view was built from; building it again"
        );
        return Ok(false);
    }
    Ok(true)
}

/// The topic's lowest and next offsets; `None` when it does not exist yet.
async fn topic_range(client: &mut Client) -> Result<Option<(u64, u64)>, DemoError> {
    let topics = client.topics().await.map_err(log_failed)?;
    Ok(topics
        .into_iter()
        .find(|topic| topic.name == TOPIC)
        .map(|topic| (topic.lowest_offset, topic.next_offset)))
}

/// The topic's next offset, for the lag a view reports; `None` when the log
/// service cannot say.
pub(super) async fn topic_end(log: &LogLink) -> Option<u64> {
    let mut client = log.client().await.ok()?;
    let range = tokio::time::timeout(Duration::from_secs(2), topic_range(&mut client))
        .await
        .ok()?
        .ok()?;
    Some(range.map_or(0, |(_, next)| next))
}
