//! keel's log service as a [`System`] of the load engine.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use keel_log::Client;
use keel_proto::log::v1 as wire;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::engine::{Producer, System, histogram, micros};

/// keel's log service over gRPC.
pub(crate) struct Keel {
    pub(crate) addr: String,
    pub(crate) topic: String,
    /// TLS and a token, when the service runs with them.
    pub(crate) credentials: keel_log::Credentials,
}

/// A keel client bound to a topic.
#[derive(Clone)]
pub(crate) struct KeelProducer {
    client: Client,
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
            client: Client::connect_with(&self.addr, self.credentials.clone()).await?,
            topic: self.topic.clone(),
        })
    }

    async fn read(&self, count: u64) -> anyhow::Result<u64> {
        let mut client = Client::connect_with(&self.addr, self.credentials.clone()).await?;
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

/// ProduceStream: `value` over and over on one stream until `deadline`, with up to
/// `window` records sent and not yet acknowledged; the latency of each
/// acknowledgement from its send.
async fn stream_records(
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
                    ..Default::default()
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
