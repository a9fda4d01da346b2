//! A topic: one commit log, the single writer thread that owns it, and the signal
//! that wakes tailing readers.
//!
//! ```text
//!  handlers ──append──> bounded queue ──> writer thread: drain all waiting,
//!                                          append_batch (one write, one sync),
//!                                          publish next offset ──> watch ──> tails
//!                                          answer each request with its offsets
//!  handlers ──read────> Reader (any thread, never waits for the writer)
//! ```

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use keel_commitlog::{Log, LogConfig, LogError, Offset, Reader, Record, SyncPolicy};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::ServiceError;
use crate::metrics::TopicMetrics;

/// What the writer answers an append with.
type Reply = Result<Range<Offset>, Arc<LogError>>;

/// Records waiting to be appended, and where to send their offsets.
struct Append {
    values: Vec<Bytes>,
    reply: oneshot::Sender<Reply>,
}

/// How a topic's writer behaves.
#[derive(Debug, Clone)]
pub(crate) struct WriterLimits {
    /// Appends that may wait for the writer before producers are made to wait.
    pub(crate) queue_depth: usize,
    /// How long a producer waits for room in a full queue before it is told the
    /// topic is overloaded.
    pub(crate) enqueue_timeout: Duration,
    /// The most bytes of values one group commit takes.
    pub(crate) max_batch_bytes: usize,
}

/// Offsets and sizes of a topic, for listings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its lowest retained offset.
    pub lowest_offset: Offset,
    /// The offset its next record will get.
    pub next_offset: Offset,
    /// Bytes of its store files.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: usize,
}

/// One topic.
pub(crate) struct Topic {
    name: String,
    reader: Reader,
    max_record_bytes: u64,
    enqueue_timeout: Duration,
    /// `None` once the topic is closing.
    appends: Mutex<Option<mpsc::Sender<Append>>>,
    next: watch::Receiver<Offset>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<TopicMetrics>,
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Topic {
    /// Opens (recovering) the topic's log in `dir` and starts its writer thread.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        config: LogConfig,
        limits: &WriterLimits,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, LogError> {
        let log = Log::open(dir, config)?;
        let report = log.recovery();
        if !report.is_clean() {
            tracing::warn!(
                topic = name,
                ?report,
                "topic recovered from an unclean shutdown"
            );
        }
        let reader = log.reader();
        let max_record_bytes = log.config().max_record_bytes;
        let (next_tx, next) = watch::channel(log.next_offset());
        let (appends, queue) = mpsc::channel(limits.queue_depth.max(1));
        let metrics = Arc::new(TopicMetrics::default());
        let writer = Writer {
            metrics: Arc::clone(&metrics),
            log,
            queue,
            next: next_tx,
            topic: name.to_owned(),
            max_batch_bytes: limits.max_batch_bytes,
            runtime,
        };
        let writer = std::thread::Builder::new()
            .name(format!("keel-writer-{name}"))
            .spawn(move || writer.run())
            .map_err(|source| LogError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            reader,
            max_record_bytes,
            enqueue_timeout: limits.enqueue_timeout,
            appends: Mutex::new(Some(appends)),
            next,
            writer: Mutex::new(Some(writer)),
            metrics,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn metrics(&self) -> &TopicMetrics {
        &self.metrics
    }

    pub(crate) fn metrics_handle(&self) -> Arc<TopicMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Queues values for the writer and returns where their offsets will arrive.
    /// Waits while the queue is full, up to the enqueue timeout.
    pub(crate) async fn submit(
        &self,
        values: Vec<Bytes>,
    ) -> Result<oneshot::Receiver<Reply>, ServiceError> {
        // Reject what the log would reject, before it can fail a whole group commit.
        if let Some(big) = values
            .iter()
            .find(|v| v.len() as u64 > self.max_record_bytes)
        {
            return Err(ServiceError::log(
                &self.name,
                LogError::RecordTooLarge {
                    len: big.len(),
                    max: self.max_record_bytes as u32,
                },
            ));
        }
        let sender = self
            .appends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(ServiceError::ShuttingDown)?;
        let (reply, offsets) = oneshot::channel();
        let append = Append { values, reply };
        match tokio::time::timeout(self.enqueue_timeout, sender.send(append)).await {
            Ok(Ok(())) => Ok(offsets),
            Ok(Err(_)) => Err(ServiceError::ShuttingDown),
            Err(_) => Err(ServiceError::Overloaded {
                topic: self.name.clone(),
            }),
        }
    }

    /// Waits for the offsets of submitted values.
    pub(crate) async fn offsets(
        &self,
        reply: oneshot::Receiver<Reply>,
    ) -> Result<Range<Offset>, ServiceError> {
        match reply.await {
            Ok(Ok(range)) => Ok(range),
            Ok(Err(err)) => Err(ServiceError::log(&self.name, err)),
            Err(_) => Err(ServiceError::ShuttingDown),
        }
    }

    /// Appends values as one batch and returns their offsets, once durable.
    pub(crate) async fn append(&self, values: Vec<Bytes>) -> Result<Range<Offset>, ServiceError> {
        let reply = self.submit(values).await?;
        self.offsets(reply).await
    }

    /// Reads one record.
    pub(crate) async fn read(&self, offset: Offset) -> Result<Record, ServiceError> {
        let reader = self.reader.clone();
        self.blocking(move || reader.read(offset)).await
    }

    /// Reads a chunk of records from `from` on (see `Reader::read_chunk`).
    pub(crate) async fn read_chunk(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ServiceError> {
        let reader = self.reader.clone();
        self.blocking(move || reader.read_chunk(from, max_bytes))
            .await
    }

    /// Reads run on the blocking pool: a cold read is disk I/O.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        match tokio::task::spawn_blocking(read).await {
            Ok(result) => result.map_err(|err| ServiceError::log(&self.name, err)),
            Err(_) => Err(ServiceError::ShuttingDown),
        }
    }

    /// A receiver of the topic's next offset, which changes after every append.
    pub(crate) fn watch_next(&self) -> watch::Receiver<Offset> {
        self.next.clone()
    }

    pub(crate) fn info(&self) -> TopicInfo {
        TopicInfo {
            name: self.name.clone(),
            lowest_offset: self.reader.lowest_offset(),
            next_offset: self.reader.next_offset(),
            size_bytes: self.reader.size_bytes(),
            segments: self.reader.segment_count(),
        }
    }

    /// Stops taking appends, lets the writer finish what is queued, sync and close
    /// the log, and waits for it.
    pub(crate) fn close(&self) {
        drop(
            self.appends
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!(topic = self.name, "writer thread panicked");
        }
    }
}

/// The writer thread's state.
struct Writer {
    metrics: Arc<TopicMetrics>,
    log: Log,
    queue: mpsc::Receiver<Append>,
    next: watch::Sender<Offset>,
    topic: String,
    max_batch_bytes: usize,
    runtime: tokio::runtime::Handle,
}

impl Writer {
    fn run(mut self) {
        let idle_sync = match self.log.config().sync {
            SyncPolicy::Interval(every) => Some(every),
            _ => None,
        };
        let mut batch: Vec<Append> = Vec::new();
        loop {
            // Under an interval policy, an idle writer syncs what the last appends left.
            let first = match idle_sync {
                Some(every) => match self
                    .runtime
                    .block_on(tokio::time::timeout(every, self.queue.recv()))
                {
                    Ok(first) => first,
                    Err(_) => {
                        if let Err(err) = self.log.sync() {
                            tracing::error!(topic = self.topic, error = %err, "interval sync failed");
                        }
                        continue;
                    }
                },
                None => self.queue.blocking_recv(),
            };
            let Some(first) = first else { break };
            let mut bytes: usize = first.values.iter().map(Bytes::len).sum();
            batch.push(first);
            while bytes < self.max_batch_bytes {
                let Ok(more) = self.queue.try_recv() else {
                    break;
                };
                bytes += more.values.iter().map(Bytes::len).sum::<usize>();
                batch.push(more);
            }
            self.commit(&mut batch);
        }
        if let Err(err) = self.log.close() {
            tracing::error!(topic = self.topic, error = %err, "closing the log failed");
        }
        tracing::debug!(topic = self.topic, "writer stopped");
    }

    /// Appends every waiting request as one batch and answers each.
    fn commit(&mut self, batch: &mut Vec<Append>) {
        let values: Vec<&[u8]> = batch
            .iter()
            .flat_map(|append| append.values.iter().map(|v| v.as_ref()))
            .collect();
        let bytes: usize = values.iter().map(|v| v.len()).sum();
        let started = std::time::Instant::now();
        let result = self.log.append_batch(&values);
        self.metrics.commit_latency.record(started.elapsed());
        drop(values);
        match result {
            Ok(range) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.metrics.commits.fetch_add(1, Relaxed);
                self.metrics
                    .records
                    .fetch_add(range.end - range.start, Relaxed);
                self.metrics.bytes.fetch_add(bytes as u64, Relaxed);
                self.next.send_replace(range.end);
                tracing::trace!(
                    topic = self.topic,
                    requests = batch.len(),
                    records = range.end - range.start,
                    "group commit"
                );
                let mut start = range.start;
                for append in batch.drain(..) {
                    let end = start + append.values.len() as u64;
                    // A producer that went away still had its records appended.
                    let _ = append.reply.send(Ok(start..end));
                    start = end;
                }
            }
            Err(err) => {
                self.metrics
                    .failed_commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(topic = self.topic, error = %err, "append failed");
                let err = Arc::new(err);
                for append in batch.drain(..) {
                    let _ = append.reply.send(Err(Arc::clone(&err)));
                }
            }
        }
    }
}
