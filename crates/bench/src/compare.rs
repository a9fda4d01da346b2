//! keel beside the systems a user would otherwise pick, through the same workload
//! code: a [`System`] is something records can be appended to (each append
//! acknowledged) and read back from, and each workload is written once over it.
//!
//! | system | acknowledged when | read with |
//! | --- | --- | --- |
//! | `keel` | after `fdatasync` (sync policy `always`); streams over `ProduceStream` | `ConsumeBatchStream` |
//! | `nats` | JetStream's publish ack (file storage; durability as the server is configured) | a pull consumer, no acks |
//! | `redis` | `XADD`'s reply (durability as `appendfsync` is configured) | `XRANGE` pages of 1000 |
//! | `raw` | `pwrite` + `fdatasync` of a plain file, in this process, into space preallocated with `fallocate` (as keel's log does): the physical limit | sequential `read` |
//!
//! Each run uses its own topic, subject or key, so runs never read each other's data.

use std::future::Future;
use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;

use crate::report::Outcome;
use crate::scenarios::{histogram, micros, stream_records};

/// Records written per batch, by the batch workload and to fill a topic for reading.
pub(crate) const BATCH: usize = 1000;
/// Unacknowledged records per producer in the stream workload.
pub(crate) const WINDOW: usize = 1024;

/// One connection's way of appending.
pub(crate) trait Producer: Send + 'static {
    /// Appends one record; completes once it is acknowledged.
    fn produce(&mut self, value: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Appends `values`; completes once all are acknowledged.
    fn produce_batch(
        &mut self,
        values: &[Bytes],
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Appends `value` over and over until `deadline`, one record per message with up
    /// to `window` unacknowledged, recording each acknowledgement's latency from its
    /// send; answers how many were acknowledged.
    fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// A system under load.
pub(crate) trait System: Send + Sync {
    /// A connection of one producer.
    type Producer: Producer;
    /// Opens one more producer connection.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Producer>> + Send;
    /// Reads the first `count` records back; answers how many were read.
    fn read(&self, count: u64) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// A workload, the same for every system.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Workload {
    /// `producers` connections, each appending one record at a time.
    Produce { producers: usize },
    /// `producers` connections, each appending batches of [`BATCH`].
    Batch { producers: usize },
    /// `producers` connections, each pipelining single records with [`WINDOW`] in
    /// flight (keel: ProduceStream; NATS: async publish; Redis: pipelined XADD).
    Stream { producers: usize },
    /// Fill with `records` records, then time reading them all back.
    Consume { records: u64 },
}

impl Workload {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (kind, n) = text.split_once(':').unwrap_or((text, "1"));
        let n: u64 = n.parse().map_err(|_| format!("bad count in {text:?}"))?;
        let producers = usize::try_from(n.clamp(1, 256)).unwrap_or(1);
        match kind {
            "produce" => Ok(Self::Produce { producers }),
            "batch" => Ok(Self::Batch { producers }),
            "stream" => Ok(Self::Stream { producers }),
            "consume" => Ok(Self::Consume { records: n.max(1) }),
            _ => Err(format!(
                "unknown workload {text:?}: produce:N, batch:N, stream:N or consume:RECORDS"
            )),
        }
    }

    pub(crate) fn name(self) -> String {
        match self {
            Self::Produce { producers } => format!("produce, {producers} producer(s)"),
            Self::Batch { producers } => format!("batch of {BATCH}, {producers} producer(s)"),
            Self::Stream { producers } => {
                format!("stream, window {WINDOW}, {producers} producer(s)")
            }
            Self::Consume { records } => format!("consume {records} records"),
        }
    }
}

/// Runs `workload` against `system` with records of `record_bytes`, for at most
/// `duration` (a consume run is bounded by its record count instead).
pub(crate) async fn run<S: System>(
    system: &S,
    workload: Workload,
    record_bytes: usize,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let value = Bytes::from(vec![b'k'; record_bytes]);
    let batch: Vec<Bytes> = (0..BATCH).map(|_| value.clone()).collect();
    match workload {
        Workload::Produce { producers } | Workload::Batch { producers } => {
            let per_call = if matches!(workload, Workload::Batch { .. }) {
                BATCH as u64
            } else {
                1
            };
            let deadline = Instant::now() + duration;
            let mut tasks = Vec::new();
            for _ in 0..producers {
                let mut producer = system.connect().await?;
                let (value, batch) = (value.clone(), batch.clone());
                tasks.push(tokio::spawn(async move {
                    let mut latencies = histogram()?;
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        if per_call == 1 {
                            producer.produce(value.clone()).await?;
                        } else {
                            producer.produce_batch(&batch).await?;
                        }
                        latencies.record(micros(sent.elapsed()))?;
                    }
                    anyhow::Ok(latencies)
                }));
            }
            let started = Instant::now();
            let mut all = histogram()?;
            for task in tasks {
                all.add(task.await??)?;
            }
            let seconds = started.elapsed().as_secs_f64();
            let of = if per_call == 1 { "ack" } else { "batch ack" };
            Ok(Outcome::new(
                workload.name(),
                all.len() * per_call,
                record_bytes,
                seconds,
                Some((&all, of)),
            ))
        }
        Workload::Stream { producers } => {
            let deadline = Instant::now() + duration;
            let mut tasks = Vec::new();
            for _ in 0..producers {
                let mut producer = system.connect().await?;
                let value = value.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = histogram()?;
                    let acked = producer
                        .produce_pipelined(value, WINDOW, deadline, &mut latencies)
                        .await?;
                    anyhow::Ok((acked, latencies))
                }));
            }
            let started = Instant::now();
            let (mut records, mut all) = (0, histogram()?);
            for task in tasks {
                let (acked, latencies) = task.await??;
                records += acked;
                all.add(latencies)?;
            }
            let seconds = started.elapsed().as_secs_f64();
            Ok(Outcome::new(
                workload.name(),
                records,
                record_bytes,
                seconds,
                Some((&all, "ack")),
            ))
        }
        Workload::Consume { records } => {
            let mut producer = system.connect().await?;
            let mut written = 0;
            while written < records {
                let n = usize::try_from(records - written)
                    .unwrap_or(BATCH)
                    .min(BATCH);
                producer.produce_batch(&batch[..n]).await?;
                written += n as u64;
            }
            let started = Instant::now();
            let read = system.read(records).await?;
            let seconds = started.elapsed().as_secs_f64();
            if read != records {
                bail!("read {read} records back, wrote {records}");
            }
            Ok(Outcome::new(
                workload.name(),
                read,
                record_bytes,
                seconds,
                None,
            ))
        }
    }
}

/// keel's log service over gRPC.
pub(crate) struct Keel {
    pub(crate) addr: String,
    pub(crate) topic: String,
}

/// A keel client bound to a topic.
pub(crate) struct KeelProducer {
    client: keel_log::Client,
    topic: String,
}

impl Producer for KeelProducer {
    async fn produce(&mut self, value: Bytes) -> anyhow::Result<()> {
        self.client.produce(&self.topic, value).await?;
        Ok(())
    }

    async fn produce_batch(&mut self, values: &[Bytes]) -> anyhow::Result<()> {
        self.client
            .produce_batch(&self.topic, values.to_vec())
            .await?;
        Ok(())
    }

    async fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> anyhow::Result<u64> {
        let acked = stream_records(&mut self.client, &self.topic, value, window, deadline).await?;
        let count = acked.len();
        latencies.add(acked)?;
        Ok(count)
    }
}

impl System for Keel {
    type Producer = KeelProducer;

    async fn connect(&self) -> anyhow::Result<KeelProducer> {
        Ok(KeelProducer {
            client: keel_log::Client::connect(&self.addr).await?,
            topic: self.topic.clone(),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        let mut client = keel_log::Client::connect(&self.addr).await?;
        let mut stream = client.subscribe(&self.topic, 0, false, 0).await?;
        let mut read = 0;
        while read < count {
            let Some(chunk) = stream.next().await else {
                break;
            };
            read += chunk?.len() as u64;
        }
        Ok(read)
    }
}

/// NATS JetStream: one file-storage stream per run.
pub(crate) struct Nats {
    context: async_nats::jetstream::Context,
    stream: String,
    subject: String,
}

impl Nats {
    /// Connects and creates the run's stream (`storage: file`, one replica).
    pub(crate) async fn start(url: &str, run: &str) -> anyhow::Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let context = async_nats::jetstream::new(client);
        let stream = format!("BENCH_{run}");
        let subject = format!("bench.{run}");
        context
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![subject.clone()],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|err| anyhow::anyhow!("creating stream {stream}: {err}"))?;
        Ok(Self {
            context,
            stream,
            subject,
        })
    }
}

/// A JetStream publisher.
pub(crate) struct NatsProducer {
    context: async_nats::jetstream::Context,
    subject: String,
}

impl Producer for NatsProducer {
    async fn produce(&mut self, value: Bytes) -> anyhow::Result<()> {
        self.context
            .publish(self.subject.clone(), value)
            .await
            .map_err(|err| anyhow::anyhow!("publish: {err}"))?
            .await
            .map_err(|err| anyhow::anyhow!("publish ack: {err}"))?;
        Ok(())
    }

    async fn produce_batch(&mut self, values: &[Bytes]) -> anyhow::Result<()> {
        // Pipelined: every publish goes out, then every acknowledgement is awaited.
        let mut acks = Vec::with_capacity(values.len());
        for value in values {
            acks.push(
                self.context
                    .publish(self.subject.clone(), value.clone())
                    .await
                    .map_err(|err| anyhow::anyhow!("publish: {err}"))?,
            );
        }
        for ack in acks {
            ack.await
                .map_err(|err| anyhow::anyhow!("publish ack: {err}"))?;
        }
        Ok(())
    }

    async fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> anyhow::Result<u64> {
        let (context, subject) = (&self.context, &self.subject);
        pipelined(window, deadline, latencies, || {
            let value = value.clone();
            async move {
                let ack = context
                    .publish(subject.clone(), value)
                    .await
                    .map_err(|err| anyhow::anyhow!("publish: {err}"))?;
                Ok(async move {
                    ack.await
                        .map(drop)
                        .map_err(|err| anyhow::anyhow!("publish ack: {err}"))
                })
            }
        })
        .await
    }
}

impl System for Nats {
    type Producer = NatsProducer;

    async fn connect(&self) -> anyhow::Result<NatsProducer> {
        // One shared connection multiplexes publishers, as the client is meant to be used.
        Ok(NatsProducer {
            context: self.context.clone(),
            subject: self.subject.clone(),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        use async_nats::jetstream::consumer;
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|err| anyhow::anyhow!("stream {}: {err}", self.stream))?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .map_err(|err| anyhow::anyhow!("creating a consumer: {err}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .map_err(|err| anyhow::anyhow!("consuming: {err}"))?;
        let mut read = 0;
        while read < count {
            match messages.next().await {
                Some(Ok(_)) => read += 1,
                Some(Err(err)) => bail!("consuming: {err}"),
                None => break,
            }
        }
        Ok(read)
    }
}

/// Redis Streams: one stream key per run.
pub(crate) struct Redis {
    client: redis::Client,
    key: String,
}

impl Redis {
    pub(crate) fn start(url: &str, run: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: redis::Client::open(url).with_context(|| format!("redis URL {url}"))?,
            key: format!("bench:{run}"),
        })
    }
}

/// A Redis connection appending with `XADD`.
pub(crate) struct RedisProducer {
    connection: redis::aio::MultiplexedConnection,
    key: String,
}

impl Producer for RedisProducer {
    async fn produce(&mut self, value: Bytes) -> anyhow::Result<()> {
        let _: String = redis::cmd("XADD")
            .arg(&self.key)
            .arg("*")
            .arg("v")
            .arg(value.as_ref())
            .query_async(&mut self.connection)
            .await?;
        Ok(())
    }

    async fn produce_batch(&mut self, values: &[Bytes]) -> anyhow::Result<()> {
        // Pipelined, not a transaction: the replies come back together.
        let mut pipe = redis::pipe();
        for value in values {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("*")
                .arg("v")
                .arg(value.as_ref())
                .ignore();
        }
        let () = pipe.query_async(&mut self.connection).await?;
        Ok(())
    }

    async fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> anyhow::Result<u64> {
        // The multiplexed connection pipelines concurrent commands on one socket.
        let (connection, key) = (&self.connection, &self.key);
        pipelined(window, deadline, latencies, || {
            let (mut connection, key, value) = (connection.clone(), key.clone(), value.clone());
            async move {
                Ok(async move {
                    let _id: String = redis::cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("v")
                        .arg(value.as_ref())
                        .query_async(&mut connection)
                        .await?;
                    Ok(())
                })
            }
        })
        .await
    }
}

impl System for Redis {
    type Producer = RedisProducer;

    async fn connect(&self) -> anyhow::Result<RedisProducer> {
        Ok(RedisProducer {
            connection: self.client.get_multiplexed_async_connection().await?,
            key: self.key.clone(),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let mut connection = self.client.get_multiplexed_async_connection().await?;
        let mut from = "-".to_owned();
        let mut read = 0;
        while read < count {
            let page: Entries = redis::cmd("XRANGE")
                .arg(&self.key)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut connection)
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = format!("({last}");
            read += page.len() as u64;
        }
        Ok(read)
    }
}

/// A plain file: `pwrite` + `fdatasync` per acknowledgement, one writer at a time.
pub(crate) struct Raw {
    file: Arc<Mutex<RawFile>>,
    path: std::path::PathBuf,
    record_bytes: usize,
}

/// The file, the end of its data, and how far it is preallocated.
pub(crate) struct RawFile {
    file: std::fs::File,
    len: u64,
    allocated: u64,
}

/// Space preallocated at a time: a sync after a write inside the file's length needs no
/// change of size, the cheapest a durable append can be on this filesystem.
const RAW_PREALLOCATE: u64 = 64 << 20;

impl RawFile {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.len + bytes.len() as u64;
        if end > self.allocated {
            let grow = (end - self.allocated).max(RAW_PREALLOCATE);
            rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::empty(),
                self.allocated,
                grow,
            )?;
            self.allocated += grow;
        }
        self.file.write_all_at(bytes, self.len)?;
        self.file.sync_data()?;
        self.len = end;
        Ok(())
    }
}

impl Raw {
    pub(crate) fn start(dir: &std::path::Path, record_bytes: usize) -> anyhow::Result<Self> {
        let path = dir.join("raw.data");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let file = RawFile {
            file,
            len: 0,
            allocated: 0,
        };
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            path,
            record_bytes,
        })
    }
}

/// A writer of the shared file.
pub(crate) struct RawProducer {
    file: Arc<Mutex<RawFile>>,
}

impl RawProducer {
    async fn write(&self, values: Vec<Bytes>) -> anyhow::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            let mut buffer = Vec::with_capacity(values.iter().map(Bytes::len).sum());
            for value in &values {
                buffer.extend_from_slice(value);
            }
            file.append(&buffer)?;
            anyhow::Ok(())
        })
        .await?
    }
}

impl Producer for RawProducer {
    async fn produce(&mut self, value: Bytes) -> anyhow::Result<()> {
        self.write(vec![value]).await
    }

    async fn produce_batch(&mut self, values: &[Bytes]) -> anyhow::Result<()> {
        self.write(values.to_vec()).await
    }

    /// The disk's limit for a window of single records: each sync covers every record
    /// that arrived while the previous one ran, which here is the whole window.
    async fn produce_pipelined(
        &mut self,
        value: Bytes,
        window: usize,
        deadline: Instant,
        latencies: &mut Histogram<u64>,
    ) -> anyhow::Result<u64> {
        let values: Vec<Bytes> = (0..window).map(|_| value.clone()).collect();
        let mut acked = 0;
        while Instant::now() < deadline {
            let sent = Instant::now();
            self.write(values.clone()).await?;
            let latency = micros(sent.elapsed());
            latencies.record_n(latency, window as u64)?;
            acked += window as u64;
        }
        Ok(acked)
    }
}

impl System for Raw {
    type Producer = RawProducer;

    async fn connect(&self) -> anyhow::Result<RawProducer> {
        Ok(RawProducer {
            file: Arc::clone(&self.file),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        let (path, record_bytes) = (self.path.clone(), self.record_bytes.max(1));
        // Only written bytes count, not the preallocated zeros after them.
        let written = self.file.lock().unwrap_or_else(PoisonError::into_inner).len;
        tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::open(&path)?.take(written);
            let mut buffer = vec![0u8; 1 << 20];
            let mut bytes = 0u64;
            while bytes < count * record_bytes as u64 {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
            anyhow::Ok(bytes / record_bytes as u64)
        })
        .await?
    }
}

/// Keeps up to `window` appends in flight until `deadline`, then waits for the rest;
/// returns how many were acknowledged and records each one's latency. `send` starts one
/// append (the part a client must wait for before sending the next) and returns the
/// future of its acknowledgement.
async fn pipelined<S, A>(
    window: usize,
    deadline: Instant,
    latencies: &mut Histogram<u64>,
    mut send: impl FnMut() -> S,
) -> anyhow::Result<u64>
where
    S: Future<Output = anyhow::Result<A>>,
    A: Future<Output = anyhow::Result<()>>,
{
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut acked = 0;
    loop {
        if Instant::now() < deadline && in_flight.len() < window {
            let sent = Instant::now();
            let ack = send().await?;
            in_flight.push(async move { (ack.await, sent) });
            continue;
        }
        let Some((ack, sent)) = in_flight.next().await else {
            break;
        };
        ack?;
        latencies.record(micros(sent.elapsed()))?;
        acked += 1;
    }
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_should_parse_with_counts() {
        assert!(matches!(
            Workload::parse("produce:16"),
            Ok(Workload::Produce { producers: 16 })
        ));
        assert!(matches!(
            Workload::parse("batch"),
            Ok(Workload::Batch { producers: 1 })
        ));
        assert!(matches!(
            Workload::parse("consume:5000"),
            Ok(Workload::Consume { records: 5000 })
        ));
        assert!(matches!(
            Workload::parse("stream:4"),
            Ok(Workload::Stream { producers: 4 })
        ));
        assert!(Workload::parse("fly:1").is_err());
        assert!(Workload::parse("produce:x").is_err());
    }

    #[tokio::test]
    async fn the_raw_system_should_read_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let raw = Raw::start(dir.path(), 100).unwrap();
        let outcome = run(
            &raw,
            Workload::Consume { records: 2500 },
            100,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(outcome.records, 2500);
        let produced = run(
            &raw,
            Workload::Produce { producers: 2 },
            100,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
        assert!(produced.records > 0 && produced.p50_us.is_some());
    }
}
