//! The set of topics of one log service: each a directory under `<data-dir>/topics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use std::ops::Range;

use bytes::Bytes;
use keel_commitlog::Offset;

use crate::cluster::Replication;
use crate::config::LogServiceConfig;
use crate::error::LogServiceError;
use crate::metrics::TopicFigures;
use crate::replica::{ProducerSeq, Summary};
use keel_log_client::TopicInfo;

use crate::tail::ReadAhead;
use crate::topic::{Topic, WriterLimits};
use crate::topic_name::validate_topic_name;

/// The topics of a log service.
#[derive(Debug)]
pub struct Topics {
    root: PathBuf,
    config: LogServiceConfig,
    limits: WriterLimits,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Topics whose logs failed to open at start, with why: they answer
    /// `topic_unavailable` until an operator repairs them and restarts.
    unavailable: BTreeMap<String, Arc<keel_commitlog::LogError>>,
    /// Serializes topic creation, so two first writes cannot open one log twice.
    creating: tokio::sync::Mutex<()>,
    /// The memory bound of streaming readers.
    read_ahead: ReadAhead,
    /// Set on a replica: writes go through Raft, and only applying commits them.
    replication: std::sync::OnceLock<Replication>,
    replica: bool,
    /// Time from an append's arrival to its acknowledgement (queue, commit and, on a
    /// replica, the round to a majority), over every topic.
    append_latency: keel_serve::http::Histogram,
}

/// What a write of records gives back: their offsets, once acknowledged.
pub(crate) type Acked = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Range<Offset>, LogServiceError>> + Send>,
>;

impl Topics {
    /// Opens every topic found under the data directory, and the default and log-sink
    /// topics. Opening runs recovery, which reads the active segments.
    ///
    /// A topic that fails to open (a corrupt sealed segment, say) does not stop the
    /// others: it is logged as an error, listed by `/healthz` and the
    /// `keel_log_unavailable_topics` gauge, and answers `topic_unavailable` naming the
    /// cause until it is repaired and the service restarted.
    ///
    /// # Errors
    ///
    /// The topics directory cannot be created or read.
    pub async fn open(config: LogServiceConfig) -> Result<Self, LogServiceError> {
        let mut topics = Self::empty(config, false)?;
        let mut names: Vec<String> = std::fs::read_dir(&topics.root)
            .map_err(|source| {
                LogServiceError::log(
                    "",
                    keel_commitlog::LogError::Io {
                        path: topics.root.clone(),
                        source,
                    },
                )
            })?
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| validate_topic_name(name).is_ok())
            .collect();
        names.push(topics.config.default_topic.clone());
        names.push(topics.config.log_sink_topic.clone());
        for name in names {
            if topics.map().contains_key(&name) || topics.unavailable.contains_key(&name) {
                continue;
            }
            match topics.open_topic(&name) {
                Ok(topic) => {
                    topics.map_mut().insert(name, topic);
                }
                Err(LogServiceError::Log { source, .. }) => {
                    tracing::error!(topic = name, error = %source, "topic unavailable: it failed to open; the other topics serve");
                    topics.unavailable.insert(name, source);
                }
                Err(other) => return Err(other),
            }
        }
        Ok(topics)
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_topic(&self, name: &str) -> Result<Arc<Topic>, LogServiceError> {
        let topic = Topic::open(
            &self.root.join(name),
            name,
            self.config.log.clone(),
            &self.limits,
        )
        .map_err(|err| LogServiceError::log(name, err))?;
        tracing::info!(topic = name, "opened topic");
        Ok(Arc::new(topic))
    }

    /// The memory bound of streaming readers.
    pub(crate) fn read_ahead(&self) -> &ReadAhead {
        &self.read_ahead
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &LogServiceConfig {
        &self.config
    }

    /// The topic named `name`, or the default topic for an empty name.
    ///
    /// # Errors
    ///
    /// [`LogServiceError::InvalidTopic`]; [`LogServiceError::UnknownTopic`] when it does not exist.
    pub(crate) fn get(&self, name: &str) -> Result<Arc<Topic>, LogServiceError> {
        let name = self.resolve(name)?;
        if let Some(source) = self.unavailable.get(name) {
            return Err(LogServiceError::TopicUnavailable {
                topic: name.to_owned(),
                source: Arc::clone(source),
            });
        }
        self.map()
            .get(name)
            .cloned()
            .ok_or_else(|| LogServiceError::UnknownTopic {
                topic: name.to_owned(),
            })
    }

    /// The topic named `name` for writing: created on first write when auto-create
    /// is on.
    ///
    /// # Errors
    ///
    /// As [`Topics::get`] when auto-create is off; [`LogServiceError::TooManyTopics`]
    /// past `max_topics`; errors opening a new log.
    pub(crate) async fn get_or_create(&self, name: &str) -> Result<Arc<Topic>, LogServiceError> {
        match self.get(name) {
            Err(LogServiceError::UnknownTopic { topic }) if self.config.auto_create_topics => {
                let _creating = self.creating.lock().await;
                if let Some(topic) = self.map().get(&topic) {
                    return Ok(Arc::clone(topic));
                }
                // Each topic holds threads, files and preallocated space: a client
                // creating topics without end must not exhaust the process.
                let max = self.config.max_topics;
                if self.map().len() >= max {
                    return Err(LogServiceError::TooManyTopics { topic, max });
                }
                let opened = {
                    let this_name = topic.clone();
                    let root = self.root.join(&topic);
                    let config = self.config.log.clone();
                    let limits = self.limits.clone();
                    tokio::task::spawn_blocking(move || {
                        Topic::open(&root, &this_name, config, &limits)
                    })
                    .await
                    .map_err(|_| LogServiceError::ShuttingDown)?
                    .map_err(|err| LogServiceError::log(&topic, err))?
                };
                tracing::info!(topic, "created topic");
                let opened = Arc::new(opened);
                self.map_mut().insert(topic, Arc::clone(&opened));
                Ok(opened)
            }
            other => other,
        }
    }

    /// Appends `values` to topic `name` (created on first write when auto-create is
    /// on) and returns their offsets once acknowledged: durable on this node, or on
    /// a replica, committed by a majority.
    ///
    /// # Errors
    ///
    /// As [`Topics::get_or_create`]; the topic's log failed; on a replica, no leader
    /// or a lost leadership ([`LogServiceError::Unavailable`]) and a producer
    /// sequence too old to tell whether it is a duplicate.
    pub(crate) async fn append(
        &self,
        name: &str,
        values: Vec<Bytes>,
        tag: Option<ProducerSeq>,
    ) -> Result<Range<Offset>, LogServiceError> {
        let started = std::time::Instant::now();
        let appended = if self.replica {
            let acked = self.submit(name, values, tag).await?;
            acked.await
        } else {
            self.get_or_create(name).await?.append(values).await
        };
        if appended.is_ok() {
            self.append_latency.record(started.elapsed());
        }
        appended
    }

    /// Time from an append's arrival to its acknowledgement, over every topic.
    pub(crate) fn append_latency(&self) -> &keel_serve::http::Histogram {
        &self.append_latency
    }

    /// Hands `values` on for appending to topic `name` and returns the future of
    /// their offsets: writes submitted one after another are appended in that order.
    ///
    /// # Errors
    ///
    /// As [`Topics::append`], for what is known before the write is handed on.
    pub(crate) async fn submit(
        &self,
        name: &str,
        values: Vec<Bytes>,
        tag: Option<ProducerSeq>,
    ) -> Result<Acked, LogServiceError> {
        if !self.replica {
            let topic = self.get_or_create(name).await?;
            let reply = topic.submit(values).await?;
            return Ok(Box::pin(async move { topic.offsets(reply).await }));
        }
        let name = self.resolve(name)?.to_owned();
        self.check_replica_write(&name, &values)?;
        let replication = self
            .replication
            .get()
            .ok_or(LogServiceError::ShuttingDown)?;
        replication.proposer.submit(name, values, tag).await
    }

    /// What a replica refuses before proposing a write: records over the size
    /// limit, and a new topic past the limit or with auto-create off.
    fn check_replica_write(&self, name: &str, values: &[Bytes]) -> Result<(), LogServiceError> {
        crate::topic::check_record_sizes(name, values, self.config.log.max_record_bytes)?;
        let topics = self.map();
        if !topics.contains_key(name) {
            if !self.config.auto_create_topics {
                return Err(LogServiceError::UnknownTopic {
                    topic: name.to_owned(),
                });
            }
            if topics.len() >= self.config.max_topics {
                return Err(LogServiceError::TooManyTopics {
                    topic: name.to_owned(),
                    max: self.config.max_topics,
                });
            }
        }
        Ok(())
    }

    /// Opens the topics of a replica at its last checkpoint (`None`: none yet): each
    /// topic of `summary` cut back to the offset the checkpoint made durable, every
    /// other topic removed (Raft applies what came after again). Records are synced
    /// only at checkpoints.
    ///
    /// # Errors
    ///
    /// The topics directory cannot be read or changed; a topic fails to open, or
    /// holds fewer records than the checkpoint made durable (a damaged replica).
    pub(crate) fn open_replica(
        mut config: LogServiceConfig,
        summary: Option<&Summary>,
    ) -> Result<Self, LogServiceError> {
        config.log.sync = keel_commitlog::SyncPolicy::Never;
        let topics = Self::empty(config, true)?;
        topics.load_replica(summary)?;
        Ok(topics)
    }

    /// No topic yet, in the topics directory of `config` (created if missing).
    fn empty(config: LogServiceConfig, replica: bool) -> Result<Self, LogServiceError> {
        let root = config.data_dir.join("topics");
        keel_commitlog::create_dir_durably(&root).map_err(|err| LogServiceError::log("", err))?;
        Ok(Self {
            root,
            limits: WriterLimits {
                queue_depth: config.queue_depth,
                enqueue_timeout: config.enqueue_timeout,
                max_batch_bytes: config.max_batch_bytes as usize,
            },
            topics: RwLock::new(BTreeMap::new()),
            unavailable: BTreeMap::new(),
            creating: tokio::sync::Mutex::new(()),
            read_ahead: ReadAhead::new(
                config.read_ahead_bytes as usize,
                config.read_ahead_total_bytes as usize,
            ),
            config,
            replication: std::sync::OnceLock::new(),
            append_latency: keel_serve::http::Histogram::default(),
            replica,
        })
    }

    /// Opens the topics found on disk as `summary` says (see [`Topics::open_replica`]).
    fn load_replica(&self, summary: Option<&Summary>) -> Result<(), LogServiceError> {
        let io = |err: std::io::Error| {
            LogServiceError::log(
                "",
                keel_commitlog::LogError::Io {
                    path: self.root.clone(),
                    source: err,
                },
            )
        };
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || validate_topic_name(&name).is_err() {
                continue;
            }
            match summary.and_then(|summary| summary.topics.get(&name)) {
                Some(&next) => {
                    let topic = match self.open_topic(&name) {
                        Err(LogServiceError::Log { source, .. })
                            if matches!(
                                source.as_ref(),
                                keel_commitlog::LogError::Corrupt { .. }
                            ) =>
                        {
                            return Err(LogServiceError::DamagedReplica {
                                topic: name,
                                reason: source.to_string(),
                            });
                        }
                        other => other?,
                    };
                    let holds = topic.info().next_offset;
                    if holds < next {
                        return Err(LogServiceError::DamagedReplica {
                            topic: name,
                            reason: format!(
                                "it holds records up to offset {holds}, short of the {next} its last checkpoint made durable"
                            ),
                        });
                    }
                    // Found while looking for where the checkpoint ends, or when
                    // reading what it holds below it.
                    match topic.truncate_to(next).and_then(|()| topic.verify()) {
                        Err(err @ keel_commitlog::LogError::Corrupt { .. }) => {
                            return Err(LogServiceError::DamagedReplica {
                                topic: name,
                                reason: err.to_string(),
                            });
                        }
                        other => other.map_err(|err| LogServiceError::log(&name, err))?,
                    }
                    self.map_mut().insert(name, topic);
                }
                None => {
                    // Made after the checkpoint: applying the Raft log makes it again.
                    std::fs::remove_dir_all(entry.path()).map_err(io)?;
                }
            }
        }
        if let Some(summary) = summary
            && let Some(missing) = summary
                .topics
                .keys()
                .find(|name| !self.map().contains_key(*name))
        {
            return Err(LogServiceError::DamagedReplica {
                topic: missing.clone(),
                reason: "its directory is missing, though the last checkpoint holds it".into(),
            });
        }
        // Every replica has them, as a single node does, so that reading them
        // before the first write finds an empty topic.
        for name in [&self.config.default_topic, &self.config.log_sink_topic] {
            self.replica_topic(name)?;
        }
        Ok(())
    }

    /// The topic a replica applies a command to, created (empty) if new.
    ///
    /// # Errors
    ///
    /// Its log cannot be created.
    pub(crate) fn replica_topic(&self, name: &str) -> Result<Arc<Topic>, LogServiceError> {
        if let Some(topic) = self.map().get(name) {
            return Ok(Arc::clone(topic));
        }
        let topic = self.open_topic(name)?;
        self.map_mut().insert(name.to_owned(), Arc::clone(&topic));
        Ok(topic)
    }

    /// Every topic of a replica, by name.
    pub(crate) fn replica_topics(&self) -> Vec<(String, Arc<Topic>)> {
        self.map()
            .iter()
            .map(|(name, topic)| (name.clone(), Arc::clone(topic)))
            .collect()
    }

    /// Replaces every topic of a replica with a snapshot's: its topic directories
    /// under `from` are linked in (copied where links are refused), and opened as
    /// `summary` says.
    ///
    /// # Errors
    ///
    /// Reading, removing or linking files failed; a topic fails to open.
    pub(crate) fn replace_replica(
        &self,
        from: &std::path::Path,
        summary: &Summary,
    ) -> Result<(), LogServiceError> {
        let old: Vec<Arc<Topic>> = std::mem::take(&mut *self.map_mut()).into_values().collect();
        for topic in old {
            topic.close();
            topic.retire();
        }
        let io = |path: &std::path::Path, err: std::io::Error| {
            LogServiceError::log(
                "",
                keel_commitlog::LogError::Io {
                    path: path.to_path_buf(),
                    source: err,
                },
            )
        };
        std::fs::remove_dir_all(&self.root).map_err(|err| io(&self.root, err))?;
        keel_commitlog::create_dir_durably(&self.root)
            .map_err(|err| LogServiceError::log("", err))?;
        for name in summary.topics.keys() {
            validate_topic_name(name)?;
            let source = from.join(name);
            let target = self.root.join(name);
            std::fs::create_dir(&target).map_err(|err| io(&target, err))?;
            if source.is_dir() {
                for file in std::fs::read_dir(&source).map_err(|err| io(&source, err))? {
                    let file = file.map_err(|err| io(&source, err))?.path();
                    let Some(file_name) = file.file_name() else {
                        continue;
                    };
                    let to = target.join(file_name);
                    if std::fs::hard_link(&file, &to).is_err() {
                        std::fs::copy(&file, &to).map_err(|err| io(&to, err))?;
                        std::fs::File::open(&to)
                            .and_then(|copy| copy.sync_all())
                            .map_err(|err| io(&to, err))?;
                    }
                }
            }
            sync_dir(&target).map_err(|err| io(&target, err))?;
        }
        sync_dir(&self.root).map_err(|err| io(&self.root, err))?;
        self.load_replica(Some(summary))
    }

    /// Sends a replica's writes through Raft from now on.
    pub(crate) fn set_replication(&self, replication: Replication) {
        let _ = self.replication.set(replication);
    }

    /// A replica's node, once it runs.
    pub(crate) fn replication(&self) -> Option<&Replication> {
        self.replication.get()
    }

    /// Waits until this node has applied every write acknowledged before the call
    /// (a no-op on a single node, where every acknowledged write is applied).
    ///
    /// # Errors
    ///
    /// [`LogServiceError::Unavailable`] when the cluster cannot confirm it in time.
    pub(crate) async fn read_barrier(&self) -> Result<(), LogServiceError> {
        match self.replication.get() {
            Some(replication) => replication
                .writer
                .read_barrier(std::time::Duration::from_secs(5))
                .await
                .map_err(|err| LogServiceError::Unavailable(err.to_string())),
            None => Ok(()),
        }
    }

    /// Whether these are a replica's topics, written through Raft.
    pub fn is_replica(&self) -> bool {
        self.replica
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Result<&'a str, LogServiceError> {
        if name.is_empty() {
            return Ok(&self.config.default_topic);
        }
        validate_topic_name(name)?;
        Ok(name)
    }

    /// The topics that failed to open at start, by name.
    pub fn unavailable(&self) -> impl Iterator<Item = &str> {
        self.unavailable.keys().map(String::as_str)
    }

    /// The topics whose logs failed while serving (a failed fsync), by name: they
    /// refuse writes until the service is restarted.
    pub fn failed(&self) -> Vec<String> {
        self.map()
            .values()
            .filter(|topic| topic.failure().is_some())
            .map(|topic| topic.name().to_owned())
            .collect()
    }

    /// Every topic with its offsets and size, by name.
    pub fn list(&self) -> Vec<TopicInfo> {
        self.map().values().map(|topic| topic.info()).collect()
    }

    /// Every topic's counters and offsets, by name.
    pub(crate) fn metrics(&self) -> Vec<TopicFigures> {
        self.map()
            .values()
            .map(|topic| {
                (
                    topic.name().to_owned(),
                    topic.metrics_handle(),
                    topic.info(),
                )
            })
            .collect()
    }

    /// Closes every topic: queued appends are written, logs synced and closed.
    pub fn close(&self) {
        let topics: Vec<Arc<Topic>> = self.map().values().cloned().collect();
        for topic in topics {
            topic.close();
        }
    }
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Cuts the log of topic `name` under `data_dir` at its first damaged record, for a
/// topic the service reports unavailable because its log is corrupt: the damaged
/// record and every later one are dropped, and their offsets will be handed out
/// again. Returns what was cut. The service must not be running on `data_dir`
/// (the topic's directory lock keeps it out).
///
/// # Errors
///
/// [`LogServiceError::InvalidTopic`]; [`LogServiceError::UnknownTopic`] when the
/// topic has no directory; the log's error when it cannot be opened even so (its
/// directory is locked, a file header is of another format, an I/O error).
pub fn repair_topic(
    data_dir: &std::path::Path,
    name: &str,
) -> Result<keel_commitlog::RecoveryReport, LogServiceError> {
    validate_topic_name(name)?;
    let dir = data_dir.join("topics").join(name);
    if !dir.is_dir() {
        return Err(LogServiceError::UnknownTopic {
            topic: name.to_owned(),
        });
    }
    let log = keel_commitlog::Log::open_repairing(&dir, keel_commitlog::LogConfig::default())
        .map_err(|err| LogServiceError::log(name, err))?;
    let report = log.recovery().clone();
    log.close().map_err(|err| LogServiceError::log(name, err))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The topics of a service with the default settings and its data in `dir`.
    async fn open_in(dir: &std::path::Path) -> Topics {
        let config = LogServiceConfig {
            data_dir: dir.to_path_buf(),
            ..LogServiceConfig::default()
        };
        Topics::open(config).await.expect("open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_producer_should_commit_inline_and_overlapping_ones_together() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().expect("temp dir");
        let topics = Arc::new(open_in(dir.path()).await);
        let topic = topics.get_or_create("lone").await.expect("topic");
        for i in 0..20u64 {
            let value = bytes::Bytes::from(format!("v{i}"));
            assert_eq!(topic.append(vec![value]).await.expect("append"), i..i + 1);
        }
        // One commit per append, and the first, with no latest commit to judge by,
        // inline; the others are inline unless a sync before them took over 1 ms
        // (which a busy disk does now and then).
        assert_eq!(topic.metrics().commits.load(Relaxed), 20);
        assert!(topic.metrics().inline_commits.load(Relaxed) >= 1);

        let busy = topics.get_or_create("busy").await.expect("topic");
        let mut tasks = Vec::new();
        for producer in 0..32 {
            let busy = Arc::clone(&busy);
            tasks.push(tokio::spawn(async move {
                let mut offsets = Vec::new();
                for i in 0..10 {
                    let value = bytes::Bytes::from(format!("{producer}-{i}"));
                    offsets.push(busy.append(vec![value]).await.expect("append").start);
                }
                offsets
            }));
        }
        let mut offsets = Vec::new();
        for task in tasks {
            offsets.extend(task.await.expect("producer"));
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..320).collect::<Vec<_>>(), "dense and unique");
        let metrics = busy.metrics();
        assert!(
            metrics.commits.load(Relaxed) < 320,
            "overlapping appends share commits"
        );
        assert!(metrics.inline_commits.load(Relaxed) < metrics.commits.load(Relaxed));
        tokio::task::block_in_place(|| topics.close());
        let lone = keel_commitlog::Log::open(
            dir.path().join("topics").join("lone"),
            keel_commitlog::LogConfig::default(),
        )
        .expect("reopen");
        assert_eq!(
            lone.next_offset(),
            20,
            "inline commits are durable and closed"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn producers_sharing_one_serving_thread_should_not_commit_one_by_one() {
        // One thread serves every producer: an append committed inline would hold
        // the others back and take the next turn again, one sync per record.
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().expect("temp dir");
        let topics = open_in(dir.path()).await;
        let topic = topics.get_or_create("shared").await.expect("topic");
        let producers = (0..16).map(|producer| {
            let topic = Arc::clone(&topic);
            tokio::spawn(async move {
                for i in 0..20 {
                    let value = bytes::Bytes::from(format!("{producer}-{i}"));
                    topic.append(vec![value]).await.expect("append");
                }
            })
        });
        for producer in producers.collect::<Vec<_>>() {
            producer.await.expect("producer");
        }
        let metrics = topic.metrics();
        assert_eq!(metrics.records.load(Relaxed), 320);
        assert!(
            metrics.inline_commits.load(Relaxed) < 160,
            "{} of 320 appends were committed inline",
            metrics.inline_commits.load(Relaxed)
        );
        assert!(
            metrics.commits.load(Relaxed) < 320,
            "appends shared commits"
        );
        topics.close();
    }

    /// A bit flipped in a sealed segment below a replica's checkpoint makes the
    /// replica damaged (it re-replicates), not a node that cannot start (the fault
    /// suite's corrupt-sealed found it refusing to start).
    #[test]
    fn a_flipped_bit_below_the_checkpoint_in_a_sealed_segment_should_make_the_replica_damaged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogServiceConfig {
            data_dir: dir.path().join("node"),
            log: keel_commitlog::LogConfig {
                segment_bytes: 4096,
                ..keel_commitlog::LogConfig::default()
            },
            ..LogServiceConfig::default()
        };
        let topics = Topics::open_replica(config.clone(), None).expect("open replica");
        let topic = topics.replica_topic("t").expect("topic");
        let value = [7u8; 100];
        for index in 1..=200u64 {
            topic.apply(&[value.as_slice()], index).expect("apply");
        }
        topics.close();
        let root = dir.path().join("node").join("topics").join("t");
        let mut stores: Vec<_> = std::fs::read_dir(&root)
            .expect("topic dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
            .collect();
        stores.sort();
        assert!(stores.len() >= 3, "{} segments", stores.len());
        // The first frame's length field of the second segment, which stays sealed
        // below a checkpoint in its middle.
        let sealed = &stores[1];
        let base: u64 = sealed
            .file_stem()
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.parse().ok())
            .expect("base offset");
        let mut bytes = std::fs::read(sealed).expect("read");
        bytes[16 + 6] ^= 1;
        std::fs::write(sealed, bytes).expect("write");

        let summary = Summary {
            topics: BTreeMap::from([("t".to_owned(), base + 3)]),
            producers: Vec::new(),
        };
        expect_damaged(Topics::open_replica(config.clone(), Some(&summary)));

        // Repaired by hand, a flipped bit in a value of the first segment, which
        // nothing but a read of that record would look at.
        let mut bytes = std::fs::read(sealed).expect("read");
        bytes[16 + 6] ^= 1;
        std::fs::write(sealed, bytes).expect("write");
        Topics::open_replica(config.clone(), Some(&summary))
            .expect("sound again")
            .close();
        let first = &stores[0];
        let mut bytes = std::fs::read(first).expect("read");
        bytes[16 + 24 + 50] ^= 0x10;
        std::fs::write(first, bytes).expect("write");
        expect_damaged(Topics::open_replica(config, Some(&summary)));
    }

    fn expect_damaged(opened: Result<Topics, LogServiceError>) {
        match opened {
            Err(LogServiceError::DamagedReplica { topic, reason }) => {
                assert_eq!(topic, "t");
                assert!(reason.contains("corrupt"), "{reason}");
            }
            Err(other) => panic!("expected a damaged replica, got {other}"),
            Ok(_) => panic!("expected a damaged replica, it opened"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_of_a_topic_a_snapshot_replaced_should_end_and_say_where_to_resume() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogServiceConfig {
            data_dir: dir.path().join("node"),
            ..LogServiceConfig::default()
        };
        let topics = Topics::open_replica(config, None).expect("open replica");
        let topic = topics.replica_topic("t").expect("topic");
        topic.apply(&[b"a".as_slice(), b"b"], 1).expect("apply");

        // A snapshot of the same topic, further on: five records.
        let snapshot = dir.path().join("snapshot");
        let mut log =
            keel_commitlog::Log::open(snapshot.join("t"), keel_commitlog::LogConfig::default())
                .expect("snapshot log");
        log.append_batch(&[b"a".as_slice(), b"b", b"c", b"d", b"e"])
            .expect("append");
        log.close().expect("close");
        let summary = Summary {
            topics: BTreeMap::from([("t".to_owned(), 5)]),
            producers: Vec::new(),
        };

        let spec = crate::tail::TailSpec {
            from: 2,
            max_bytes: 1024,
            follow: true,
        };
        let mut tail = crate::tail::spawn_tail(
            Arc::clone(&topic),
            spec,
            tokio_util::sync::CancellationToken::new(),
            topics.read_ahead(),
        );
        tokio::task::block_in_place(|| topics.replace_replica(&snapshot, &summary))
            .expect("install");
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), tail.next())
            .await
            .expect("the tail ends")
            .expect("with an item");
        match ended {
            Err(LogServiceError::Unavailable(message)) => {
                assert!(message.contains("offset 2"), "{message}");
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        let replaced = topics.get("t").expect("the new topic");
        assert_eq!(replaced.info().next_offset, 5);
        tokio::task::block_in_place(|| topics.close());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_topics_should_refuse_appends_as_shutting_down() {
        let dir = tempfile::tempdir().expect("temp dir");
        let topics = open_in(dir.path()).await;
        let topic = topics.get("").expect("default topic");
        assert_eq!(
            topic
                .append(vec![bytes::Bytes::from_static(b"x")])
                .await
                .expect("append"),
            0..1
        );
        tokio::task::block_in_place(|| topics.close());
        assert!(matches!(
            topic.append(vec![bytes::Bytes::from_static(b"y")]).await,
            Err(LogServiceError::ShuttingDown)
        ));
        assert_eq!(
            topic.read(0).await.expect("reads still work").value,
            &b"x"[..]
        );
    }
}
