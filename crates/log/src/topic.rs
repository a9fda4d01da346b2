//! A topic: one commit log, the writer thread that group-commits to it, and the
//! signal that wakes tailing readers.
//!
//! ```text
//!  handlers ──append──> bounded queue ──> writer thread: drain all waiting,
//!                                          append_batch (one write, one sync),
//!                                          publish next offset ──> watch ──> tails
//!                                          answer each request with its offsets
//!  handlers ──append, writer idle, fast disk──> append_batch on the serving thread
//!  handlers ──read────> Reader (any thread, never waits for the writer)
//! ```
//!
//! Under a policy that does not sync each commit (`interval:D`, `never`), a commit
//! is a write to the page cache, which costs less than waking the writer thread
//! and being woken back: every append is committed by the serving thread that
//! received it, unless the writer holds queued requests. Under `interval:D` the
//! writer thread syncs every D through the log's syncer, which does not hold the log,
//! so appends go on during the sync and no serving thread ever waits for the disk.
//!
//! Under `always`:
//! an append that finds nothing queued, no other append under way (after letting
//! the requests already at this thread's sockets in) and the writer idle is committed
//! by the serving thread that received it, when the topic's latest commit served one
//! request alone and took under [`INLINE_COMMIT_BELOW`]: a lone producer, on a fast
//! disk. That saves waking the writer thread and being woken back, two context
//! switches that cost more than a fast sync. As soon as appends overlap, they queue
//! for the writer and share its syncs, and its commits of several requests keep
//! them there; a slow sync sends every append to the writer too, so that it never
//! holds up the other connections of a serving thread.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_commitlog::{Log, LogConfig, LogError, Offset, Reader, Record, SyncPolicy};
use keel_log_client::TopicInfo;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::LogServiceError;
use crate::metrics::TopicMetrics;

/// A commit slower than this sends the topic's appends to the writer thread until a
/// commit of one request is fast again; see the module doc.
pub(crate) const INLINE_COMMIT_BELOW: Duration = Duration::from_millis(1);

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
    committer: Arc<Committer>,
    /// Calls of [`Topic::append`] under way.
    appending: AtomicUsize,
    /// Cancelled when a snapshot replaced this topic (on a replica): its tails end.
    retired: tokio_util::sync::CancellationToken,
}

/// Counts an append under way for as long as it is held.
struct Appending<'a>(&'a AtomicUsize);

impl<'a> Appending<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Topic {
    /// Opens (recovering) the topic's log in `dir`. Its writer thread starts with the
    /// first queued append and ends when the topic has been idle a while
    /// ([`WRITER_LINGER`]): an idle topic costs no thread.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        mut config: LogConfig,
        limits: &WriterLimits,
    ) -> Result<Self, LogError> {
        // Under an interval policy the writer thread syncs, through a syncer, while
        // appends go on: the log itself never syncs on an append, so no serving
        // thread ever waits for the disk.
        let every = match config.sync {
            SyncPolicy::Interval(every) => {
                config.sync = SyncPolicy::Never;
                Some(every)
            }
            _ => None,
        };
        let syncs_each_commit = config.sync == SyncPolicy::Always;
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
        let interval = every.map(|every| Interval {
            syncer: log.syncer(),
            every,
        });
        let committer = Arc::new(Committer {
            log: Mutex::new(Some(log)),
            writer_busy: AtomicBool::new(false),
            inline_ok: AtomicBool::new(true),
            metrics: Arc::new(TopicMetrics::default()),
            next: next_tx,
            topic: name.to_owned(),
            failure: OnceLock::new(),
            parked: Mutex::new(Some(queue)),
            writing: AtomicBool::new(false),
            interval,
            syncs_each_commit,
            max_batch_bytes: limits.max_batch_bytes,
        });
        Ok(Self {
            name: name.to_owned(),
            reader,
            max_record_bytes,
            enqueue_timeout: limits.enqueue_timeout,
            appends: Mutex::new(Some(appends)),
            next,
            writer: Mutex::new(None),
            committer,
            appending: AtomicUsize::new(0),
            retired: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Why the topic refuses writes, once its log has failed.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.committer.failure.get().map(String::as_str)
    }

    pub(crate) fn metrics(&self) -> &TopicMetrics {
        &self.committer.metrics
    }

    pub(crate) fn metrics_handle(&self) -> Arc<TopicMetrics> {
        Arc::clone(&self.committer.metrics)
    }

    /// Queues values for the writer and returns where their offsets will arrive.
    /// Waits while the queue is full, up to the enqueue timeout.
    pub(crate) async fn submit(
        &self,
        values: Vec<Bytes>,
    ) -> Result<oneshot::Receiver<Reply>, LogServiceError> {
        self.check_sizes(&values)?;
        let sender = self.sender()?;
        let (reply, offsets) = oneshot::channel();
        let append = Append { values, reply };
        match tokio::time::timeout(self.enqueue_timeout, sender.send(append)).await {
            Ok(Ok(())) => {
                self.ensure_writer();
                Ok(offsets)
            }
            Ok(Err(_)) => Err(LogServiceError::ShuttingDown),
            Err(_) => Err(LogServiceError::Overloaded {
                topic: self.name.clone(),
            }),
        }
    }

    /// Starts a writer thread unless one is at work. The writer that parks the queue
    /// clears `writing` after parking it, so whoever sets `writing` finds it parked.
    fn ensure_writer(&self) {
        let committer = &self.committer;
        if committer.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(queue) = committer
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            // The writer closed the log for good.
            return;
        };
        let mut handle = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // The previous writer has parked the queue: it is ending, or has ended.
        if let Some(previous) = handle.take()
            && previous.join().is_err()
        {
            tracing::error!(topic = self.name, "writer thread panicked");
        }
        let writer = Writer {
            committer: Arc::clone(committer),
            queue,
        };
        match std::thread::Builder::new()
            .name(format!("keel-writer-{}", self.name))
            .spawn(move || writer.run())
        {
            Ok(thread) => *handle = Some(thread),
            Err(err) => {
                // The queue went with the closure; appends waiting in it get an error
                // when their reply is dropped, and the topic says why.
                tracing::error!(topic = self.name, error = %err, "cannot start the topic's writer thread");
                let _ = committer
                    .failure
                    .set(format!("cannot start the writer thread: {err}"));
            }
        }
    }

    /// Rejects what the log would reject, before it can fail a whole group commit.
    fn check_sizes(&self, values: &[Bytes]) -> Result<(), LogServiceError> {
        check_record_sizes(&self.name, values, self.max_record_bytes)
    }

    fn sender(&self) -> Result<mpsc::Sender<Append>, LogServiceError> {
        self.appends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(LogServiceError::ShuttingDown)
    }

    /// Waits for the offsets of submitted values.
    pub(crate) async fn offsets(
        &self,
        reply: oneshot::Receiver<Reply>,
    ) -> Result<Range<Offset>, LogServiceError> {
        match reply.await {
            Ok(Ok(range)) => Ok(range),
            Ok(Err(err)) => Err(LogServiceError::log(&self.name, err)),
            Err(_) => Err(LogServiceError::ShuttingDown),
        }
    }

    /// Appends values as one batch and returns their offsets, once durable: on this
    /// thread when the writer is idle and the disk fast, else through the writer.
    pub(crate) async fn append(
        &self,
        values: Vec<Bytes>,
    ) -> Result<Range<Offset>, LogServiceError> {
        let _appending = Appending::enter(&self.appending);
        self.check_sizes(&values)?;
        let sender = self.sender()?;
        if !self.committer.syncs_each_commit
            && !self.committer.writer_busy.load(Ordering::Acquire)
            && let Some(result) = self.committer.commit_here(&values)
        {
            self.after_inline_commit();
            return result.map_err(|err| LogServiceError::log(&self.name, Arc::new(err)));
        }
        if self.committer.inline_ok() && sender.capacity() == sender.max_capacity() {
            // Requests that have already arrived on this thread, unread, must get to
            // say so before this one blocks the thread: the yield lets the runtime
            // poll its sockets and run them up to here.
            tokio::task::yield_now().await;
            if self.appending.load(Ordering::Acquire) == 1
                && sender.capacity() == sender.max_capacity()
                && let Some(result) = self.committer.try_commit_here(&values)
            {
                self.after_inline_commit();
                return result.map_err(|err| LogServiceError::log(&self.name, Arc::new(err)));
            }
        }
        drop(sender);
        let reply = self.submit(values).await?;
        self.offsets(reply).await
    }

    /// Under an interval policy, a writer thread must be there to sync what an
    /// inline commit left. Pairs with the fence in [`Writer::park`]: either that
    /// writer sees this commit's records unsynced, or this sees it gone.
    fn after_inline_commit(&self) {
        if self.committer.interval.is_some() {
            std::sync::atomic::fence(Ordering::SeqCst);
            self.ensure_writer();
        }
    }

    /// Reads one record.
    pub(crate) async fn read(&self, offset: Offset) -> Result<Record, LogServiceError> {
        let reader = self.reader.clone();
        let started = Instant::now();
        let record = self.blocking(move || reader.read(offset)).await?;
        self.metrics().read_latency.record(started.elapsed());
        self.metrics().count_read(std::slice::from_ref(&record));
        Ok(record)
    }

    /// Reads a chunk of records from `from` on (see `Reader::read_chunk`).
    pub(crate) async fn read_chunk(
        &self,
        from: Offset,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogServiceError> {
        let reader = self.reader.clone();
        let started = Instant::now();
        let records = self
            .blocking(move || reader.read_chunk(from, max_bytes))
            .await?;
        self.metrics().read_latency.record(started.elapsed());
        self.metrics().count_read(&records);
        Ok(records)
    }

    /// Reads run on the blocking pool: a cold read is disk I/O.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogServiceError> {
        match tokio::task::spawn_blocking(read).await {
            Ok(result) => result.map_err(|err| LogServiceError::log(&self.name, err)),
            Err(_) => Err(LogServiceError::ShuttingDown),
        }
    }

    /// Ends the tails of this topic: a snapshot replaced it (they subscribe again,
    /// to the topic that took its place).
    pub(crate) fn retire(&self) {
        self.retired.cancel();
    }

    /// Completes once the topic has been replaced.
    pub(crate) async fn retired(&self) {
        self.retired.cancelled().await;
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

    /// Appends `values` stamped `timestamp_ms`, as a replica applies a command: at
    /// once, on this thread, synced only as the log's policy says (a replica's topics
    /// sync at checkpoints).
    pub(crate) fn apply(
        &self,
        values: &[&[u8]],
        timestamp_ms: u64,
    ) -> Result<Range<Offset>, LogError> {
        let mut log = self.committer.lock();
        let log = log.as_mut().ok_or_else(closed)?;
        self.committer.commit(log, values, 1, Some(timestamp_ms))
    }

    /// Syncs the topic and lists the files that hold its records, with their lengths
    /// (see `Log::checkpoint_files`).
    pub(crate) fn checkpoint_files(&self) -> Result<Vec<(PathBuf, u64)>, LogError> {
        let mut log = self.committer.lock();
        let log = log.as_mut().ok_or_else(closed)?;
        let files = log.checkpoint_files();
        if files.is_err() {
            self.committer.note_failure(log);
        }
        files
    }

    /// Cuts the topic back to end at `next`, as a replica reopening at a checkpoint
    /// does (a log that ends before `next` is left as it is: the caller checks).
    /// Reads every record the topic holds, checking each one's checksum: a
    /// replica does so when it opens, so that a record damaged on disk while it was
    /// down is found then (and taken from the leader again), not served later.
    pub(crate) fn verify(&self) -> Result<(), LogError> {
        const CHUNK_BYTES: usize = 1 << 20;
        let log = self.committer.lock();
        let log = log.as_ref().ok_or_else(closed)?;
        let (mut from, next) = (log.lowest_offset(), log.next_offset());
        while from < next {
            let chunk = log.read_chunk(from, CHUNK_BYTES)?;
            match chunk.last() {
                Some(last) => from = last.offset + 1,
                None => break,
            }
        }
        Ok(())
    }

    pub(crate) fn truncate_to(&self, next: Offset) -> Result<(), LogError> {
        let mut log = self.committer.lock();
        let log = log.as_mut().ok_or_else(closed)?;
        if log.next_offset() > next {
            log.truncate_suffix(next)?;
            self.committer.next.send_replace(next);
        }
        Ok(())
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
        // A writer drains the queue, then, finding it closed, closes the log.
        self.ensure_writer();
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

/// Refuses values of topic `name` that are over `max` bytes, as its log would.
pub(crate) fn check_record_sizes(
    name: &str,
    values: &[Bytes],
    max: u64,
) -> Result<(), LogServiceError> {
    match values.iter().find(|v| v.len() as u64 > max) {
        Some(big) => Err(LogServiceError::log(
            name,
            LogError::RecordTooLarge {
                len: big.len(),
                max: max as u32,
            },
        )),
        None => Ok(()),
    }
}

/// The error of a write to a topic whose log has been closed.
fn closed() -> LogError {
    LogError::Failed {
        reason: "the log is closed".to_owned(),
    }
}

/// The log and what every commit updates, shared by the writer thread and the
/// serving threads that commit inline.
struct Committer {
    /// `None` once the writer has closed the log.
    log: Mutex<Option<Log>>,
    /// Set while the writer thread holds requests it has taken from the queue, so
    /// that no inline commit gets ahead of them.
    writer_busy: AtomicBool,
    /// Whether the latest commit was fast and served one request alone: the sign of
    /// a lone producer, whose next append may be committed inline.
    inline_ok: AtomicBool,
    metrics: Arc<TopicMetrics>,
    next: watch::Sender<Offset>,
    topic: String,
    /// Why the log refuses writes, once it does (a failed fsync): the topic is dead
    /// until the service is restarted.
    failure: OnceLock<String>,
    /// The queue of appends while no writer thread holds it.
    parked: Mutex<Option<mpsc::Receiver<Append>>>,
    /// Whether a writer thread is at work (or starting).
    writing: AtomicBool,
    /// Under an interval policy, how the writer thread syncs, and how often.
    interval: Option<Interval>,
    /// Whether every commit waits for its sync (policy `always`). When not, a
    /// commit is a write to the page cache, cheaper than waking the writer thread:
    /// the serving thread that received an append commits it.
    syncs_each_commit: bool,
    max_batch_bytes: usize,
}

impl Committer {
    /// Whether the latest commit was a lone producer's, and fast.
    fn inline_ok(&self) -> bool {
        self.inline_ok.load(Ordering::Relaxed)
    }

    /// Commits `values` on the calling thread if nobody else is committing and the
    /// latest commit was a lone producer's, and fast; `None` when the caller should
    /// queue instead.
    fn try_commit_here(&self, values: &[Bytes]) -> Option<Result<Range<Offset>, LogError>> {
        if self.writer_busy.load(Ordering::Acquire) || !self.inline_ok() {
            return None;
        }
        self.commit_in(self.log.try_lock().ok()?, values)
    }

    /// Commits `values` on the calling thread, waiting for the log if another thread
    /// holds it (for no longer than a write: this is for policies that do not sync
    /// each commit); `None` once the log is closed.
    fn commit_here(&self, values: &[Bytes]) -> Option<Result<Range<Offset>, LogError>> {
        self.commit_in(self.lock(), values)
    }

    /// Commits one request's `values` to the log held by `log`, counted as inline;
    /// `None` once the log is closed.
    fn commit_in(
        &self,
        mut log: std::sync::MutexGuard<'_, Option<Log>>,
        values: &[Bytes],
    ) -> Option<Result<Range<Offset>, LogError>> {
        let log = log.as_mut()?;
        let values: Vec<&[u8]> = values.iter().map(|v| v.as_ref()).collect();
        self.metrics.inline_commits.fetch_add(1, Ordering::Relaxed);
        Some(self.commit(log, &values, 1, None))
    }

    /// Appends `values` as one batch (one write, one sync), counts it, and tells
    /// tailing readers.
    fn commit(
        &self,
        log: &mut Log,
        values: &[&[u8]],
        requests: usize,
        timestamp_ms: Option<u64>,
    ) -> Result<Range<Offset>, LogError> {
        let started = Instant::now();
        let result = match timestamp_ms {
            Some(at) => log.append_batch_at(values, at),
            None => log.append_batch(values),
        };
        let elapsed = started.elapsed();
        self.metrics.commit_latency.record(elapsed);
        self.inline_ok.store(
            requests == 1 && elapsed < INLINE_COMMIT_BELOW,
            Ordering::Relaxed,
        );
        match &result {
            Ok(range) => {
                let bytes: usize = values.iter().map(|v| v.len()).sum();
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .records
                    .fetch_add(range.end - range.start, Ordering::Relaxed);
                self.metrics
                    .bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                self.next.send_replace(range.end);
                tracing::trace!(
                    topic = self.topic,
                    requests,
                    records = range.end - range.start,
                    "group commit"
                );
            }
            Err(err) => {
                self.metrics.failed_commits.fetch_add(1, Ordering::Relaxed);
                if crate::error::is_storage_full(err) {
                    self.metrics.storage_full.fetch_add(1, Ordering::Relaxed);
                }
                tracing::error!(topic = self.topic, error = %err, "append failed");
                if let Some(reason) = self.note_failure(log) {
                    // The error that killed the topic says so, as every later one will.
                    return Err(LogError::Failed { reason });
                }
            }
        }
        result
    }

    /// Marks the topic dead when its log has failed, and tells tailing readers where
    /// the log now ends (a failed sync takes back the records it did not sync).
    fn note_failure(&self, log: &mut Log) -> Option<String> {
        let reason = log.failure()?.to_owned();
        if self.failure.set(reason.clone()).is_ok() {
            tracing::error!(
                topic = self.topic,
                reason,
                "topic failed: it refuses writes until the service is restarted"
            );
            self.next.send_replace(log.next_offset());
        }
        Some(reason)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Log>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An interval policy's syncing: the writer thread syncs through `syncer` every
/// `every` while records are appended, and before it ends.
struct Interval {
    syncer: keel_commitlog::Syncer,
    every: Duration,
}

/// How long a writer thread waits for the next append before it ends.
pub(crate) const WRITER_LINGER: Duration = Duration::from_secs(2);

/// A writer thread's state: the queue, while it holds it.
struct Writer {
    committer: Arc<Committer>,
    queue: mpsc::Receiver<Append>,
}

/// What a writer's wait for appends ended with.
enum Woken {
    Append(Append),
    Closed,
    Idle,
}

impl Writer {
    fn run(mut self) {
        // The writer waits for appends with a timeout, on a timer of its own: this
        // thread is not the service runtime's, and must not depend on that runtime
        // still running when the last sender goes away.
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(timer) => Some(timer),
            Err(err) => {
                tracing::error!(topic = self.committer.topic, error = %err, "cannot start the writer's timer; it waits without one");
                None
            }
        };
        let mut batch: Vec<Append> = Vec::new();
        let mut active = Instant::now();
        let mut last_sync = Instant::now();
        loop {
            // Under an interval policy the writer syncs every interval, and before it
            // ends; idle for WRITER_LINGER, it ends.
            let linger = WRITER_LINGER.saturating_sub(active.elapsed());
            let wait = match &self.committer.interval {
                Some(interval) => linger.min(interval.every.saturating_sub(last_sync.elapsed())),
                None => linger,
            }
            .max(Duration::from_millis(1));
            let woken = match &timer {
                Some(timer) => timer.block_on(async {
                    match tokio::time::timeout(wait, self.queue.recv()).await {
                        Ok(Some(first)) => Woken::Append(first),
                        Ok(None) => Woken::Closed,
                        Err(_) => Woken::Idle,
                    }
                }),
                None => self
                    .queue
                    .blocking_recv()
                    .map_or(Woken::Closed, Woken::Append),
            };
            let first = match woken {
                Woken::Append(first) => first,
                Woken::Closed => break,
                Woken::Idle => {
                    let ending = active.elapsed() >= WRITER_LINGER;
                    self.sync_if_due(&mut last_sync, ending);
                    if ending {
                        if self.park() {
                            return;
                        }
                        // Appends came meanwhile (queued, or committed inline and
                        // not synced): linger again, syncing every interval.
                        active = Instant::now();
                    }
                    continue;
                }
            };
            self.committer.writer_busy.store(true, Ordering::Release);
            let mut bytes: usize = first.values.iter().map(Bytes::len).sum();
            batch.push(first);
            while bytes < self.committer.max_batch_bytes {
                let Ok(more) = self.queue.try_recv() else {
                    break;
                };
                bytes += more.values.iter().map(Bytes::len).sum::<usize>();
                batch.push(more);
            }
            self.commit(&mut batch);
            self.committer.writer_busy.store(false, Ordering::Release);
            active = Instant::now();
            self.sync_if_due(&mut last_sync, false);
        }
        let log = self.committer.lock().take();
        if let Some(log) = log
            && let Err(err) = log.close()
        {
            tracing::error!(topic = self.committer.topic, error = %err, "closing the log failed");
        }
        tracing::debug!(topic = self.committer.topic, "writer stopped");
    }

    /// Under an interval policy, syncs what the appends left when the interval is
    /// over (or `now`), without holding the log: appends go on meanwhile.
    fn sync_if_due(&self, last_sync: &mut Instant, now: bool) {
        let Some(interval) = &self.committer.interval else {
            return;
        };
        if !now && last_sync.elapsed() < interval.every {
            return;
        }
        *last_sync = Instant::now();
        self.committer
            .metrics
            .interval_syncs
            .fetch_add(1, Ordering::Relaxed);
        let synced = interval.syncer.sync();
        let mut log = self.committer.lock();
        let Some(log) = log.as_mut() else {
            return;
        };
        if let Err(err) = synced.and_then(|_| log.write_index()) {
            tracing::error!(topic = self.committer.topic, error = %err, "interval sync failed");
            self.committer.note_failure(log);
        }
    }

    /// Whether an interval policy's syncer lags what has been appended (on a log
    /// that has not failed: a failed one syncs nothing more).
    fn unsynced(&self) -> bool {
        self.committer.failure.get().is_none()
            && self
                .committer
                .interval
                .as_ref()
                .is_some_and(|interval| interval.syncer.durable() < *self.committer.next.borrow())
    }

    /// Hands the queue back and ends, unless an append arrived meanwhile that no
    /// new writer will take: then it keeps the queue and goes on (`false`).
    fn park(&mut self) -> bool {
        // A queue of no channel stands in while this writer holds none.
        let (_, placeholder) = mpsc::channel(1);
        let queue = std::mem::replace(&mut self.queue, placeholder);
        let committer = &self.committer;
        let mut parked = committer
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *parked = Some(queue);
        committer.writing.store(false, Ordering::Release);
        // An append queued after the last look, by a producer that saw `writing`
        // still set, would wait for nobody; so would records an inline commit wrote
        // then (see `Topic::after_inline_commit`): look again.
        std::sync::atomic::fence(Ordering::SeqCst);
        let waiting = parked.as_ref().is_some_and(|queue| !queue.is_empty()) || self.unsynced();
        if waiting
            && !committer.writing.swap(true, Ordering::AcqRel)
            && let Some(queue) = parked.take()
        {
            self.queue = queue;
            return false;
        }
        tracing::trace!(topic = committer.topic, "writer idle: thread ended");
        true
    }

    /// Appends every waiting request as one batch and answers each.
    fn commit(&mut self, batch: &mut Vec<Append>) {
        let values: Vec<&[u8]> = batch
            .iter()
            .flat_map(|append| append.values.iter().map(|v| v.as_ref()))
            .collect();
        let result = match self.committer.lock().as_mut() {
            Some(log) => self.committer.commit(log, &values, batch.len(), None),
            // Only this thread closes the log, after its last commit.
            None => Err(LogError::Failed {
                reason: "the log is closed".to_owned(),
            }),
        };
        drop(values);
        match result {
            Ok(range) => {
                let mut start = range.start;
                for append in batch.drain(..) {
                    let end = start + append.values.len() as u64;
                    // A producer that went away still had its records appended.
                    let _ = append.reply.send(Ok(start..end));
                    start = end;
                }
            }
            Err(err) => {
                let err = Arc::new(err);
                for append in batch.drain(..) {
                    let _ = append.reply.send(Err(Arc::clone(&err)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, sync: SyncPolicy) -> Topic {
        let config = LogConfig {
            sync,
            ..LogConfig::default()
        };
        let limits = WriterLimits {
            queue_depth: 64,
            enqueue_timeout: Duration::from_secs(5),
            max_batch_bytes: 1 << 20,
        };
        Topic::open(dir, "t", config, &limits).unwrap()
    }

    fn durable(topic: &Topic) -> Offset {
        topic.committer.interval.as_ref().unwrap().syncer.durable()
    }

    /// Under an interval policy appends are committed by the caller's thread, and
    /// the writer thread syncs them every interval while appends go on, not only
    /// once they stop.
    #[tokio::test(flavor = "current_thread")]
    async fn given_interval_policy_appends_should_be_synced_while_they_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let topic = open(dir.path(), SyncPolicy::Interval(Duration::from_millis(20)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next = 0;
        let synced_under_load = loop {
            let range = topic.append(vec![Bytes::from_static(b"x")]).await.unwrap();
            assert_eq!(range, next..next + 1);
            next += 1;
            if durable(&topic) > 0 {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(synced_under_load, "nothing synced in 10 s of appends");
        assert_eq!(
            topic.metrics().inline_commits.load(Ordering::Relaxed),
            next,
            "every append was committed inline"
        );
        // Once appends stop, the writer syncs the rest before it ends.
        let deadline = Instant::now() + Duration::from_secs(10);
        while durable(&topic) < next {
            assert!(
                Instant::now() < deadline,
                "the last appends were not synced"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        topic.close();
    }

    /// Appends that go on past the writer's linger time keep it at one sync per
    /// interval: it does not sync at each wake while it cannot end.
    #[tokio::test(flavor = "current_thread")]
    async fn given_interval_policy_sustained_appends_should_be_synced_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_millis(200);
        let topic = open(dir.path(), SyncPolicy::Interval(every));
        let started = Instant::now();
        let run = WRITER_LINGER + Duration::from_millis(1500);
        let mut appended = 0;
        while started.elapsed() < run && appended < 10_000_000 {
            topic.append(vec![Bytes::from_static(b"x")]).await.unwrap();
            appended += 1;
        }
        let syncs = topic.metrics().interval_syncs.load(Ordering::Relaxed);
        // One per interval, one more at each time the writer would have ended.
        let most = (run.as_millis() / every.as_millis()) as u64 + 4;
        assert!(
            (1..=most).contains(&syncs),
            "{syncs} syncs in {run:?} of {appended} appends, at most {most} expected"
        );
        topic.close();
    }

    /// Under `always` a lone producer's append is committed inline too, and is
    /// durable when acknowledged: reopening finds every record.
    #[tokio::test(flavor = "current_thread")]
    async fn given_always_policy_acknowledged_appends_should_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let topic = open(dir.path(), SyncPolicy::Always);
        for i in 0..20 {
            let range = topic.append(vec![Bytes::from(vec![i; 10])]).await.unwrap();
            assert_eq!(range, u64::from(i)..u64::from(i) + 1);
        }
        topic.close();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        assert_eq!(log.next_offset(), 20);
        assert_eq!(log.read(19).unwrap().value.as_ref(), &[19u8; 10]);
    }
}
