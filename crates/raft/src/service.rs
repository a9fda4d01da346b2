//! The server side of Raft between nodes: `keel.raft.v1.Raft`, which hands each
//! message to the local openraft node. Snapshots arrive into an `incoming-`
//! directory, chunk by checksummed chunk, and are installed once complete; an
//! interrupted transfer keeps what arrived, and the leader resumes from there.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use keel_proto::raft::v1 as pb;
use openraft::storage::Snapshot;
use tonic::{Request, Response, Status, Streaming};

use crate::snapshot::{Snapshots, checked_name};
use crate::{Manifest, Raft, SnapshotFiles, Vote, wire};

/// `keel.raft.v1.Raft` for one node; add it to the node's gRPC server with
/// [`RaftService::into_server`].
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    snapshots: PathBuf,
    damage: Option<crate::DamageMark>,
    /// Set when the node stops serving: forwarding streams end.
    ending: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    /// Held by a snapshot transfer from its header until it is installed. A leader
    /// restarts replication when membership changes, so the same snapshot may come
    /// twice at once; the second must not write into (or install from) the
    /// directory the first is installing.
    installing: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Who may call: every call is refused unless it admits it.
    guard: Option<RaftGuard>,
}

/// Admits a call to this service, or refuses it with its status: given the call's
/// metadata and its request extensions (where a verified client certificate's
/// principal is, on a TLS listener).
pub type RaftGuard = std::sync::Arc<
    dyn Fn(&tonic::metadata::MetadataMap, &tonic::Extensions) -> Result<(), Status> + Send + Sync,
>;

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("snapshots", &self.snapshots)
            .finish_non_exhaustive()
    }
}

const MANIFEST: &str = "manifest.json";

/// How long a received snapshot may take to be applied before its transfer is
/// answered as failed (the leader sends it again).
const INSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Replies to forwarded commands that may wait to be sent back.
const FORWARD_REPLIES: usize = 1024;

impl RaftService {
    /// The service of `raft`, whose snapshots live in `snapshots`.
    pub fn new(raft: Raft, snapshots: &Path) -> Self {
        Self {
            raft,
            snapshots: snapshots.to_path_buf(),
            damage: None,
            ending: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
            installing: std::sync::Arc::default(),
            guard: None,
        }
    }

    /// Admits only the calls `guard` admits (node-to-node traffic and cluster
    /// administration alike).
    #[must_use]
    pub fn with_guard(mut self, guard: RaftGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match &self.guard {
            Some(guard) => guard(request.metadata(), request.extensions()),
            None => Ok(()),
        }
    }

    /// Ends the forwarding streams other nodes hold open to this one (each once
    /// the commands it took are answered), so that a server stopping gracefully is
    /// not kept open by them; the other nodes forward to the next leader. Call it
    /// (on any clone) when the node stops serving.
    pub fn end_streams(&self) {
        self.ending.send_replace(true);
    }

    /// Refuses votes while `damage` is set.
    #[must_use]
    pub fn with_damage(mut self, damage: crate::DamageMark) -> Self {
        self.damage = Some(damage);
        self
    }

    fn damaged(&self) -> bool {
        self.damage.as_ref().is_some_and(crate::DamageMark::is_set)
    }

    /// As a tonic service, taking messages of any size (entries carry batches).
    pub fn into_server(self) -> pb::raft_server::RaftServer<Self> {
        pb::raft_server::RaftServer::new(self)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn snapshots(&self) -> Result<Snapshots, Status> {
        Snapshots::open(&self.snapshots).map_err(|err| Status::internal(err.to_string()))
    }

    /// The manifest of an earlier transfer of a snapshot into `incoming`, if one began.
    fn earlier(incoming: &SnapshotFiles) -> Option<Manifest> {
        fs::read(incoming.dir.join(MANIFEST))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<pb::JsonMessage, Status> {
    serde_json::to_vec(value)
        .map(|json| pb::JsonMessage {
            json: Bytes::from(json),
        })
        .map_err(|err| Status::internal(err.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|err| Status::invalid_argument(format!("{what} does not parse: {err}")))
}

/// The guard of a cluster node's Raft service: with TLS (`need_certificate`), a
/// call must come with a verified client certificate, as other nodes present
/// theirs; with an ACL, its principal (or token) must be allowed `admin` on the
/// cluster. Node-to-node traffic and `keel cluster` commands alike.
pub fn cluster_guard(auth: Arc<keel_auth::Authorizer>, need_certificate: bool) -> RaftGuard {
    Arc::new(move |metadata, extensions| {
        let peer = extensions.get::<keel_serve::tls::PeerPrincipal>();
        if need_certificate && peer.is_none() {
            return Err(Status::unauthenticated(
                "this cluster runs mutual TLS: a node (or an admin) calls with a client certificate of the cluster's CA",
            ));
        }
        if !auth.enforcing() {
            return Ok(());
        }
        let headers = metadata.clone().into_headers();
        auth.check(
            &headers,
            peer,
            keel_auth::Action::Admin,
            keel_auth::Resource::Cluster,
        )
        .map(drop)
        .map_err(|denied| match denied {
            keel_auth::Denied::Unauthenticated(why) => Status::unauthenticated(why),
            keel_auth::Denied::Forbidden(why) => Status::permission_denied(why),
        })
    })
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    type ForwardStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ForwardReply, Status>>;

    async fn forward(
        &self,
        request: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        self.admit(&request)?;
        let mut requests = request.into_inner();
        let (replies, stream) = tokio::sync::mpsc::channel(FORWARD_REPLIES);
        let raft = self.raft.clone();
        let mut ending = self.ending.subscribe();
        tokio::spawn(async move {
            // Proposed in the order read; answered as each is applied.
            loop {
                let request = tokio::select! {
                    message = requests.message() => match message {
                        Ok(Some(request)) => request,
                        Ok(None) | Err(_) => break,
                    },
                    _ = ending.wait_for(|ending| *ending) => break,
                };
                let id = request.id;
                let proposed = raft.client_write_ff(crate::Command(request.command)).await;
                let replies = replies.clone();
                match proposed {
                    Ok(receiver) => {
                        tokio::spawn(async move {
                            let result = match crate::writer::written(receiver.await) {
                                Ok(reply) => pb::forward_reply::Result::Reply(reply.0),
                                Err(err) => pb::forward_reply::Result::Error(pb::ForwardError {
                                    not_leader: false,
                                    message: err.to_string(),
                                }),
                            };
                            let _ = replies
                                .send(Ok(pb::ForwardReply {
                                    id,
                                    result: Some(result),
                                }))
                                .await;
                        });
                    }
                    Err(fatal) => {
                        let _ = replies
                            .send(Err(Status::unavailable(fatal.to_string())))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            stream,
        )))
    }

    async fn read_index(
        &self,
        request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        self.admit(&request)?;
        if self.raft.metrics().borrow().state != openraft::ServerState::Leader {
            return Err(Status::failed_precondition("not the leader"));
        }
        crate::writer::read_index(&self.raft)
            .await
            .map(|index| Response::new(pb::ReadIndexResponse { index }))
            .map_err(|err| Status::unavailable(err.to_string()))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        crate::cluster::add_node(&self.raft, request.node_id, &request.addr, request.learner)
            .await?;
        Ok(Response::new(crate::cluster::status(
            &self.raft,
            self.damaged(),
        )))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.admit(&request)?;
        crate::cluster::remove_node(&self.raft, request.into_inner().node_id).await?;
        Ok(Response::new(crate::cluster::status(
            &self.raft,
            self.damaged(),
        )))
    }

    async fn status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.admit(&request)?;
        Ok(Response::new(crate::cluster::status(
            &self.raft,
            self.damaged(),
        )))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        self.admit(&request)?;
        let rpc = wire::append_request_from(request.into_inner())
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let response = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        Ok(Response::new(wire::append_response_to(&response)))
    }

    async fn vote(
        &self,
        request: Request<pb::JsonMessage>,
    ) -> Result<Response<pb::JsonMessage>, Status> {
        self.admit(&request)?;
        if self.damaged() {
            return Err(Status::unavailable(
                "this node's replica was damaged and may miss entries: it votes again once it has caught up with the leader",
            ));
        }
        let rpc = parse(&request.into_inner().json, "the vote request")?;
        let response = self
            .raft
            .vote(rpc)
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        json(&response).map(Response::new)
    }

    async fn snapshot_status(
        &self,
        request: Request<pb::SnapshotStatusRequest>,
    ) -> Result<Response<pb::SnapshotStatusResponse>, Status> {
        self.admit(&request)?;
        let incoming = self
            .snapshots()?
            .incoming_dir(&request.into_inner().snapshot_id);
        let received = Self::earlier(&incoming)
            .map(|manifest| {
                manifest
                    .files
                    .iter()
                    .map(|file| {
                        fs::metadata(incoming.data_path(&file.name))
                            .map_or(0, |meta| meta.len().min(file.len))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::SnapshotStatusResponse { received }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::JsonMessage>, Status> {
        self.admit(&request)?;
        let mut stream = request.into_inner();
        let Some(pb::SnapshotChunk {
            part: Some(pb::snapshot_chunk::Part::Header(header)),
        }) = stream.message().await?
        else {
            return Err(Status::invalid_argument(
                "a snapshot transfer must start with its header",
            ));
        };
        let vote: Vote = parse(&header.vote_json, "the vote")?;
        let manifest: Manifest = parse(&header.manifest_json, "the manifest")?;
        if header.state.len() as u64 != manifest.state_len {
            return Err(Status::invalid_argument(
                "the state summary is not as long as the manifest says",
            ));
        }
        // Owned: it moves into the task that installs, and lives as long as it does.
        let installing = std::sync::Arc::clone(&self.installing).lock_owned().await;
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.last_applied >= manifest.meta.last_log_id {
            // Already applied (an earlier transfer of it, or the entries it covers).
            return json(&openraft::raft::SnapshotResponse { vote: metrics.vote })
                .map(Response::new);
        }
        let mut incoming = self
            .snapshots()?
            .incoming(&manifest.meta.snapshot_id)
            .map_err(|err| Status::internal(err.to_string()))?;
        let earlier = Self::earlier(&incoming);
        let mut receiving = Receiving::start(&incoming, &manifest, earlier.as_ref(), &header.state)
            .map_err(|err| Status::internal(err.to_string()))?;
        let mut done = false;
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(pb::snapshot_chunk::Part::Data(data)) => receiving.write(&data)?,
                Some(pb::snapshot_chunk::Part::Done(_)) => {
                    done = true;
                    break;
                }
                _ => return Err(Status::invalid_argument("a second snapshot header")),
            }
        }
        if !done {
            return Err(Status::aborted(
                "the snapshot transfer ended before it was complete; what arrived is kept",
            ));
        }
        receiving.check_complete()?;
        incoming.manifest = Some(manifest.clone());
        // openraft answers once the install is queued; the files move when the state
        // machine takes it. Until then another transfer must not write into the
        // same `incoming-` directory, so the lock is held until it is applied: in a
        // task of its own, so that a leader that gives up on this call (and drops it)
        // does not release the lock while the install is still queued.
        let raft = self.raft.clone();
        let installed = tokio::spawn(async move {
            let last = manifest.meta.last_log_id;
            let response = raft
                .install_full_snapshot(
                    vote,
                    Snapshot {
                        meta: manifest.meta.clone(),
                        snapshot: Box::new(incoming),
                    },
                )
                .await
                .map_err(|err| Status::unavailable(err.to_string()))?;
            let applied = raft
                .wait(Some(INSTALL_WAIT))
                .metrics(
                    |m| m.last_applied >= last || m.running_state.is_err(),
                    "the snapshot applied",
                )
                .await;
            drop(installing);
            if let Err(err) = applied {
                return Err(Status::unavailable(format!(
                    "the snapshot was not applied within {INSTALL_WAIT:?}: {err}"
                )));
            }
            Ok(response)
        });
        let response = installed
            .await
            .map_err(|err| Status::internal(format!("installing the snapshot: {err}")))??;
        json(&response).map(Response::new)
    }
}

/// A snapshot being written into its `incoming-` directory.
struct Receiving<'a> {
    manifest: &'a Manifest,
    paths: Vec<PathBuf>,
    /// Each file, opened at its first chunk, with the bytes it holds.
    files: Vec<Option<(fs::File, u64)>>,
}

impl<'a> Receiving<'a> {
    /// Prepares the directory: what an earlier transfer of the same snapshot left is
    /// kept, anything else is cleared.
    fn start(
        incoming: &SnapshotFiles,
        manifest: &'a Manifest,
        earlier: Option<&Manifest>,
        state: &[u8],
    ) -> Result<Self, crate::RaftStoreError> {
        use crate::error::AtPath;
        if earlier != Some(manifest) {
            let data = incoming.data_dir();
            fs::remove_dir_all(&data).at(&data)?;
            fs::create_dir_all(&data).at(&data)?;
        }
        let mut paths = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            checked_name(&file.name, &incoming.dir)?;
            let path = incoming.data_path(&file.name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            paths.push(path);
        }
        crate::meta::write_durably(&incoming.dir.join("state"), state)?;
        let bytes =
            serde_json::to_vec_pretty(manifest).map_err(|err| crate::RaftStoreError::Invalid {
                path: incoming.dir.join(MANIFEST),
                reason: err.to_string(),
            })?;
        crate::meta::write_durably(&incoming.dir.join(MANIFEST), &bytes)?;
        Ok(Self {
            manifest,
            files: paths.iter().map(|_| None).collect(),
            paths,
        })
    }

    fn write(&mut self, chunk: &pb::FileChunk) -> Result<(), Status> {
        let index = chunk.file as usize;
        let (Some(file), Some(path)) = (self.manifest.files.get(index), self.paths.get(index))
        else {
            return Err(Status::invalid_argument(format!(
                "a chunk of file {index}, which the manifest does not list"
            )));
        };
        if crc32c::crc32c(&chunk.data) != chunk.crc32c {
            return Err(Status::data_loss(format!(
                "a chunk of {} at {} fails its checksum",
                file.name, chunk.offset
            )));
        }
        let end = chunk.offset + chunk.data.len() as u64;
        if end > file.len {
            return Err(Status::invalid_argument(format!(
                "a chunk of {} ends at {end}, past its length {}",
                file.name, file.len
            )));
        }
        let failed = |err: std::io::Error| Status::internal(format!("{}: {err}", path.display()));
        let (handle, have) = match &mut self.files[index] {
            Some(open) => open,
            slot @ None => {
                let handle = fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(path)
                    .map_err(failed)?;
                let have = handle.metadata().map_err(failed)?.len();
                slot.insert((handle, have))
            }
        };
        if chunk.offset > *have {
            return Err(Status::invalid_argument(format!(
                "a chunk of {} at {}, past the {have} bytes received",
                file.name, chunk.offset
            )));
        }
        handle
            .write_all_at(&chunk.data, chunk.offset)
            .map_err(failed)?;
        *have = (*have).max(end);
        if end == file.len {
            handle.sync_all().map_err(failed)?;
        }
        Ok(())
    }

    fn check_complete(&self) -> Result<(), Status> {
        for (file, path) in self.manifest.files.iter().zip(&self.paths) {
            let have = fs::metadata(path).map_or(0, |meta| meta.len());
            if have != file.len {
                return Err(Status::data_loss(format!(
                    "{} arrived with {have} of its {} bytes",
                    file.name, file.len
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(guard: &RaftGuard, peer: Option<&str>, token: Option<&str>) -> Result<(), tonic::Code> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(token) = token {
            metadata.insert(
                "authorization",
                format!("Bearer {token}").parse().expect("a value"),
            );
        }
        let mut extensions = tonic::Extensions::new();
        if let Some(peer) = peer {
            extensions.insert(keel_serve::tls::PeerPrincipal(Arc::from(peer)));
        }
        guard(&metadata, &extensions).map_err(|status| status.code())
    }

    #[test]
    fn with_mutual_tls_a_call_without_a_certificate_should_be_refused() {
        let guard = cluster_guard(keel_auth::Authorizer::open_to_all(), true);
        assert_eq!(call(&guard, None, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            call(&guard, None, Some("a-token")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&guard, Some("keel-2"), None), Ok(()));
        let open = cluster_guard(keel_auth::Authorizer::open_to_all(), false);
        assert_eq!(call(&open, None, None), Ok(()));
    }

    #[test]
    fn with_an_acl_only_cluster_admins_should_pass() {
        let dir = tempfile::tempdir().expect("a dir");
        let acl = dir.path().join("acl.toml");
        std::fs::write(
            &acl,
            "[[allow]]\nprincipals = [\"keel-*\"]\ncluster = true\nactions = [\"admin\"]\n",
        )
        .expect("written");
        let auth = keel_auth::Authorizer::from_file(&acl).expect("an ACL");
        let guard = cluster_guard(auth, true);
        assert_eq!(call(&guard, Some("keel-3"), None), Ok(()));
        assert_eq!(
            call(&guard, Some("client"), None),
            Err(tonic::Code::PermissionDenied)
        );
    }
}
