//! Three log service nodes in this process, each on its own loopback port and data
//! directory, replicating through Raft over their gRPC listeners.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_log::Client;
use keel_log::cluster::{self, ClusterOptions, Membership};
use keel_proto::log::v1 as wire;
use keel_raft::NodeSettings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::config;

/// Snapshots often, so that a test sees them taken and sent.
fn settings() -> NodeSettings {
    NodeSettings {
        snapshot_every: 40,
        keep_below_snapshot: 5,
        ..NodeSettings::default()
    }
}

struct Node {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    membership: Membership,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Node {
    async fn start(id: u64, listener: TcpListener, dir: &Path, membership: Membership) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let options = ClusterOptions {
            node_id: id,
            advertise: addr.to_string(),
            membership: membership.clone(),
            settings: settings(),
        };
        let node = cluster::start(config(dir), &options)
            .await
            .expect("node starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let joining = node.clone();
        let task = tokio::spawn(keel_log::serve_node(listener, node, async move {
            let _ = stopped.await;
        }));
        if let Membership::Join(via) = membership {
            joining.join(&via, &addr.to_string()).await.expect("joins");
        }
        Self {
            id,
            addr,
            dir: dir.to_path_buf(),
            membership: options.membership,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("node stops")
                .expect("node task")
                .expect("node ran cleanly");
        }
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind again");
        let dir = self.dir.clone();
        let membership = self.membership.clone();
        *self = Self::start(self.id, listener, &dir, membership).await;
    }

    async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string())
            .await
            .expect("connect")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Cluster {
    nodes: Vec<Node>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start(size: u64) -> Self {
        // `RUST_LOG=info` shows what the nodes log, for a failure's story.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=size {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            peers.insert(id, listener.local_addr().expect("addr").to_string());
            listeners.push((id, listener));
        }
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().expect("temp dir");
            nodes.push(
                Node::start(id, listener, dir.path(), Membership::Peers(peers.clone())).await,
            );
            dirs.push(dir);
        }
        let cluster = Self { nodes, _dirs: dirs };
        for node in &cluster.nodes {
            wait_ready(node).await;
        }
        cluster
    }

    /// The whole cluster's addresses, as a client takes them.
    fn addrs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn leader(&self) -> u64 {
        let mut client = Client::connect(&self.addrs()).await.expect("connect");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(servers) = client.servers().await
                && let Some(leader) = servers.iter().find(|s| s.is_leader)
            {
                return leader.id.parse().expect("numeric id");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node")
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node")
    }
}

/// Waits (with a deadline) until `/readyz` says the node serves current data.
async fn wait_ready(node: &Node) {
    let http = keel_serve::client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let last = match http.get(node.url("/readyz")).send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(err) => err.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} not ready within 20 s: {last}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `count` records of `topic` from `node`, after a linearizable barrier.
async fn read_all(node: &Node, topic: &str, count: u64) -> Vec<Vec<u8>> {
    let mut client = node.client().await;
    let mut values = Vec::new();
    for offset in 0..count {
        let record = client
            .consume_with(topic, offset, true)
            .await
            .unwrap_or_else(|err| panic!("node {} offset {offset}: {err}", node.id));
        assert_eq!(record.offset, offset);
        values.push(record.value.to_vec());
    }
    values
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
fn gauge(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_should_export_their_raft_figures_and_describe_raft_by_reflection() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let mut client = cluster.node(leader).client().await;
    for i in 0..5 {
        client
            .produce("metered", format!("m{i}"))
            .await
            .expect("produce");
    }
    let http = keel_serve::client::new();
    let mut terms = Vec::new();
    for node in &cluster.nodes {
        let metrics = http
            .get(node.url("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        assert_eq!(gauge(&metrics, "keel_raft_has_leader"), 1);
        assert_eq!(gauge(&metrics, "keel_raft_current_leader"), leader);
        let is_leader = node.id == leader;
        assert_eq!(gauge(&metrics, "keel_raft_is_leader"), u64::from(is_leader));
        assert!(gauge(&metrics, "keel_raft_last_log_index") >= 5);
        terms.push(gauge(&metrics, "keel_raft_term"));
        let lags = metrics
            .lines()
            .filter(|line| line.starts_with("keel_raft_replication_lag_entries{"))
            .count();
        // Only the leader knows how far each follower is.
        assert_eq!(
            lags,
            if is_leader { 2 } else { 0 },
            "node {}: {metrics}",
            node.id
        );
    }
    assert!(
        terms.iter().all(|term| *term == terms[0] && *term >= 1),
        "{terms:?}"
    );
    // A cluster node also describes its Raft service by reflection.
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let listed = crate::support::reflect(
        &cluster.node(leader).url(""),
        MessageRequest::ListServices(String::new()),
    )
    .await;
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    assert!(list.service.iter().any(|s| s.name == "keel.raft.v1.Raft"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_any_node_should_get_the_same_offsets_on_every_node() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("a follower");

    // gRPC to a follower: forwarded to the leader, answered with its offsets.
    let mut client = follower.client().await;
    for i in 0..30u64 {
        let offset = client
            .produce("orders", format!("grpc-{i}"))
            .await
            .expect("produce");
        assert_eq!(offset, i, "dense offsets");
    }
    let batch = client
        .produce_batch("orders", vec!["b1".into(), "b2".into()])
        .await
        .expect("batch");
    assert_eq!(batch, 30..32);
    // HTTP to the follower, as curl would.
    let http = keel_serve::client::new();
    let response = http
        .post(follower.url("/v1/topics/orders/records"))
        .header("content-type", "application/json")
        .body(r#"{"value":"aHR0cA=="}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["first_offset"], 32);

    let expected = read_all(cluster.node(leader), "orders", 33).await;
    assert_eq!(expected[0], b"grpc-0");
    assert_eq!(expected[32], b"http");
    for node in &cluster.nodes {
        assert_eq!(
            read_all(node, "orders", 33).await,
            expected,
            "node {}",
            node.id
        );
        let mut client = node.client().await;
        let err = client
            .consume("orders", 33)
            .await
            .expect_err("past the end");
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    // GetServers names every node and the one leader, in the proglog shape.
    let servers = client.servers().await.expect("servers");
    assert_eq!(servers.len(), 3);
    assert_eq!(servers.iter().filter(|s| s.is_leader).count(), 1);
    assert!(
        servers
            .iter()
            .any(|s| s.rpc_addr == follower.addr.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_should_be_stored_once() {
    let cluster = Cluster::start(3).await;
    let mut client = Client::connect(&cluster.addrs()).await.expect("connect");
    let request = wire::ProduceRequest {
        record: Some(wire::Record {
            value: "once".into(),
            ..Default::default()
        }),
        topic: "idem".into(),
        producer_id: 77,
        sequence: 1,
    };
    let first = client
        .grpc()
        .produce(request.clone())
        .await
        .expect("first")
        .into_inner();
    let again = client
        .grpc()
        .produce(request.clone())
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        first.offset, again.offset,
        "the retry gets the first offsets"
    );
    let next = client
        .produce("idem", "next")
        .await
        .expect("another producer");
    assert_eq!(next, first.offset + 1, "the retry stored nothing");

    // Past the window, a sequence cannot be told from a duplicate: refused.
    for sequence in 2..=7 {
        let mut later = request.clone();
        later.sequence = sequence;
        client.grpc().produce(later).await.expect("later sequence");
    }
    let status = client.grpc().produce(request).await.expect_err("too old");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");

    // Over HTTP, with the producer headers.
    let node = cluster.node(1);
    let http = keel_serve::client::new();
    let mut offsets = Vec::new();
    for _ in 0..2 {
        let response = http
            .post(node.url("/v1/topics/idem/records"))
            .header("keel-producer", "91")
            .header("keel-sequence", "1")
            .body("raw")
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        offsets.push(body["first_offset"].clone());
    }
    assert_eq!(offsets[0], offsets[1]);
    let response = http
        .post(node.url("/v1/topics/idem/records"))
        .header("keel-producer", "91")
        .body("raw")
        .send()
        .await
        .expect("post");
    assert_eq!(
        response.status(),
        400,
        "a producer without a sequence is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_should_catch_up_and_a_new_one_join_through_a_snapshot() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let down = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("follower")
        .id;
    cluster.node_mut(down).stop().await;

    let mut client = Client::connect(&cluster.addrs()).await.expect("connect");
    for i in 0..120u64 {
        assert_eq!(
            client.produce("t", format!("r{i}")).await.expect("produce"),
            i
        );
    }
    cluster.node_mut(down).restart().await;
    wait_ready(cluster.node(down)).await;
    let expected = read_all(cluster.node(leader), "t", 120).await;
    assert_eq!(read_all(cluster.node(down), "t", 120).await, expected);

    // Node 4 joins: the leader's log was purged below its snapshots, so the new
    // node gets the topic's files, then the entries after them.
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let via = cluster.node(down).addr.to_string();
    let joined = Node::start(4, listener, dir.path(), Membership::Join(via)).await;
    wait_ready(&joined).await;
    assert_eq!(read_all(&joined, "t", 120).await, expected);
    let status = keel_log::cluster::admin(&joined.addr.to_string())
        .await
        .expect("admin")
        .status(keel_proto::raft::v1::ClusterStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 4);
    assert!(status.snapshot.is_some(), "node 4 holds a snapshot");
    cluster.nodes.push(joined);
    cluster._dirs.push(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_should_refuse_writes_and_serve_committed_reads() {
    let mut cluster = Cluster::start(3).await;
    let mut client = Client::connect(&cluster.addrs()).await.expect("connect");
    for i in 0..5u64 {
        client.produce("m", format!("v{i}")).await.expect("produce");
    }
    // Every node has applied the five before two of them stop.
    for node in &cluster.nodes {
        read_all(node, "m", 5).await;
    }
    let alone = cluster.nodes[0].id;
    for id in [2, 3] {
        cluster.node_mut(id).stop().await;
    }
    let node = cluster.node(alone);
    let mut client = node.client().await.retry_for(Duration::ZERO);
    let err = client.produce("m", "lost?").await.expect_err("no majority");
    assert!(err.to_string().contains("retry"), "{err}");
    // What was committed is still served, from this node's own state.
    let record = client.consume("m", 4).await.expect("committed read");
    assert_eq!(record.value, "v4");
    let err = client
        .consume("m", 5)
        .await
        .expect_err("nothing uncommitted");
    assert!(err.to_string().contains("out of range"), "{err}");
    // Within an election timeout it finds no leader, and says it is not ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = keel_serve::client::new()
            .get(node.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        if response.status() == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready with no majority"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = client.produce("m", "lost?").await.expect_err("no majority");
    assert!(err.to_string().contains("retry"), "{err}");
    let record = client.consume("m", 4).await.expect("committed read");
    assert_eq!(record.value, "v4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_voter_should_leave_the_majority_to_the_others() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let leaving = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .expect("follower")
        .id;
    let mut admin = keel_log::cluster::admin(&cluster.node(leader).addr.to_string())
        .await
        .expect("admin");
    let status = admin
        .remove_node(keel_proto::raft::v1::RemoveNodeRequest { node_id: leaving })
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(status.members.len(), 2);
    assert!(status.members.iter().all(|m| m.node_id != leaving));
    let mut client = cluster.node(leader).client().await;
    assert_eq!(client.produce("after", "x").await.expect("writes go on"), 0);
    // A follower refuses operator commands, naming the leader.
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader && n.id != leaving)
        .expect("follower");
    let err = keel_log::cluster::admin(&follower.addr.to_string())
        .await
        .expect("admin")
        .remove_node(keel_proto::raft::v1::RemoveNodeRequest { node_id: leader })
        .await
        .expect_err("not the leader");
    assert_eq!(
        keel_log::cluster::leader_in(err.message()),
        Some(cluster.node(leader).addr.to_string())
    );
}

/// Flips bytes in the middle of `file`, as a failing disk would.
fn corrupt_middle(file: &Path) {
    use std::os::unix::fs::FileExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open file to corrupt");
    let len = handle.metadata().expect("metadata").len();
    assert!(
        len > 200,
        "{} is too short to corrupt: {len} bytes",
        file.display()
    );
    let mut bytes = [0u8; 16];
    handle.read_exact_at(&mut bytes, len / 2).expect("read");
    for byte in &mut bytes {
        *byte ^= 0xA5;
    }
    handle.write_all_at(&bytes, len / 2).expect("write");
    handle.sync_all().expect("sync");
}

async fn status_of(node: &Node) -> keel_proto::raft::v1::ClusterStatus {
    keel_log::cluster::admin(&node.addr.to_string())
        .await
        .expect("admin")
        .status(keel_proto::raft::v1::ClusterStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_replica_should_re_replicate_and_vote_only_once_caught_up() {
    let mut cluster = Cluster::start(3).await;
    let mut client = Client::connect(&cluster.addrs()).await.expect("connect");
    for i in 0..100u64 {
        assert_eq!(
            client
                .produce("t", format!("record {i}"))
                .await
                .expect("produce"),
            i
        );
    }
    let leader = cluster.leader().await;
    let expected = read_all(cluster.node(leader), "t", 100).await;
    let followers: Vec<u64> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(|n| n.id)
        .collect();

    // One follower's topic files, the other's Raft log: each fails its checksums.
    let (topic_damaged, log_damaged) = (followers[0], followers[1]);
    read_all(cluster.node(topic_damaged), "t", 100).await;
    read_all(cluster.node(log_damaged), "t", 100).await;
    cluster.node_mut(topic_damaged).stop().await;
    cluster.node_mut(log_damaged).stop().await;
    let topic_file = cluster
        .node(topic_damaged)
        .dir
        .join("topics/t/00000000000000000000.log");
    corrupt_middle(&topic_file);
    let raft_file = cluster
        .node(log_damaged)
        .dir
        .join("raft/log/log/00000000000000000000.log");
    corrupt_middle(&raft_file);

    for id in [topic_damaged, log_damaged] {
        cluster.node_mut(id).restart().await;
    }
    for id in [topic_damaged, log_damaged] {
        let node = cluster.node(id);
        wait_ready(node).await;
        assert_eq!(
            read_all(node, "t", 100).await,
            expected,
            "node {id} re-replicated"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while status_of(node).await.damaged {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} still damaged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Caught up, they vote again: the cluster survives losing its leader.
    cluster.node_mut(leader).stop().await;
    let mut client = Client::connect(&format!(
        "{},{}",
        cluster.node(topic_damaged).addr,
        cluster.node(log_damaged).addr
    ))
    .await
    .expect("connect");
    assert_eq!(
        client.produce("t", "after").await.expect("a new leader"),
        100
    );
}
