//! Three (and four) real Raft nodes on loopback, each with its gRPC server, its
//! storage in a temp dir and the file state machine: replication, failover,
//! restart, and a new node catching up from a snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use keel_raft::{Command, Node, NodeId, NodeSettings, Raft, RaftNode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::{FileMachine, commands_of};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn settings() -> NodeSettings {
    NodeSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout: (Duration::from_millis(200), Duration::from_millis(400)),
        snapshot_every: 1_000_000,
        keep_below_snapshot: 0,
        ..NodeSettings::default()
    }
}

struct TestNode {
    id: NodeId,
    addr: String,
    dir: PathBuf,
    node: RaftNode,
    raft: Raft,
    server: JoinHandle<()>,
}

impl TestNode {
    async fn start(id: NodeId, listener: TcpListener, root: &Path) -> Self {
        let addr = listener.local_addr().expect("addr").to_string();
        let dir = root.join(format!("node-{id}"));
        let state = dir.join("state");
        let node = RaftNode::start(id, "test", &dir.join("raft"), &settings(), |summary| {
            FileMachine::open(&state, summary)
        })
        .await
        .expect("start node");
        let service = node.service.clone().into_server();
        let server = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            id,
            addr,
            dir,
            raft: node.raft.clone(),
            node,
            server,
        }
    }

    async fn restart(id: NodeId, addr: &str, root: &Path) -> Self {
        let listener = TcpListener::bind(addr).await.expect("rebind");
        Self::start(id, listener, root).await
    }

    /// Stops the node the way a crash would, as far as its peers can tell.
    async fn kill(self) {
        self.server.abort();
        let _ = self.server.await;
        let _ = self.raft.shutdown().await;
    }

    fn commands(&self) -> Vec<Bytes> {
        commands_of(&self.dir.join("state")).expect("read commands")
    }

    async fn wait_applied(&self, index: u64) {
        self.raft
            .wait(WAIT)
            .applied_index_at_least(Some(index), format!("node {} applies {index}", self.id))
            .await
            .expect("applied in time");
    }
}

async fn listeners(count: usize) -> Vec<TcpListener> {
    let mut all = Vec::new();
    for _ in 0..count {
        all.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    all
}

async fn three_nodes(root: &Path) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for (listener, id) in listeners(3).await.into_iter().zip(1..) {
        nodes.push(TestNode::start(id, listener, root).await);
    }
    let members: BTreeMap<NodeId, Node> = nodes
        .iter()
        .map(|n| (n.id, Node::new(n.addr.clone())))
        .collect();
    // Every node bootstraps with the same list, as `--peers` does.
    for node in &nodes {
        node.node.bootstrap(&members).await.expect("bootstrap");
    }
    nodes
}

/// The node that is leader by its own account.
async fn leader_of(nodes: &[TestNode]) -> NodeId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for node in nodes {
            let metrics = node.raft.metrics().borrow().clone();
            if metrics.state == openraft::ServerState::Leader {
                return node.id;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes through whichever node leads, following "forward to leader" answers as a
/// client does (leadership may move while a cluster settles).
async fn write(nodes: &[TestNode], text: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut at = 0;
    loop {
        match nodes[at]
            .raft
            .client_write(Command(Bytes::from(text.to_owned())))
            .await
        {
            Ok(written) => return written.log_id.index,
            Err(err) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no leader took {text}: {err}"
                );
                let leader = err.forward_to_leader().and_then(|f| f.leader_id);
                match leader.and_then(|id| nodes.iter().position(|n| n.id == id)) {
                    Some(leader_at) => at = leader_at,
                    None => {
                        at = (at + 1) % nodes.len();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_should_replicate_fail_over_and_catch_up() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut nodes = three_nodes(root.path()).await;
    let mut last = 0;
    for i in 0..50 {
        last = write(&nodes, &format!("a{i}")).await;
    }
    let leader = leader_of(&nodes).await;
    let leader_at = nodes.iter().position(|n| n.id == leader).expect("leader");
    for node in &nodes {
        node.wait_applied(last).await;
    }
    let expected: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!("a{i}"))).collect();
    for node in &nodes {
        assert_eq!(node.commands(), expected, "node {}", node.id);
    }

    // A follower does not take writes itself: it names the leader.
    let follower_at = (leader_at + 1) % 3;
    let refused = nodes[follower_at]
        .raft
        .client_write(Command(Bytes::from_static(b"to a follower")))
        .await
        .expect_err("a follower forwards");
    assert_eq!(
        refused.forward_to_leader().and_then(|f| f.leader_id),
        Some(leader)
    );

    // The leader dies; the two others elect a new one and go on.
    let dead = nodes.remove(leader_at);
    let dead_addr = dead.addr.clone();
    dead.kill().await;
    let new_leader = nodes[0]
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "a new leader",
        )
        .await
        .expect("a new leader in time")
        .current_leader
        .expect("leader");
    assert_ne!(new_leader, leader);
    for i in 0..20 {
        last = write(&nodes, &format!("b{i}")).await;
    }

    // The old leader comes back with its data and catches up from the log.
    let back = TestNode::restart(leader, &dead_addr, root.path()).await;
    back.wait_applied(last).await;
    let mut expected = expected;
    expected.extend((0..20).map(|i| Bytes::from(format!("b{i}"))));
    assert_eq!(back.commands(), expected);
    nodes.push(back);

    // A snapshot, the log purged below it: a new node can only catch up from the
    // snapshot's files.
    let leader_now = leader_of(&nodes).await;
    let at = nodes
        .iter()
        .position(|n| n.id == leader_now)
        .expect("leader");
    let leader_raft = nodes[at].raft.clone();
    leader_raft.trigger().snapshot().await.expect("snapshot");
    leader_raft
        .wait(WAIT)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "a snapshot",
        )
        .await
        .expect("snapshot in time");
    leader_raft
        .wait(WAIT)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "purged")
        .await
        .expect("purged in time");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let newcomer = TestNode::start(4, listener, root.path()).await;
    leader_raft
        .add_learner(4, Node::new(newcomer.addr.clone()), true)
        .await
        .expect("add learner");
    newcomer.wait_applied(last).await;
    assert_eq!(newcomer.commands(), expected, "installed from the snapshot");
    let more = write(&nodes, "after the snapshot").await;
    newcomer.wait_applied(more).await;
    assert_eq!(
        newcomer.commands().last(),
        Some(&Bytes::from_static(b"after the snapshot"))
    );

    for node in nodes {
        node.kill().await;
    }
    newcomer.kill().await;
}

/// A node whose data directory was emptied (a replaced disk) and that restarts as
/// itself must not vote until it has everything again: it may have voted in the
/// current term before it lost its vote. It finds from its peers that the cluster
/// counts it as a member, marks itself damaged instead of forming a cluster, and
/// catches up (the fault suite's wipe-data restarts nodes so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_on_an_empty_data_directory_should_not_vote_until_it_has_caught_up() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut nodes = three_nodes(root.path()).await;
    let mut last = 0;
    for i in 0..20 {
        last = write(&nodes, &format!("w{i}")).await;
    }
    for node in &nodes {
        node.wait_applied(last).await;
    }
    let leader = leader_of(&nodes).await;
    let at = nodes.iter().position(|n| n.id != leader).expect("follower");
    let wiped = nodes.remove(at);
    let (id, addr, dir) = (wiped.id, wiped.addr.clone(), wiped.dir.clone());
    wiped.kill().await;
    std::fs::remove_dir_all(&dir).expect("wipe");

    let back = TestNode::restart(id, &addr, root.path()).await;
    let peers: BTreeMap<NodeId, String> = nodes
        .iter()
        .map(|n| (n.id, n.addr.clone()))
        .chain([(id, addr.clone())])
        .collect();
    let options = keel_raft::membership::ClusterOptions {
        node_id: id,
        advertise: addr,
        membership: keel_raft::membership::Membership::Peers(peers),
        settings: settings(),
    };
    keel_raft::membership::form(&back.node, &options)
        .await
        .expect("form");
    assert!(
        back.node.damage.is_set(),
        "a node that lost its data came back as an ordinary voter"
    );
    back.wait_applied(last).await;
    let expected: Vec<Bytes> = (0..20).map(|i| Bytes::from(format!("w{i}"))).collect();
    assert_eq!(back.commands(), expected);
    // Caught up, it votes again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while back.node.damage.is_set() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still damaged after catching up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in nodes {
        node.kill().await;
    }
    back.kill().await;
}

mod transfer {
    //! A snapshot sent by hand, chunk by chunk, to see the receiver keep what
    //! arrived, refuse damaged or misplaced chunks, and install once complete.

    use super::*;
    use keel_proto::raft::v1 as pb;
    use keel_raft::{LogId, Manifest, ManifestFile, SnapshotMeta, Vote};
    use pb::raft_client::RaftClient;
    use pb::snapshot_chunk::Part;

    const MIB: usize = 1024 * 1024;

    fn header(manifest: &Manifest, state: &[u8]) -> pb::SnapshotChunk {
        pb::SnapshotChunk {
            part: Some(Part::Header(pb::SnapshotHeader {
                vote_json: serde_json::to_vec(&Vote::new_committed(1, 2))
                    .expect("json")
                    .into(),
                manifest_json: serde_json::to_vec(manifest).expect("json").into(),
                state: Bytes::copy_from_slice(state),
            })),
        }
    }

    fn chunk(data: &[u8], offset: usize) -> pb::SnapshotChunk {
        let data = &data[offset..(offset + MIB).min(data.len())];
        pb::SnapshotChunk {
            part: Some(Part::Data(pb::FileChunk {
                file: 0,
                offset: offset as u64,
                data: Bytes::copy_from_slice(data),
                crc32c: crc32c::crc32c(data),
            })),
        }
    }

    async fn send(
        client: &mut RaftClient<tonic::transport::Channel>,
        parts: Vec<pb::SnapshotChunk>,
    ) -> Result<pb::JsonMessage, tonic::Status> {
        client
            .install_snapshot(tokio_stream::iter(parts))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn received(client: &mut RaftClient<tonic::transport::Channel>, id: &str) -> Vec<u64> {
        client
            .snapshot_status(pb::SnapshotStatusRequest {
                snapshot_id: id.to_owned(),
            })
            .await
            .expect("status")
            .into_inner()
            .received
    }

    /// A snapshot of the file machine after `count` commands of about 1 KiB.
    struct FileSnapshot {
        commands: Vec<Bytes>,
        data: Vec<u8>,
        state: [u8; 8],
        last: LogId,
        manifest: Manifest,
    }

    impl FileSnapshot {
        fn of(count: u64) -> Self {
            let commands: Vec<Bytes> = (0..count)
                .map(|i| Bytes::from(format!("{i:05}{}", "x".repeat(1000))))
                .collect();
            let mut data = Vec::new();
            for command in &commands {
                data.extend_from_slice(&(command.len() as u32).to_le_bytes());
                data.extend_from_slice(command);
            }
            let state = (data.len() as u64).to_le_bytes();
            let last = LogId::new(openraft::CommittedLeaderId::new(1, 2), count);
            let manifest = Manifest {
                meta: SnapshotMeta {
                    last_log_id: Some(last),
                    last_membership: openraft::StoredMembership::default(),
                    snapshot_id: format!("1-2-{count}-0"),
                },
                files: vec![ManifestFile {
                    name: "commands".to_owned(),
                    len: data.len() as u64,
                }],
                state_len: state.len() as u64,
            };
            Self {
                commands,
                data,
                state,
                last,
                manifest,
            }
        }

        /// The whole transfer: header, every chunk, done.
        fn parts(&self) -> Vec<pb::SnapshotChunk> {
            let mut parts = vec![header(&self.manifest, &self.state)];
            parts.extend(
                (0..self.data.len())
                    .step_by(MIB)
                    .map(|at| chunk(&self.data, at)),
            );
            parts.push(pb::SnapshotChunk {
                part: Some(Part::Done(true)),
            });
            parts
        }
    }

    /// A leader restarts replication when membership changes, so a new member may
    /// get the same snapshot twice at once. Both transfers must succeed, the
    /// snapshot be installed once, and the node's Raft keep running (it once
    /// stopped for good: the second install found the first one's files moved).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_snapshot_sent_twice_at_once_should_install_once_and_the_node_run_on() {
        let root = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = TestNode::start(1, listener, root.path()).await;
        let connect = || RaftClient::connect(format!("http://{}", node.addr));
        let (mut first, mut second) = (
            connect().await.expect("connect"),
            connect().await.expect("connect"),
        );
        // Three newer and newer snapshots, each raced (the race is not always lost).
        for count in [1000, 2000, 3000] {
            let snapshot = FileSnapshot::of(count);
            let (a, b) = tokio::join!(
                send(&mut first, snapshot.parts()),
                send(&mut second, snapshot.parts())
            );
            a.expect("the first transfer");
            b.expect("the second transfer");
            // Once more, after it was installed: answered at once.
            send(&mut first, snapshot.parts())
                .await
                .expect("a third transfer");
            node.raft
                .wait(WAIT)
                .metrics(
                    |m| m.last_applied == Some(snapshot.last),
                    "applied the snapshot",
                )
                .await
                .expect("in time");
            let running = node.raft.metrics().borrow().running_state.clone();
            assert!(running.is_ok(), "{running:?}");
            assert_eq!(node.commands(), snapshot.commands);
        }
        node.kill().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_transfer_should_resume_refuse_bad_chunks_and_install_when_complete() {
        let root = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let node = TestNode::start(1, listener, root.path()).await;
        let mut client = RaftClient::connect(format!("http://{}", node.addr))
            .await
            .expect("connect");

        // The file machine's file: 3000 commands of about 1 KiB, 3 MiB in all.
        let FileSnapshot {
            commands,
            data,
            state,
            last,
            manifest,
        } = FileSnapshot::of(3000);
        let id = manifest.meta.snapshot_id.clone();
        assert!(received(&mut client, &id).await.is_empty(), "nothing yet");

        // Cut short after the first MiB: the receiver keeps it.
        let cut = send(
            &mut client,
            vec![header(&manifest, &state), chunk(&data, 0)],
        )
        .await
        .expect_err("incomplete");
        assert_eq!(cut.code(), tonic::Code::Aborted, "{cut}");
        assert_eq!(received(&mut client, &id).await, [MIB as u64]);

        // A chunk that fails its checksum, and one past what arrived, are refused.
        let mut damaged = chunk(&data, MIB);
        if let Some(Part::Data(file)) = &mut damaged.part {
            file.crc32c ^= 1;
        }
        let refused = send(&mut client, vec![header(&manifest, &state), damaged])
            .await
            .expect_err("damaged");
        assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused}");
        let gap = send(
            &mut client,
            vec![header(&manifest, &state), chunk(&data, 2 * MIB)],
        )
        .await
        .expect_err("a gap");
        assert_eq!(gap.code(), tonic::Code::InvalidArgument, "{gap}");
        assert_eq!(received(&mut client, &id).await, [MIB as u64]);

        // Resumed from the first MiB on, it completes and is installed.
        let mut parts = vec![header(&manifest, &state)];
        parts.extend((MIB..data.len()).step_by(MIB).map(|at| chunk(&data, at)));
        parts.push(pb::SnapshotChunk {
            part: Some(Part::Done(true)),
        });
        send(&mut client, parts).await.expect("installed");
        node.raft
            .wait(WAIT)
            .metrics(|m| m.last_applied == Some(last), "applied the snapshot")
            .await
            .expect("in time");
        assert_eq!(node.commands(), commands);
        node.kill().await;
    }
}
