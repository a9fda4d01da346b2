//! The one load engine: a [`System`] is something records can be appended to (each
//! append acknowledged) and read back from, and each [`Workload`] is written once
//! over it, for keel and its peers alike.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;

use crate::report::Outcome;

/// Records written per batch, by the batch workload and to fill a topic for reading.
pub(crate) const BATCH: usize = 1000;
/// Unacknowledged records per producer in the stream workload.
pub(crate) const WINDOW: usize = 1024;

/// One connection's way of appending; a clone shares the connection (the open-loop
/// workload sends each request on a clone).
pub(crate) trait Producer: Clone + Send + 'static {
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
    /// `producers` connections, each appending batches of `batch` records.
    Batch { producers: usize, batch: usize },
    /// `producers` connections, each pipelining single records with `window` in
    /// flight (keel: ProduceStream; NATS: async publish; Redis: pipelined XADD).
    Stream { producers: usize, window: usize },
    /// Fill with `records` records, then time reading them all back.
    Consume { records: u64 },
    /// Single appends sent at `rate` per second whatever the answers do (open loop):
    /// latency at a steady load.
    Latency { rate: u64 },
}

impl Workload {
    /// Parses `produce:N`, `batch:N`, `stream:N` (N producers), `consume:RECORDS` or
    /// `latency:RATE`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (kind, n) = text.split_once(':').unwrap_or((text, "1"));
        let n: u64 = n.parse().map_err(|_| format!("bad count in {text:?}"))?;
        let producers = usize::try_from(n.clamp(1, 256)).unwrap_or(1);
        match kind {
            "produce" => Ok(Self::Produce { producers }),
            "batch" => Ok(Self::Batch {
                producers,
                batch: BATCH,
            }),
            "stream" => Ok(Self::Stream {
                producers,
                window: WINDOW,
            }),
            "consume" => Ok(Self::Consume { records: n.max(1) }),
            "latency" => Ok(Self::Latency { rate: n.max(1) }),
            _ => Err(format!(
                "unknown workload {text:?}: produce:N, batch:N, stream:N, consume:RECORDS or latency:RATE"
            )),
        }
    }

    pub(crate) fn name(self) -> String {
        match self {
            Self::Produce { producers } => format!("produce, {producers} producer(s)"),
            Self::Batch { producers, batch } => {
                format!("batch of {batch}, {producers} producer(s)")
            }
            Self::Stream { producers, window } => {
                format!("stream, window {window}, {producers} producer(s)")
            }
            Self::Consume { records } => format!("consume {records} records"),
            Self::Latency { rate } => format!("produce at {rate} records/s"),
        }
    }
}

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

pub(crate) fn micros(elapsed: Duration) -> u64 {
    elapsed.as_micros().clamp(1, 60_000_000) as u64
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
    let deadline = Instant::now() + duration;
    let (records, seconds, latencies) = match workload {
        Workload::Produce { producers } => {
            closed_loop(system, producers, deadline, 1, move |mut producer| {
                let value = value.clone();
                async move { producer.produce(value).await.map(|()| producer) }
            })
            .await?
        }
        Workload::Batch { producers, batch } => {
            let values: Arc<[Bytes]> = (0..batch).map(|_| value.clone()).collect();
            closed_loop(
                system,
                producers,
                deadline,
                batch as u64,
                move |mut producer| {
                    let values = Arc::clone(&values);
                    async move { producer.produce_batch(&values).await.map(|()| producer) }
                },
            )
            .await?
        }
        Workload::Stream { producers, window } => {
            stream(system, producers, window, value, deadline).await?
        }
        Workload::Consume { records } => {
            let (read, seconds) = consume(system, records, value).await?;
            return Ok(Outcome::new(
                workload.name(),
                read,
                record_bytes,
                seconds,
                None,
            ));
        }
        Workload::Latency { rate } => open_loop(system, rate, value, deadline).await?,
    };
    let of = if matches!(workload, Workload::Batch { .. }) {
        "batch ack"
    } else {
        "ack"
    };
    Ok(Outcome::new(
        workload.name(),
        records,
        record_bytes,
        seconds,
        Some((&latencies, of)),
    ))
}

/// Records, seconds, and the latency of each call.
type Measured = (u64, f64, Histogram<u64>);

/// `producers` connections, each calling `call` (which appends `per_call` records and
/// hands the producer back) until `deadline`, the next call after the last is
/// acknowledged.
async fn closed_loop<S, F, Fut>(
    system: &S,
    producers: usize,
    deadline: Instant,
    per_call: u64,
    call: F,
) -> anyhow::Result<Measured>
where
    S: System,
    F: Fn(S::Producer) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<S::Producer>> + Send,
{
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let mut producer = system.connect().await?;
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram()?;
            while Instant::now() < deadline {
                let sent = Instant::now();
                producer = call(producer).await?;
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
    Ok((all.len() * per_call, started.elapsed().as_secs_f64(), all))
}

/// `producers` connections, each pipelining `value` with `window` in flight.
async fn stream<S: System>(
    system: &S,
    producers: usize,
    window: usize,
    value: Bytes,
    deadline: Instant,
) -> anyhow::Result<Measured> {
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let mut producer = system.connect().await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram()?;
            let acked = producer
                .produce_pipelined(value, window, deadline, &mut latencies)
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
    Ok((records, started.elapsed().as_secs_f64(), all))
}

/// Fills the system with `records` copies of `value`, then times reading them back:
/// records read and seconds.
async fn consume<S: System>(system: &S, records: u64, value: Bytes) -> anyhow::Result<(u64, f64)> {
    let batch: Vec<Bytes> = (0..BATCH).map(|_| value.clone()).collect();
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
    Ok((read, seconds))
}

/// Single appends at `rate` per second until `deadline`, each on its own task (open
/// loop): requests go out on schedule whatever the answers do, so a stalled service
/// shows up as latency of the requests in flight. Latency is measured from the send;
/// tokio's 1 ms timer granularity makes "due" too coarse.
async fn open_loop<S: System>(
    system: &S,
    rate: u64,
    value: Bytes,
    deadline: Instant,
) -> anyhow::Result<Measured> {
    let producer = system.connect().await?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let latencies = Arc::new(Mutex::new(histogram()?));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut due = Instant::now();
    while due < deadline {
        tokio::time::sleep_until(due.into()).await;
        let (mut producer, value) = (producer.clone(), value.clone());
        let latencies = Arc::clone(&latencies);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            producer.produce(value).await?;
            if let Ok(mut latencies) = latencies.lock() {
                latencies.record(micros(sent.elapsed()))?;
            }
            anyhow::Ok(())
        }));
        due += period;
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let all = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?
        .clone();
    Ok((all.len(), seconds, all))
}

/// Keeps up to `window` appends in flight until `deadline`, then waits for the rest;
/// returns how many were acknowledged and records each one's latency. `send` starts one
/// append (the part a client must wait for before sending the next) and returns the
/// future of its acknowledgement.
pub(crate) async fn pipelined<S, A>(
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
    use crate::raw::Raw;

    #[test]
    fn workloads_should_parse_with_counts() {
        assert!(matches!(
            Workload::parse("produce:16"),
            Ok(Workload::Produce { producers: 16 })
        ));
        assert!(matches!(
            Workload::parse("batch"),
            Ok(Workload::Batch {
                producers: 1,
                batch: BATCH
            })
        ));
        assert!(matches!(
            Workload::parse("consume:5000"),
            Ok(Workload::Consume { records: 5000 })
        ));
        assert!(matches!(
            Workload::parse("stream:4"),
            Ok(Workload::Stream {
                producers: 4,
                window: WINDOW
            })
        ));
        assert!(matches!(
            Workload::parse("latency:1000"),
            Ok(Workload::Latency { rate: 1000 })
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
