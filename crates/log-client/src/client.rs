//! A client of the log service over gRPC, used by the CLI and the SDK.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{Offset, Record, TopicInfo};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use keel_proto::log::v1 as wire;
use keel_proto::log::v1::log_client::LogClient;

use crate::channel::{Channel, Credentials, Target};

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

/// How long a call that failed because the cluster could not take it (no leader,
/// a node down) is retried, on the other nodes too, before its error is returned.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(10);

/// A connection to a log service, a single node or a cluster: one HTTP/2
/// connection, on which calls (also concurrent ones, from clones) are multiplexed.
///
/// - **Several addresses** (`a,b,c`): the client connects to one that answers,
///   asks it for the cluster's servers (`GetServers`) and talks to the leader, so
///   that writes take no extra hop. When a call fails as `UNAVAILABLE` (a node
///   died, an election is under way), the client finds the leader again, on any
///   node it knows, and retries for up to [`DEFAULT_RETRY_FOR`].
/// - **Idempotent producer**: each client (and each clone) is a producer with an
///   id of its own, and numbers its appends; a retried append carries the same
///   number, so a cluster stores it once even when the first attempt was stored
///   and only its answer was lost.
/// - When the connection breaks (the service restarted), the next call connects
///   again.
#[derive(Debug)]
pub struct Client {
    /// Every address known: those given, then those the cluster named.
    addrs: Vec<String>,
    addr: String,
    target: Target,
    channel: Channel,
    inner: LogClient<Channel>,
    producer: u64,
    sequence: u64,
    retry_for: Duration,
    credentials: Credentials,
}

impl Clone for Client {
    /// Another producer on the same connection: a new producer id, so that
    /// concurrent clones never share a sequence.
    fn clone(&self) -> Self {
        Self {
            addrs: self.addrs.clone(),
            addr: self.addr.clone(),
            target: self.target.clone(),
            channel: self.channel.clone(),
            inner: self.inner.clone(),
            producer: new_producer_id(),
            sequence: 0,
            retry_for: self.retry_for,
            credentials: self.credentials.clone(),
        }
    }
}

/// A random, non-zero producer id: an idempotent producer's name for itself (over
/// HTTP, the `keel-producer` header), or one request's idempotency key.
pub fn new_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static MADE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(MADE.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

fn from_wire(record: wire::Record) -> Record {
    Record {
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        value: record.value,
    }
}

/// The wait before the first retry of a call the cluster could not take.
const FIRST_RETRY: Duration = Duration::from_millis(10);

/// The longest wait between retries. An election takes a few hundred milliseconds;
/// asking at least this often finds the new leader soon after it is elected, for a
/// few small calls per client while there is none.
const MAX_RETRY_WAIT: Duration = Duration::from_millis(50);

/// Whether a call that failed so is worth retrying elsewhere or later.
fn retriable(err: &ClientError) -> bool {
    match err {
        ClientError::Connect { .. } => true,
        ClientError::Status(status) => status.code() == tonic::Code::Unavailable,
        ClientError::Address { .. } => false,
    }
}

impl Client {
    /// Connects to `addr` (`host:port` or an `http://` URL; several, comma-separated,
    /// for a cluster), waiting at most 5 s for each; with several, talks to the
    /// leader.
    ///
    /// # Errors
    ///
    /// [`ClientError::Address`] for an unusable address; [`ClientError::Connect`] when
    /// none answers.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, Credentials::default()).await
    }

    /// As [`Client::connect`], presenting `credentials` with every call.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub async fn connect_with(addr: &str, credentials: Credentials) -> Result<Self, ClientError> {
        let addrs: Vec<String> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Address {
                addr: addr.to_owned(),
                reason: "no address".into(),
            });
        }
        for one in &addrs {
            Target::parse(one).map_err(|reason| ClientError::Address {
                addr: one.clone(),
                reason,
            })?;
        }
        let mut last = None;
        for one in &addrs {
            match Self::connect_one(one, &credentials).await {
                Ok((target, channel)) => {
                    let mut client = Self {
                        addrs: addrs.clone(),
                        addr: one.clone(),
                        inner: Self::grpc_client(&target, channel.clone()),
                        target,
                        channel,
                        producer: new_producer_id(),
                        sequence: 0,
                        retry_for: DEFAULT_RETRY_FOR,
                        credentials: credentials.clone(),
                    };
                    if addrs.len() > 1 {
                        // Best effort: a single node, or an older one, has no leader to find.
                        let _ = client.follow_leader().await;
                    }
                    return Ok(client);
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Address {
            addr: addr.to_owned(),
            reason: "no address".into(),
        }))
    }

    /// Sets how long calls that fail as `UNAVAILABLE` are retried (zero: never).
    #[must_use]
    pub fn retry_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// The address this client talks to now.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This client's producer id.
    pub fn producer_id(&self) -> u64 {
        self.producer
    }

    async fn connect_one(
        addr: &str,
        credentials: &Credentials,
    ) -> Result<(Target, Channel), ClientError> {
        let target = Target::parse(addr).map_err(|reason| ClientError::Address {
            addr: addr.to_owned(),
            reason,
        })?;
        let channel = Self::dial(addr, &target, credentials).await?;
        Ok((target, channel))
    }

    // A host that drops packets must not hang the caller for the OS's minutes.
    async fn dial(
        addr: &str,
        target: &Target,
        credentials: &Credentials,
    ) -> Result<Channel, ClientError> {
        Channel::connect(target, CONNECT_TIMEOUT, credentials)
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

    /// Talks to `addr` from now on.
    async fn switch_to(&mut self, addr: &str) -> Result<(), ClientError> {
        let (target, channel) = Self::connect_one(addr, &self.credentials).await?;
        self.inner = Self::grpc_client(&target, channel.clone());
        self.addr = addr.to_owned();
        self.target = target;
        self.channel = channel;
        Ok(())
    }

    /// Asks the node connected to for the cluster's servers, learns their
    /// addresses, and moves to the leader if another node leads.
    async fn follow_leader(&mut self) -> Result<(), ClientError> {
        let servers = self.servers().await?;
        for server in &servers {
            if !server.rpc_addr.is_empty() && !self.addrs.contains(&server.rpc_addr) {
                self.addrs.push(server.rpc_addr.clone());
            }
        }
        if let Some(leader) = servers.iter().find(|server| server.is_leader)
            && !leader.rpc_addr.is_empty()
            && leader.rpc_addr != self.addr
        {
            let leader = leader.rpc_addr.clone();
            self.switch_to(&leader).await?;
        }
        Ok(())
    }

    /// After a retriable failure: finds a node that answers, starting past the one
    /// that failed, and the leader through it.
    async fn recover(&mut self) {
        let at = self.addrs.iter().position(|a| *a == self.addr).unwrap_or(0);
        let candidates: Vec<String> = self
            .addrs
            .iter()
            .cycle()
            .skip(at + 1)
            .take(self.addrs.len())
            .cloned()
            .collect();
        for addr in candidates {
            if self.switch_to(&addr).await.is_ok() {
                // A node that knows no leader yet still takes (and forwards) calls.
                let _ = self.follow_leader().await;
                return;
            }
        }
    }

    /// The generated client, on a live connection: after the connection broke, this
    /// dials again.
    async fn ready(&mut self) -> Result<&mut LogClient<Channel>, ClientError> {
        if self.channel.is_closed() {
            let channel = Self::dial(&self.addr, &self.target, &self.credentials).await?;
            self.inner = Self::grpc_client(&self.target, channel.clone());
            self.channel = channel;
        }
        Ok(&mut self.inner)
    }

    /// A unary call on a live connection, retried elsewhere while the cluster
    /// cannot take it, up to the retry budget.
    async fn call<Req, Resp>(
        &mut self,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, ClientError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = FIRST_RETRY;
        loop {
            let result = match self.ready().await {
                Ok(_) => self
                    .channel
                    .unary(&self.target, path, request)
                    .await
                    .map_err(ClientError::from),
                Err(err) => Err(err),
            };
            match result {
                Err(err) if retriable(&err) && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(addr = self.addr, error = %err, "retrying on the cluster");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_WAIT);
                    self.recover().await;
                }
                other => return other,
            }
        }
    }

    /// The servers of the cluster (one for a single node), from the node connected to.
    ///
    /// # Errors
    ///
    /// The service's status (`UNIMPLEMENTED` from a service without the call).
    pub async fn servers(&mut self) -> Result<Vec<wire::Server>, ClientError> {
        self.ready().await?;
        let response: wire::GetServersResponse = self
            .channel
            .unary(
                &self.target,
                "/log.v1.Log/GetServers",
                &wire::GetServersRequest {},
            )
            .await?;
        Ok(response.servers)
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
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
            producer_id: self.producer,
            sequence: self.next_sequence(),
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
            producer_id: self.producer,
            sequence: self.next_sequence(),
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
        self.consume_with(topic, offset, false).await
    }

    /// Reads one record; with `linearizable`, from a node that has first applied
    /// every write acknowledged before the call (on a cluster; a single node
    /// always has).
    ///
    /// # Errors
    ///
    /// The service's status (`OUT_OF_RANGE` outside the topic's range).
    pub async fn consume_with(
        &mut self,
        topic: &str,
        offset: Offset,
        linearizable: bool,
    ) -> Result<Record, ClientError> {
        let request = wire::ConsumeRequest {
            offset,
            topic: topic.to_owned(),
            linearizable,
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
