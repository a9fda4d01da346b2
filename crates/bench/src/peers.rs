//! The peers keel is compared with, as [`System`]s of the load engine: NATS
//! JetStream and Redis Streams.

use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;

use crate::engine::{BATCH, Producer, System, pipelined};

/// NATS JetStream: one file-storage stream per run.
pub(crate) struct Nats {
    context: async_nats::jetstream::Context,
    stream: String,
    subject: String,
}

impl Nats {
    /// Connects and creates the run's stream (`storage: file`, `replicas` copies).
    pub(crate) async fn start(url: &str, run: &str, replicas: usize) -> anyhow::Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let context = async_nats::jetstream::new(client);
        let stream = format!("BENCH_{run}");
        let subject = format!("bench.{run}");
        let config = async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        // A cluster that has just started elects its JetStream leader first.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match context.get_or_create_stream(config.clone()).await {
                Ok(_) => break,
                Err(err) if std::time::Instant::now() < deadline => {
                    drop(err);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(err) => anyhow::bail!("creating stream {stream}: {err}"),
            }
        }
        Ok(Self {
            context,
            stream,
            subject,
        })
    }
}

/// A JetStream publisher.
#[derive(Clone)]
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
#[derive(Clone)]
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
