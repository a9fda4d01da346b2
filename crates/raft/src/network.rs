//! The client side of Raft between nodes: openraft's `RaftNetwork` over gRPC
//! (`keel.raft.v1.Raft`), with snapshots streamed file by file in checksummed
//! chunks, resumed where an interrupted transfer stopped.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use keel_proto::raft::v1 as pb;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use pb::raft_client::RaftClient;
use tonic::transport::Channel;

use crate::{Node, NodeId, TypeConfig, Vote, wire};

/// The bytes of snapshot files one chunk carries.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Makes a [`Network`] to each node the leader replicates to.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Mutual TLS to the other nodes, when the cluster runs TLS.
    pub tls: Option<crate::peer::PeerTls>,
}

impl Default for NetworkFactory {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            tls: None,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        Network {
            target,
            addr: node.addr.clone(),
            connect_timeout: self.connect_timeout,
            tls: self.tls.clone(),
            client: None,
        }
    }
}

/// The connection to one node.
#[derive(Debug)]
pub struct Network {
    target: NodeId,
    addr: String,
    connect_timeout: Duration,
    tls: Option<crate::peer::PeerTls>,
    client: Option<RaftClient<Channel>>,
}

/// Why a call to another node failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("node {target} at {addr}: {message}")]
    Failed {
        target: NodeId,
        addr: String,
        message: String,
    },
    /// No connection could be made: the node is down or cut off. Openraft waits
    /// [`Network::backoff`] before it tries again, rather than at once.
    #[error("node {target} at {addr} is unreachable: {message}")]
    Unreachable {
        target: NodeId,
        addr: String,
        message: String,
    },
}

/// How long the leader waits between attempts to reach a node that does not
/// answer: a little more each time, up to half a second (a restarted node is
/// caught up within that of coming back).
fn unreachable_backoff() -> impl Iterator<Item = Duration> + Send + 'static {
    [25, 50, 100, 200]
        .into_iter()
        .map(Duration::from_millis)
        .chain(std::iter::repeat(Duration::from_millis(500)))
}

impl Network {
    fn fail(&self, message: impl std::fmt::Display) -> CallError {
        CallError::Failed {
            target: self.target,
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }

    fn client(&mut self) -> Result<RaftClient<Channel>, CallError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let endpoint = crate::peer::endpoint(&self.addr, self.tls.as_ref())
            .map_err(|err| self.fail(format!("not an address: {err}")))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Runs one call under a deadline; a transport failure drops the connection so
    /// the next call makes a new one.
    async fn call<T>(
        &mut self,
        ttl: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(ttl, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => {
                if status.code() == tonic::Code::Unavailable
                    || status.code() == tonic::Code::Unknown
                {
                    self.client = None;
                }
                let message = format!("{}: {}", status.code(), status.message());
                // The transport's own failure (no connection) carries its cause; a
                // node's refusal does not.
                if status.code() == tonic::Code::Unavailable
                    && std::error::Error::source(&status).is_some()
                {
                    return Err(CallError::Unreachable {
                        target: self.target,
                        addr: self.addr.clone(),
                        message,
                    });
                }
                Err(self.fail(message))
            }
            Err(_) => Err(self.fail(format!("no answer within {ttl:?}"))),
        }
    }
}

fn rpc_error<E: std::error::Error>(err: &CallError) -> RPCError<NodeId, Node, E> {
    match err {
        CallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(err)),
        CallError::Failed { .. } => RPCError::Network(NetworkError::new(err)),
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let request = wire::append_request_to(&rpc)
            .map_err(|err| RPCError::Network(NetworkError::new(&err)))?;
        let mut client = self
            .client()
            .map_err(|err| RPCError::Unreachable(Unreachable::new(&err)))?;
        let response = self
            .call(option.hard_ttl(), client.append_entries(request))
            .await
            .map_err(|err| rpc_error(&err))?;
        wire::append_response_from(&response)
            .ok_or_else(|| rpc_error(&self.fail("an append response without a result")))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let json = serde_json::to_vec(&rpc).map_err(|err| rpc_error(&self.fail(err)))?;
        let mut client = self
            .client()
            .map_err(|err| RPCError::Unreachable(Unreachable::new(&err)))?;
        let response = self
            .call(
                option.hard_ttl(),
                client.vote(pb::JsonMessage {
                    json: Bytes::from(json),
                }),
            )
            .await
            .map_err(|err| rpc_error(&err))?;
        serde_json::from_slice(&response.json).map_err(|err| rpc_error(&self.fail(err)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot, option) => {
                sent.map_err(|err| match err {
                    CallError::Unreachable { .. } => {
                        StreamingError::Unreachable(Unreachable::new(&err))
                    }
                    CallError::Failed { .. } => StreamingError::Network(NetworkError::new(&err)),
                })
            }
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(unreachable_backoff())
    }
}

impl Network {
    async fn send_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, CallError> {
        let files = *snapshot.snapshot;
        let manifest = files
            .manifest
            .clone()
            .ok_or_else(|| self.fail("the snapshot to send has no manifest"))?;
        let state = files.state().map_err(|err| self.fail(err))?;
        let mut client = self.client()?;
        let status = self
            .call(
                option.hard_ttl(),
                client.snapshot_status(pb::SnapshotStatusRequest {
                    snapshot_id: manifest.meta.snapshot_id.clone(),
                }),
            )
            .await?;
        let resume_from: Vec<u64> = if status.received.len() == manifest.files.len() {
            status.received
        } else {
            vec![0; manifest.files.len()]
        };
        let resumed: u64 = resume_from.iter().sum();
        let total: u64 = manifest.files.iter().map(|f| f.len).sum();
        tracing::info!(
            target_node = self.target,
            snapshot = manifest.meta.snapshot_id,
            bytes = total,
            resumed,
            "sending a snapshot"
        );
        let header = pb::SnapshotChunk {
            part: Some(pb::snapshot_chunk::Part::Header(pb::SnapshotHeader {
                vote_json: Bytes::from(serde_json::to_vec(&vote).map_err(|err| self.fail(err))?),
                manifest_json: Bytes::from(
                    serde_json::to_vec(&manifest).map_err(|err| self.fail(err))?,
                ),
                state: Bytes::from(state),
            })),
        };
        let (chunks, receiver) = tokio::sync::mpsc::channel::<pb::SnapshotChunk>(4);
        let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
            if chunks.blocking_send(header).is_err() {
                return Ok(());
            }
            for (i, file) in manifest.files.iter().enumerate() {
                let mut at = resume_from[i].min(file.len);
                let mut reader = files.open_at(file, at).map_err(|err| err.to_string())?;
                while at < file.len {
                    let mut buf = vec![0; SNAPSHOT_CHUNK_BYTES.min((file.len - at) as usize)];
                    std::io::Read::read_exact(&mut reader, &mut buf).map_err(|err| {
                        format!("{} at {at}: {err}", files.data_path(&file.name).display())
                    })?;
                    let n = buf.len();
                    let chunk = pb::FileChunk {
                        file: i as u32,
                        offset: at,
                        crc32c: crc32c::crc32c(&buf),
                        data: Bytes::from(buf),
                    };
                    at += n as u64;
                    let part = pb::snapshot_chunk::Part::Data(chunk);
                    if chunks
                        .blocking_send(pb::SnapshotChunk { part: Some(part) })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
            let _ = chunks.blocking_send(pb::SnapshotChunk {
                part: Some(pb::snapshot_chunk::Part::Done(true)),
            });
            Ok(())
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        // The transfer may take long; the deadline is per snapshot, set by the
        // node's install_snapshot_timeout.
        let response = self
            .call(option.hard_ttl(), client.install_snapshot(stream))
            .await;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(self.fail(format!("reading the snapshot: {err}"))),
            Err(err) => return Err(self.fail(format!("reading the snapshot: {err}"))),
        }
        let response = response?;
        serde_json::from_slice(&response.json).map_err(|err| self.fail(err))
    }
}
