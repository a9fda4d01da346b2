//! Writing through Raft from any node, and reads that see every acknowledged write.
//!
//! ```text
//!  submit(command) ─┬─ this node leads ──> client_write_ff ──> applied ──> reply
//!                   └─ another node leads ──> one Forward stream to it, in order
//!                                              └─> leader: client_write_ff, in order
//! ```
//!
//! [`Writer::submit`] hands a command on before it returns, so commands submitted one
//! after another from one task reach the Raft log in that order (on one leader), and
//! their replies can be awaited together: a follower forwards over one stream per
//! leader, which the leader proposes from in the order it reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keel_proto::raft::v1 as pb;
use openraft::error::{ClientWriteError, RaftError};
use pb::raft_client::RaftClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::{Command, NodeId, Raft, Reply};

/// Why a write or a read barrier did not complete. Every kind but [`WriteError::Stopped`]
/// is worth retrying, on this node or another; the outcome of a write that failed
/// with [`WriteError::Unavailable`] is unknown (it may yet be committed), which is
/// what idempotent producers are for.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader is known: an election is under way, or this node is cut off from a
    /// majority.
    #[error("no leader: {0}")]
    NoLeader(String),
    /// The leader could not be reached, or lost its leadership before the command
    /// was committed.
    #[error("{0}")]
    Unavailable(String),
    /// This node's Raft has stopped (it is shutting down, or its storage failed).
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// The command never reached the leader (no connection to it could be made),
    /// so it was not written: a writer submits it again to the next leader itself.
    #[error("the leader could not be reached: {0}")]
    Undelivered(String),
}

/// Where openraft answers a command proposed on this node.
type Answer = <openraft::impls::OneshotResponder<crate::TypeConfig> as openraft::raft::responder::Responder<crate::TypeConfig>>::Receiver;

/// A submitted command's reply, to await: it makes progress only while polled
/// (no task of its own), so a caller awaiting many polls them together.
pub type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, WriteError>> + Send>>;

/// Submits commands on a node, leader or not; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    id: NodeId,
    /// How long a submit waits for a leader to be known.
    leader_wait: Duration,
    /// The stream to the current leader, while this node forwards.
    forward: Mutex<Option<Forwarder>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Mutual TLS to the leader, when the cluster runs TLS.
    tls: Option<crate::peer::PeerTls>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// Where a command goes.
enum Route {
    Here,
    Leader(NodeId, String),
}

impl Writer {
    /// A writer for node `id`; a submit waits up to `leader_wait` for a leader to be
    /// known before it fails with [`WriteError::NoLeader`].
    pub fn new(raft: Raft, id: NodeId, leader_wait: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                raft,
                id,
                leader_wait,
                forward: Mutex::new(None),
                channels: Mutex::new(HashMap::new()),
                tls: None,
            }),
        }
    }

    /// The same writer, reaching the leader over mutual TLS with `tls` (call before
    /// cloning it).
    #[must_use]
    pub fn with_tls(mut self, tls: Option<crate::peer::PeerTls>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.tls = tls,
            None => tracing::error!("Writer::with_tls on a writer already cloned; ignored"),
        }
        self
    }

    /// The Raft node.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Hands `command` to the leader (this node or another) and returns where its
    /// reply will arrive. Commands submitted one after another reach the leader's
    /// log in that order.
    ///
    /// # Errors
    ///
    /// No leader became known within the wait; this node's Raft has stopped.
    pub async fn submit(&self, command: Command) -> Result<Pending, WriteError> {
        match self.route().await? {
            Route::Here => {
                let receiver = self.propose(command).await?;
                Ok(Box::pin(async move { written(receiver.await) }))
            }
            Route::Leader(leader, addr) => {
                let (forwarded, answer) = oneshot::channel();
                self.forward(leader, addr, command.clone(), forwarded);
                let this = self.clone();
                Ok(Box::pin(async move {
                    match answer.await {
                        Ok(Err(WriteError::Undelivered(why))) => {
                            this.submit_past(leader, command, why).await
                        }
                        Ok(result) => result,
                        Err(_) => Err(WriteError::Unavailable("the write was dropped".into())),
                    }
                }))
            }
        }
    }

    /// Submits again a command that could not be delivered to `failed`, once another
    /// node leads (or, at the end of the leader wait, to `failed` once more).
    async fn submit_past(
        &self,
        failed: NodeId,
        command: Command,
        why: String,
    ) -> Result<Reply, WriteError> {
        let mut metrics = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + self.inner.leader_wait;
        loop {
            let leader = metrics.borrow_and_update().current_leader;
            if leader.is_some_and(|leader| leader != failed) {
                break;
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(WriteError::Stopped("raft has shut down".into())),
                Err(_) => break,
            }
        }
        let (reply, pending) = oneshot::channel();
        match self.route().await? {
            Route::Here => return written(self.propose(command).await?.await),
            Route::Leader(leader, addr) => self.forward(leader, addr, command, reply),
        }
        match pending.await {
            Ok(Err(WriteError::Undelivered(again))) => Err(WriteError::Unavailable(format!(
                "the leader could not be reached ({why}), nor the next ({again})"
            ))),
            Ok(result) => result,
            Err(_) => Err(WriteError::Unavailable("the write was dropped".into())),
        }
    }

    /// Proposes `command` on this node, which leads; returns where openraft answers.
    async fn propose(&self, command: Command) -> Result<Answer, WriteError> {
        self.inner
            .raft
            .client_write_ff(command)
            .await
            .map_err(|err| WriteError::Stopped(err.to_string()))
    }

    /// Waits until this node has applied everything the leader had committed when
    /// it asked, asking again (with a short timeout: an election may be under way)
    /// until it has; applying may take long (a snapshot to receive).
    ///
    /// # Errors
    ///
    /// Only [`WriteError::Stopped`]: this node's Raft stopped first.
    pub async fn catch_up(&self) -> Result<(), WriteError> {
        loop {
            let caught_up = match self.read_index(Duration::from_secs(2)).await {
                Ok(index) => self.wait_applied(index, Duration::from_secs(3600)).await,
                Err(err) => Err(err),
            };
            match caught_up {
                Ok(()) => return Ok(()),
                Err(err @ WriteError::Stopped(_)) => return Err(err),
                Err(err) => {
                    tracing::debug!(error = %err, "not caught up yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Submits `command` and waits for its reply.
    ///
    /// # Errors
    ///
    /// As [`Writer::submit`], and the command's own failure.
    pub async fn write(&self, command: Command) -> Result<Reply, WriteError> {
        self.submit(command).await?.await
    }

    /// Waits until this node has applied every write acknowledged (by any node)
    /// before the call: the leader confirms with a quorum that it still leads and
    /// names its commit index (ReadIndex), and this node waits to apply that far.
    ///
    /// # Errors
    ///
    /// No leader, or the leader could not confirm its leadership, or this node did
    /// not catch up within `timeout`.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), WriteError> {
        let index = self.read_index(timeout).await?;
        self.wait_applied(index, timeout).await
    }

    /// The index every write acknowledged before the call is at or below, from the
    /// leader, once it has confirmed with a quorum that it still leads (ReadIndex).
    ///
    /// # Errors
    ///
    /// No leader, or the leader could not confirm its leadership within `timeout`.
    pub async fn read_index(&self, timeout: Duration) -> Result<u64, WriteError> {
        let index = match self.route().await? {
            Route::Here => read_index(&self.inner.raft).await?,
            Route::Leader(_, addr) => {
                let mut client = RaftClient::new(self.channel(&addr)?);
                let call = client.read_index(pb::ReadIndexRequest {});
                match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(response)) => response.into_inner().index,
                    Ok(Err(status)) => {
                        return Err(WriteError::Unavailable(format!(
                            "the leader at {addr}: {}",
                            status.message()
                        )));
                    }
                    Err(_) => {
                        return Err(WriteError::Unavailable(format!(
                            "the leader at {addr} did not answer within {timeout:?}"
                        )));
                    }
                }
            }
        };
        Ok(index)
    }

    /// Waits until this node has applied the entry at `index`.
    ///
    /// # Errors
    ///
    /// It did not within `timeout`; Raft stopped.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), WriteError> {
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(drop)
            .map_err(|err| WriteError::Unavailable(format!("catching up to index {index}: {err}")))
    }

    /// Where commands go now; waits up to the leader wait for a leader.
    async fn route(&self) -> Result<Route, WriteError> {
        let mut metrics = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + self.inner.leader_wait;
        loop {
            {
                let now = metrics.borrow_and_update();
                if let Err(fatal) = &now.running_state {
                    return Err(WriteError::Stopped(fatal.to_string()));
                }
                match now.current_leader {
                    Some(leader) if leader == self.inner.id => return Ok(Route::Here),
                    Some(leader) => {
                        let addr = now
                            .membership_config
                            .membership()
                            .get_node(&leader)
                            .map(|node| node.addr.clone());
                        if let Some(addr) = addr {
                            return Ok(Route::Leader(leader, addr));
                        }
                    }
                    None => {}
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(WriteError::Stopped("raft has shut down".into())),
                Err(_) => {
                    return Err(WriteError::NoLeader(format!(
                        "node {} knows no leader after {:?}",
                        self.inner.id, self.inner.leader_wait
                    )));
                }
            }
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, WriteError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = crate::peer::endpoint(addr, self.inner.tls.as_ref())
            .map_err(|err| WriteError::Unavailable(format!("leader address {addr}: {err}")))?
            .connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Sends `command` down the stream to `leader`, opening one if none is open to it.
    fn forward(
        &self,
        leader: NodeId,
        addr: String,
        command: Command,
        reply: oneshot::Sender<Result<Reply, WriteError>>,
    ) {
        let mut forward = self
            .inner
            .forward
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = forward.as_ref().is_some_and(|f| {
            f.leader == leader && f.addr == addr && f.alive.load(Ordering::Acquire)
        });
        if !current {
            // The old stream, if any, ends once its leader has answered what it holds.
            *forward = match self.channel(&addr) {
                Ok(channel) => Some(Forwarder::open(
                    leader,
                    addr,
                    channel,
                    self.inner.raft.metrics(),
                )),
                Err(err) => {
                    let _ = reply.send(Err(err));
                    return;
                }
            };
        }
        if let Some(forwarder) = forward.as_ref() {
            forwarder.send(command, reply);
        }
    }
}

/// The reply of a command proposed on this node.
pub(crate) fn written(
    result: Result<
        Result<
            openraft::raft::ClientWriteResponse<crate::TypeConfig>,
            ClientWriteError<NodeId, crate::Node>,
        >,
        impl std::fmt::Display,
    >,
) -> Result<Reply, WriteError> {
    match result {
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(ClientWriteError::ForwardToLeader(to))) => Err(WriteError::Unavailable(format!(
            "leadership moved before the write was committed (now: {})",
            to.leader_id
                .map_or_else(|| "unknown".to_owned(), |id| format!("node {id}"))
        ))),
        Ok(Err(other)) => Err(WriteError::Unavailable(other.to_string())),
        Err(dropped) => Err(WriteError::Stopped(format!(
            "the write was dropped: {dropped}"
        ))),
    }
}

/// On the leader: the index reads must wait for, once a quorum confirmed leadership.
pub(crate) async fn read_index(raft: &Raft) -> Result<u64, WriteError> {
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map_or(0, |id| id.index)),
        Err(RaftError::APIError(err)) => Err(WriteError::Unavailable(err.to_string())),
        Err(RaftError::Fatal(err)) => Err(WriteError::Stopped(err.to_string())),
    }
}

/// Replies awaited on one stream, by request id.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, WriteError>>>>>;

/// Commands that may wait to be sent on one forwarding stream; past this, a
/// command is refused as unavailable rather than queued without bound.
const FORWARD_QUEUE: usize = 1024;

/// One open stream of forwarded commands to a leader.
struct Forwarder {
    leader: NodeId,
    addr: String,
    requests: mpsc::Sender<pb::ForwardRequest>,
    waiting: Waiting,
    next_id: AtomicU64,
    /// Cleared when the stream fails: the next command opens another.
    alive: Arc<AtomicBool>,
}

impl Forwarder {
    fn open(leader: NodeId, addr: String, channel: Channel, metrics: Metrics) -> Self {
        let (requests, outgoing) = mpsc::channel(FORWARD_QUEUE);
        let waiting: Waiting = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(give_up_on_a_deposed_leader(
            leader,
            metrics,
            requests.clone(),
            Arc::clone(&waiting),
            Arc::clone(&alive),
        ));
        let stream = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let task = run_stream(channel, stream, Arc::clone(&waiting), addr.clone());
        let flag = Arc::clone(&alive);
        let waiting_now = Arc::clone(&waiting);
        let failed_addr = addr.clone();
        tokio::spawn(async move {
            let ended = task.await;
            flag.store(false, Ordering::Release);
            let (why, failed): (String, fn(String) -> WriteError) = match ended {
                Ended::Unreached(why) => (why, WriteError::Undelivered),
                Ended::Lost(why) => (why, WriteError::Unavailable),
            };
            let lost: Vec<_> = waiting_now
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
                .collect();
            if !lost.is_empty() {
                tracing::info!(
                    leader = failed_addr,
                    commands = lost.len(),
                    reason = why,
                    "forwarding to the leader failed"
                );
            }
            for (_, reply) in lost {
                let _ = reply.send(Err(failed(format!(
                    "forwarding to the leader at {failed_addr}: {why}"
                ))));
            }
        });
        Self {
            leader,
            addr,
            requests,
            waiting,
            next_id: AtomicU64::new(0),
            alive,
        }
    }

    fn send(&self, command: Command, reply: oneshot::Sender<Result<Reply, WriteError>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, reply);
        let request = pb::ForwardRequest {
            id,
            command: command.0,
        };
        let refused = match self.requests.try_send(request) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => format!(
                "{FORWARD_QUEUE} commands already wait to be sent to the leader at {}",
                self.addr
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.alive.store(false, Ordering::Release);
                format!("the stream to the leader at {} has closed", self.addr)
            }
        };
        if let Some(reply) = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
        {
            let _ = reply.send(Err(WriteError::Unavailable(refused)));
        }
    }
}

/// The metrics of this node's Raft, where it learns who leads.
type Metrics = tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, crate::Node>>;

/// Once this node learns that another node leads, the commands still waiting on
/// `leader`'s stream are answered unavailable (their outcome is unknown: a deposed
/// leader may have had them committed, or not), rather than waiting for a leader that
/// is paused or cut off to answer; and the stream takes no more. Returns when the
/// stream ends.
async fn give_up_on_a_deposed_leader(
    leader: NodeId,
    mut metrics: Metrics,
    requests: mpsc::Sender<pb::ForwardRequest>,
    waiting: Waiting,
    alive: Arc<AtomicBool>,
) {
    loop {
        tokio::select! {
            () = requests.closed() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
        let now = metrics.borrow_and_update().current_leader;
        let Some(now) = now.filter(|now| *now != leader) else {
            continue;
        };
        alive.store(false, Ordering::Release);
        let deposed: Vec<_> = waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        if !deposed.is_empty() {
            tracing::info!(
                old = leader,
                new = now,
                commands = deposed.len(),
                "the leader changed while commands waited on it; their outcome is unknown"
            );
        }
        for (_, reply) in deposed {
            let _ = reply.send(Err(WriteError::Unavailable(format!(
                "node {leader} stopped leading (node {now} leads now) before it answered; the write may or may not have been committed"
            ))));
        }
        return;
    }
}

/// Why a forwarding stream ended.
enum Ended {
    /// No connection to the leader could be made, or the leader (stopping) closed
    /// the stream after answering every command it had read: what still waits was
    /// not written.
    Unreached(String),
    /// The stream broke, or the leader closed it: what was sent may be written.
    Lost(String),
}

/// Runs a forwarding stream until it ends; returns why it ended.
async fn run_stream(
    mut channel: Channel,
    requests: impl tokio_stream::Stream<Item = pb::ForwardRequest> + Send + 'static,
    waiting: Waiting,
    addr: String,
) -> Ended {
    // Connected first, so that a leader that cannot be reached is told apart from
    // one that may have taken the commands before the stream broke.
    let ready = std::future::poll_fn(|cx| {
        tonic::codegen::Service::<tonic::codegen::http::Request<tonic::body::Body>>::poll_ready(
            &mut channel,
            cx,
        )
    })
    .await;
    if let Err(err) = ready {
        return Ended::Unreached(format!("{addr}: {err}"));
    }
    let mut client = RaftClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let mut replies = match client.forward(requests).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Lost(format!("{addr}: {}", status.message())),
    };
    loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let waiter = waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&reply.id);
                let Some(waiter) = waiter else { continue };
                let result = match reply.result {
                    Some(pb::forward_reply::Result::Reply(bytes)) => Ok(Reply(bytes)),
                    Some(pb::forward_reply::Result::Error(err)) => Err(WriteError::Unavailable(
                        format!("the leader at {addr}: {}", err.message),
                    )),
                    None => Err(WriteError::Unavailable(format!(
                        "the leader at {addr} answered nothing"
                    ))),
                };
                let _ = waiter.send(result);
            }
            Ok(None) => {
                return Ended::Unreached(format!("{addr} closed the stream (it is stopping)"));
            }
            Err(status) => return Ended::Lost(status.message().to_owned()),
        }
    }
}
