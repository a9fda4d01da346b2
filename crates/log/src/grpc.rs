//! The gRPC service `log.v1.Log`.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{FuturesOrdered, StreamExt};
use keel_commitlog::Offset;
use keel_proto::log::v1 as wire;
use keel_proto::log::v1::log_server::Log;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::error::LogServiceError;
use crate::tail::{TailSpec, spawn_tail};
use crate::topics::Topics;
use keel_auth::{Action, Authorizer, Principal, Resource};
use keel_serve::tls::PeerPrincipal;

/// Produce requests one `ProduceStream` may have in flight (appended but not yet
/// answered) before it stops reading more.
const STREAM_IN_FLIGHT: usize = 1024;
/// Messages a streaming response buffers before its tail waits for the client.
const STREAM_BUFFER: usize = 64;

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The `log.v1.Log` service over a set of topics.
#[derive(Debug, Clone)]
pub struct LogGrpc {
    topics: Arc<Topics>,
    shutdown: CancellationToken,
    /// A single node's address, for `GetServers`.
    local_addr: Option<String>,
    /// Who may do what (everyone everything without an ACL).
    auth: Arc<Authorizer>,
}

impl LogGrpc {
    /// A service over `topics`; streams end when `shutdown` is cancelled.
    pub fn new(topics: Arc<Topics>, shutdown: CancellationToken) -> Self {
        Self {
            topics,
            shutdown,
            local_addr: None,
            auth: Authorizer::open_to_all(),
        }
    }

    /// Enforces `auth`'s ACL on every call.
    #[must_use]
    pub fn with_auth(mut self, auth: Arc<Authorizer>) -> Self {
        self.auth = auth;
        self
    }

    /// The caller of `request`, refused unless it may do `action` to `topic` (the
    /// default topic when empty).
    fn allow<T>(
        &self,
        request: &Request<T>,
        action: Action,
        topic: &str,
    ) -> Result<Principal, Status> {
        let topic = match topic {
            "" => self.topics.config().default_topic.as_str(),
            topic => topic,
        };
        let headers = request.metadata().clone().into_headers();
        let peer = request.extensions().get::<PeerPrincipal>();
        Ok(self
            .auth
            .check(&headers, peer, action, Resource::Topic(topic))
            .map_err(LogServiceError::from)?)
    }

    /// Names `addr` as a single node's address in `GetServers`.
    #[must_use]
    pub fn with_local_addr(mut self, addr: String) -> Self {
        self.local_addr = Some(addr);
        self
    }

    fn max_bytes(&self, asked: u32) -> usize {
        let default = self.topics.config().consume_max_bytes;
        match u64::from(asked) {
            0 => default as usize,
            asked => asked.min(self.topics.config().max_body_bytes) as usize,
        }
    }
}

pub(crate) fn to_wire(record: keel_commitlog::Record) -> wire::Record {
    wire::Record {
        value: record.value,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
    }
}

#[tonic::async_trait]
impl Log for LogGrpc {
    async fn produce(
        &self,
        request: Request<wire::ProduceRequest>,
    ) -> Result<Response<wire::ProduceResponse>, Status> {
        self.allow(&request, Action::Produce, &request.get_ref().topic)?;
        let request = request.into_inner();
        let record = request
            .record
            .ok_or_else(|| Status::invalid_argument("ProduceRequest.record is required"))?;
        let tag = tag(request.producer_id, request.sequence);
        let offsets = self
            .topics
            .append(&request.topic, vec![record.value], tag)
            .await?;
        Ok(Response::new(wire::ProduceResponse {
            offset: offsets.start,
        }))
    }

    async fn consume(
        &self,
        request: Request<wire::ConsumeRequest>,
    ) -> Result<Response<wire::ConsumeResponse>, Status> {
        self.allow(&request, Action::Consume, &request.get_ref().topic)?;
        let request = request.into_inner();
        if request.linearizable {
            self.topics.read_barrier().await?;
        }
        let topic = self.topics.get(&request.topic)?;
        let record = topic.read(request.offset).await?;
        Ok(Response::new(wire::ConsumeResponse {
            record: Some(to_wire(record)),
        }))
    }

    type ConsumeStreamStream = BoxStream<wire::ConsumeResponse>;

    async fn consume_stream(
        &self,
        request: Request<wire::ConsumeRequest>,
    ) -> Result<Response<Self::ConsumeStreamStream>, Status> {
        self.allow(&request, Action::Consume, &request.get_ref().topic)?;
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic)?;
        let spec = TailSpec {
            from: request.offset,
            max_bytes: self.max_bytes(0),
            follow: true,
        };
        let records = spawn_tail(topic, spec, self.shutdown.clone(), self.topics.read_ahead())
            .records()
            .map(|record| {
                Ok(wire::ConsumeResponse {
                    record: Some(to_wire(record?)),
                })
            });
        Ok(Response::new(Box::pin(records)))
    }

    type ProduceStreamStream = BoxStream<wire::ProduceResponse>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<wire::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        // Who streams is known now; each request's topic is judged as it comes.
        let headers = request.metadata().clone().into_headers();
        let peer = request.extensions().get::<PeerPrincipal>();
        let principal = self
            .auth
            .authenticate(&headers, peer)
            .map_err(LogServiceError::from)?;
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let caller = Caller {
            auth: Arc::clone(&self.auth),
            principal,
        };
        tokio::spawn(pipeline(Arc::clone(&self.topics), requests, tx, caller));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn produce_batch(
        &self,
        request: Request<wire::ProduceBatchRequest>,
    ) -> Result<Response<wire::ProduceBatchResponse>, Status> {
        self.allow(&request, Action::Produce, &request.get_ref().topic)?;
        let request = request.into_inner();
        let tag = tag(request.producer_id, request.sequence);
        let offsets = self
            .topics
            .append(&request.topic, request.values, tag)
            .await?;
        Ok(Response::new(wire::ProduceBatchResponse {
            first_offset: offsets.start,
            count: offsets.end - offsets.start,
        }))
    }

    type ConsumeBatchStreamStream = BoxStream<wire::ConsumeBatchResponse>;

    async fn consume_batch_stream(
        &self,
        request: Request<wire::ConsumeBatchRequest>,
    ) -> Result<Response<Self::ConsumeBatchStreamStream>, Status> {
        self.allow(&request, Action::Consume, &request.get_ref().topic)?;
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic)?;
        let spec = TailSpec {
            from: request.offset,
            max_bytes: self.max_bytes(request.max_bytes),
            follow: request.follow,
        };
        let batches =
            spawn_tail(topic, spec, self.shutdown.clone(), self.topics.read_ahead()).map(|chunk| {
                Ok(wire::ConsumeBatchResponse {
                    records: chunk?.into_iter().map(to_wire).collect(),
                })
            });
        Ok(Response::new(Box::pin(batches)))
    }

    async fn list_topics(
        &self,
        request: Request<wire::ListTopicsRequest>,
    ) -> Result<Response<wire::ListTopicsResponse>, Status> {
        // The names and sizes of every topic: consume on a pattern that matches `*`.
        self.allow(&request, Action::Consume, "*")?;
        let topics = self
            .topics
            .list()
            .into_iter()
            .map(|info| wire::TopicInfo {
                name: info.name,
                lowest_offset: info.lowest_offset,
                next_offset: info.next_offset,
                size_bytes: info.size_bytes,
                segments: info.segments as u32,
            })
            .collect();
        Ok(Response::new(wire::ListTopicsResponse { topics }))
    }

    async fn get_servers(
        &self,
        _request: Request<wire::GetServersRequest>,
    ) -> Result<Response<wire::GetServersResponse>, Status> {
        let servers = match self.topics.replication() {
            Some(replication) => {
                let metrics = replication.writer.raft().metrics().borrow().clone();
                metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(id, node)| wire::Server {
                        id: id.to_string(),
                        rpc_addr: node.addr.clone(),
                        is_leader: metrics.current_leader == Some(*id),
                    })
                    .collect()
            }
            None => vec![wire::Server {
                id: "1".into(),
                rpc_addr: self.local_addr.clone().unwrap_or_default(),
                is_leader: true,
            }],
        };
        Ok(Response::new(wire::GetServersResponse { servers }))
    }
}

/// An idempotent producer's tag, when the request carries one.
fn tag(producer_id: u64, sequence: u64) -> Option<crate::replica::ProducerSeq> {
    (producer_id != 0).then_some(crate::replica::ProducerSeq {
        producer: producer_id,
        sequence,
    })
}

/// Runs one `ProduceStream`: appends each request as it arrives (many may wait for
/// the same group commit) and answers them in order.
/// Who streams, to judge each request of a stream by.
struct Caller {
    auth: Arc<Authorizer>,
    principal: Principal,
}

async fn pipeline(
    topics: Arc<Topics>,
    mut requests: Streaming<wire::ProduceRequest>,
    tx: mpsc::Sender<Result<wire::ProduceResponse, Status>>,
    caller: Caller,
) {
    let mut in_flight = FuturesOrdered::new();
    let mut input_open = true;
    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let done: Result<Range<Offset>, LogServiceError> = done;
                let failed = done.is_err();
                let answer = done
                    .map(|offsets| wire::ProduceResponse { offset: offsets.start })
                    .map_err(Status::from);
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
            next = requests.message(), if input_open && in_flight.len() < STREAM_IN_FLIGHT => {
                match next {
                    Ok(Some(request)) => match submit(&topics, request, &caller).await {
                        Ok(offsets) => in_flight.push_back(offsets),
                        Err(err) => {
                            let _ = tx.send(Err(err.into())).await;
                            return;
                        }
                    },
                    Ok(None) => input_open = false,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
            else => return,
        }
    }
}

/// Queues one streamed record and returns the future of its offsets.
async fn submit(
    topics: &Topics,
    request: wire::ProduceRequest,
    caller: &Caller,
) -> Result<crate::topics::Acked, LogServiceError> {
    let topic = match request.topic.as_str() {
        "" => topics.config().default_topic.as_str(),
        topic => topic,
    };
    caller
        .auth
        .authorize(&caller.principal, Action::Produce, Resource::Topic(topic))?;
    let record = request
        .record
        .ok_or_else(|| LogServiceError::BadRequest("ProduceRequest.record is required".into()))?;
    let tag = tag(request.producer_id, request.sequence);
    topics.submit(&request.topic, vec![record.value], tag).await
}
