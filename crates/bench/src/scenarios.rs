//! The load scenarios. Every loop ends at a deadline or a count, whichever comes first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use keel_log::Client;
use keel_proto::log::v1 as wire;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::Common;
use crate::report::Outcome;

/// The topic every scenario uses.
const TOPIC: &str = "bench";

#[derive(Debug, Clone)]
pub(crate) enum Load {
    Produce { clients: usize },
    ProduceStream { window: usize, streams: usize },
    ProduceBatch { batch: usize, clients: usize },
    Consume { records: u64 },
    Latency { rate: u64 },
}

impl Load {
    pub(crate) fn name(&self) -> String {
        match self {
            Self::Produce { clients } => format!("produce, {clients} client(s)"),
            Self::ProduceStream { window, streams } => {
                format!("produce-stream, {streams} stream(s), window {window}")
            }
            Self::ProduceBatch { batch, clients } => {
                format!("produce-batch of {batch}, {clients} client(s)")
            }
            Self::Consume { records } => format!("consume-stream of {records} records"),
            Self::Latency { rate } => format!("produce at {rate} records/s"),
        }
    }
}

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

/// Waits for every task and adds up their latencies.
async fn merged(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut all = histogram()?;
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok(all)
}

/// The outcome of a scenario whose tasks each record one acknowledgement per record.
async fn acknowledged(
    load: &Load,
    common: &Common,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Outcome> {
    let all = merged(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        load.name(),
        all.len(),
        common.record_bytes,
        seconds,
        Some((&all, "ack")),
    ))
}

pub(crate) fn micros(elapsed: Duration) -> u64 {
    elapsed.as_micros().clamp(1, 60_000_000) as u64
}

pub(crate) async fn run(load: &Load, addr: &str, common: &Common) -> anyhow::Result<Outcome> {
    let value = Bytes::from(vec![b'k'; common.record_bytes]);
    let deadline = Instant::now() + common.duration;
    match *load {
        Load::Produce { clients } => produce(load, addr, common, value, clients, deadline).await,
        Load::ProduceStream { window, streams } => {
            produce_stream(load, addr, common, value, window, streams, deadline).await
        }
        Load::ProduceBatch { batch, clients } => {
            produce_batch(load, addr, common, value, batch, clients, deadline).await
        }
        Load::Consume { records } => consume(load, addr, common, value, records).await,
        Load::Latency { rate } => latency(load, addr, common, value, rate, deadline).await,
    }
}

async fn produce(
    load: &Load,
    addr: &str,
    common: &Common,
    value: Bytes,
    clients: usize,
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = Client::connect(addr).await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram()?;
            while Instant::now() < deadline {
                let sent = Instant::now();
                client.produce(TOPIC, value.clone()).await?;
                latencies.record(micros(sent.elapsed()))?;
            }
            anyhow::Ok(latencies)
        }));
    }
    acknowledged(load, common, started, tasks).await
}

async fn produce_stream(
    load: &Load,
    addr: &str,
    common: &Common,
    value: Bytes,
    window: usize,
    streams: usize,
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut client = Client::connect(addr).await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            stream_records(&mut client, TOPIC, value, window, deadline).await
        }));
    }
    acknowledged(load, common, started, tasks).await
}

/// ProduceStream: `value` over and over on one stream until `deadline`, with up to
/// `window` records sent and not yet acknowledged; the latency of each
/// acknowledgement from its send.
pub(crate) async fn stream_records(
    client: &mut Client,
    topic: &str,
    value: Bytes,
    window: usize,
    deadline: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let (tx, rx) = mpsc::channel::<wire::ProduceRequest>(window.max(1));
    let sent_at: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let room = Arc::new(Semaphore::new(window.max(1)));
    let sender = {
        let sent_at = Arc::clone(&sent_at);
        let room = Arc::clone(&room);
        let topic = topic.to_owned();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                let Ok(permit) = room.acquire().await else {
                    break;
                };
                permit.forget();
                let request = wire::ProduceRequest {
                    record: Some(wire::Record {
                        value: value.clone(),
                        ..Default::default()
                    }),
                    topic: topic.clone(),
                };
                if let Ok(mut queue) = sent_at.lock() {
                    queue.push_back(Instant::now());
                }
                if tx.send(request).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut responses = client
        .grpc()
        .produce_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut latencies = histogram()?;
    while let Some(response) = responses.next().await {
        response?;
        let sent = sent_at.lock().ok().and_then(|mut queue| queue.pop_front());
        if let Some(sent) = sent {
            latencies.record(micros(sent.elapsed()))?;
        }
        room.add_permits(1);
    }
    sender.await?;
    Ok(latencies)
}

async fn produce_batch(
    load: &Load,
    addr: &str,
    common: &Common,
    value: Bytes,
    batch: usize,
    clients: usize,
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let values: Vec<Bytes> = (0..batch).map(|_| value.clone()).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = Client::connect(addr).await?;
        let values = values.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram()?;
            let mut records = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let offsets = client.produce_batch(TOPIC, values.clone()).await?;
                latencies.record(micros(sent.elapsed()))?;
                records += offsets.end - offsets.start;
            }
            anyhow::Ok((latencies, records))
        }));
    }
    let mut all = histogram()?;
    let mut records = 0;
    for task in tasks {
        let (latencies, count) = task.await??;
        all.add(latencies)?;
        records += count;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        load.name(),
        records,
        common.record_bytes,
        seconds,
        Some((&all, "batch ack")),
    ))
}

async fn consume(
    load: &Load,
    addr: &str,
    common: &Common,
    value: Bytes,
    records: u64,
) -> anyhow::Result<Outcome> {
    let mut client = Client::connect(addr).await?;
    let start = client
        .topics()
        .await?
        .iter()
        .find(|t| t.name == TOPIC)
        .map_or(0, |t| t.next_offset);
    let batch: Vec<Bytes> = (0..1000).map(|_| value.clone()).collect();
    let mut written = 0;
    while written < records {
        written += client
            .produce_batch(TOPIC, batch.clone())
            .await
            .map(|r| r.end - r.start)?;
    }
    let started = Instant::now();
    let mut stream = client.subscribe(TOPIC, start, false, 0).await?;
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        read += chunk?.len() as u64;
    }
    anyhow::ensure!(read == written, "read {read} records, wrote {written}");
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        load.name(),
        read,
        common.record_bytes,
        seconds,
        None,
    ))
}

async fn latency(
    load: &Load,
    addr: &str,
    common: &Common,
    value: Bytes,
    rate: u64,
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let client = Client::connect(addr).await?;
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let latencies = Arc::new(Mutex::new(histogram()?));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut due = Instant::now();
    while due < deadline {
        tokio::time::sleep_until(due.into()).await;
        let mut client = client.clone();
        let value = value.clone();
        let latencies = Arc::clone(&latencies);
        // Open loop: requests go out on schedule whatever the responses do, so a
        // stalled service shows up as latency of the requests in flight. Measured
        // from the send; tokio's 1 ms timer granularity makes "due" too coarse.
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            client.produce(TOPIC, value).await?;
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
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
    Ok(Outcome::new(
        load.name(),
        all.len(),
        common.record_bytes,
        seconds,
        Some((&all, "ack")),
    ))
}
