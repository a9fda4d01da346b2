//! A client of the log service over gRPC, used by the CLI and the SDK.

use std::ops::Range;

use crate::{Offset, Record, TopicInfo};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use keel_proto::log::v1 as wire;
use keel_proto::log::v1::log_client::LogClient;

use crate::channel::{Channel, Target};

/// How long [`Client::connect`] waits for the service to accept the connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not usable.
    #[error("invalid log service address {addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The service could not be reached.
    #[error("cannot reach the log service at {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why: refused, timed out, or the HTTP/2 handshake failed.
        #[source]
        source: std::io::Error,
    },
    /// The service answered with an error.
    #[error("{} ({:?})", .0.message(), .0.code())]
    Status(tonic::Status),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

/// A connection to a log service: one HTTP/2 connection, on which calls (also
/// concurrent ones, from clones) are multiplexed. When the connection breaks (the
/// service restarted), the calls on it fail with `UNAVAILABLE` and the next call
/// connects again.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    target: Target,
    channel: Channel,
    inner: LogClient<Channel>,
}

fn from_wire(record: wire::Record) -> Record {
    Record {
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        value: record.value,
    }
}

impl Client {
    /// Connects to `addr` (`host:port` or an `http://` URL), waiting at most 5 s.
    ///
    /// # Errors
    ///
    /// [`ClientError::Address`] for an unusable address; [`ClientError::Connect`] when
    /// nothing answers.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let target = Target::parse(addr).map_err(|reason| ClientError::Address {
            addr: addr.to_owned(),
            reason,
        })?;
        let channel = Self::dial(addr, &target).await?;
        Ok(Self {
            addr: addr.to_owned(),
            inner: Self::grpc_client(&target, channel.clone()),
            target,
            channel,
        })
    }

    // A host that drops packets must not hang the caller for the OS's minutes.
    async fn dial(addr: &str, target: &Target) -> Result<Channel, ClientError> {
        Channel::connect(target, CONNECT_TIMEOUT)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })
    }

    fn grpc_client(target: &Target, channel: Channel) -> LogClient<Channel> {
        LogClient::with_origin(channel, target.origin.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// The generated client, on a live connection: after the connection broke, this
    /// dials again.
    async fn ready(&mut self) -> Result<&mut LogClient<Channel>, ClientError> {
        if self.channel.is_closed() {
            let channel = Self::dial(&self.addr, &self.target).await?;
            self.inner = Self::grpc_client(&self.target, channel.clone());
            self.channel = channel;
        }
        Ok(&mut self.inner)
    }

    /// A unary call on a live connection.
    async fn call<Req, Resp>(
        &mut self,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, ClientError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        self.ready().await?;
        Ok(self.channel.unary(&self.target, path, request).await?)
    }

    /// Appends one record to `topic` (empty: the default topic); returns its offset.
    ///
    /// # Errors
    ///
    /// The service's status.
    pub async fn produce(
        &mut self,
        topic: &str,
        value: impl Into<Bytes>,
    ) -> Result<Offset, ClientError> {
        let request = wire::ProduceRequest {
            record: Some(wire::Record {
                value: value.into(),
                ..Default::default()
            }),
            topic: topic.to_owned(),
        };
        let response: wire::ProduceResponse = self.call("/log.v1.Log/Produce", &request).await?;
        Ok(response.offset)
    }

    /// Appends records as one batch; returns their offsets.
    ///
    /// # Errors
    ///
    /// The service's status.
    pub async fn produce_batch(
        &mut self,
        topic: &str,
        values: Vec<Bytes>,
    ) -> Result<Range<Offset>, ClientError> {
        let request = wire::ProduceBatchRequest {
            topic: topic.to_owned(),
            values,
        };
        let response: wire::ProduceBatchResponse =
            self.call("/log.v1.Log/ProduceBatch", &request).await?;
        Ok(response.first_offset..response.first_offset + response.count)
    }

    /// Reads one record.
    ///
    /// # Errors
    ///
    /// The service's status (`OUT_OF_RANGE` outside the topic's range).
    pub async fn consume(&mut self, topic: &str, offset: Offset) -> Result<Record, ClientError> {
        let request = wire::ConsumeRequest {
            offset,
            topic: topic.to_owned(),
        };
        let response: wire::ConsumeResponse = self.call("/log.v1.Log/Consume", &request).await?;
        let record = response.record;
        record.map(from_wire).ok_or_else(|| {
            tonic::Status::internal("the service sent a response without a record").into()
        })
    }

    /// Streams records from `from` on, in chunks of up to `max_bytes` (0: the
    /// service's default); with `follow`, keeps streaming new records as they come.
    ///
    /// # Errors
    ///
    /// The service's status, at the start or as an item of the stream.
    pub async fn subscribe(
        &mut self,
        topic: &str,
        from: Offset,
        follow: bool,
        max_bytes: u32,
    ) -> Result<impl Stream<Item = Result<Vec<Record>, ClientError>> + use<>, ClientError> {
        let request = wire::ConsumeBatchRequest {
            topic: topic.to_owned(),
            offset: from,
            max_bytes,
            follow,
        };
        let stream = self
            .ready()
            .await?
            .consume_batch_stream(request)
            .await?
            .into_inner();
        Ok(stream.map(|message| {
            message
                .map(|batch| batch.records.into_iter().map(from_wire).collect())
                .map_err(ClientError::from)
        }))
    }

    /// Lists the topics.
    ///
    /// # Errors
    ///
    /// The service's status.
    pub async fn topics(&mut self) -> Result<Vec<TopicInfo>, ClientError> {
        let response: wire::ListTopicsResponse = self
            .call("/log.v1.Log/ListTopics", &wire::ListTopicsRequest {})
            .await?;
        Ok(response
            .topics
            .into_iter()
            .map(|topic| TopicInfo {
                name: topic.name,
                lowest_offset: topic.lowest_offset,
                next_offset: topic.next_offset,
                size_bytes: topic.size_bytes,
                segments: topic.segments as usize,
            })
            .collect())
    }

    /// The generated gRPC client, for calls this wrapper does not cover.
    pub fn grpc(&mut self) -> &mut LogClient<Channel> {
        &mut self.inner
    }
}
