//! Three registry nodes in this process, each on its own loopback port and data
//! directory, replicating through Raft over their own listeners.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::Method;
use keel_raft::NodeSettings;
use keel_raft::membership::{ClusterOptions, Membership};
use keel_registry::RegistryConfig;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{Instance, fast_config};

fn http() -> reqwest::Client {
    keel_serve::client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

struct Node {
    id: u64,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Node {
    async fn start(
        id: u64,
        listener: TcpListener,
        dir: &Path,
        peers: &BTreeMap<u64, String>,
        config: RegistryConfig,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let options = ClusterOptions {
            node_id: id,
            advertise: addr.to_string(),
            membership: Membership::Peers(peers.clone()),
            settings: NodeSettings::default(),
        };
        let node = keel_registry::replica::start(&config, dir, &options)
            .await
            .expect("node starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(keel_registry::run_node(
            listener,
            config,
            node,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            id,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the node stops in time")
                .unwrap();
        }
    }
}

struct Cluster {
    nodes: Vec<Node>,
    dirs: Vec<PathBuf>,
    peers: BTreeMap<u64, String>,
    _temp: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(fast_config()).await
    }

    async fn start_with(config: RegistryConfig) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        for id in 1..=3u64 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.insert(id, listener.local_addr().unwrap().to_string());
            listeners.push((id, listener));
        }
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for (id, listener) in listeners {
            let dir = temp.path().join(format!("node{id}"));
            nodes.push(Node::start(id, listener, &dir, &peers, config.clone()).await);
            dirs.push(dir);
        }
        let cluster = Self {
            nodes,
            dirs,
            peers,
            _temp: temp,
        };
        for node in &cluster.nodes {
            ready(node).await;
        }
        cluster
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    /// The leader, as a node's cluster status names it.
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for node in self.nodes.iter().filter(|n| n.task.is_some()) {
                if let Ok(mut admin) = keel_raft::membership::admin(&node.addr.to_string()).await
                    && let Ok(status) = admin
                        .status(keel_proto::raft::v1::ClusterStatusRequest {})
                        .await
                {
                    let leader = status.into_inner().leader_id;
                    if leader != 0 {
                        return leader;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn restart(&mut self, id: u64) {
        let at = self.nodes.iter().position(|n| n.id == id).unwrap();
        let listener = TcpListener::bind(self.nodes[at].addr).await.unwrap();
        let dir = self.dirs[at].clone();
        self.nodes[at] = Node::start(id, listener, &dir, &self.peers, fast_config()).await;
        ready(&self.nodes[at]).await;
    }
}

async fn ready(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(response) = http().get(node.url("/readyz")).send().await
            && response.status() == StatusCode::OK
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} not ready within 15 s",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Registers `body` through `node`, retrying while the cluster is unavailable (an
/// election under way), within a deadline.
async fn register(node: &Node, body: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = http()
            .post(node.url("/services"))
            .json(body)
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::OK => return response.json().await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("registering: {other}: {}", response.text().await.unwrap()),
        }
    }
}

/// The ids of a service's instances on `node`, after a linearizable barrier.
async fn instances(node: &Node, name: &str) -> Vec<(String, String)> {
    let list: Vec<Value> = http()
        .get(node.url(&format!("/v1/services/{name}?all=true&consistent")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list.iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["health"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits for the next notification, then a little longer to see that no other
/// follows (but a copy that a dependent drops).
async fn exactly_one(instance: &mut Instance) -> (Method, Value) {
    let first = instance.next().await;
    let copy =
        tokio::time::timeout(Duration::from_millis(500), instance.notifications.recv()).await;
    assert!(copy.is_err(), "a second notification arrived: {copy:?}");
    first
}

#[tokio::test]
async fn any_node_should_take_writes_every_node_answer_and_only_the_leader_notify() {
    let cluster = Cluster::start().await;
    let leader = cluster.leader().await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let mut portal = Instance::start().await;
    let grading = Instance::start().await;

    // Written through a follower, forwarded to the leader.
    let answer = register(
        cluster.node(followers[0]),
        &portal.dialect_a("portal", &["grading"]),
    )
    .await;
    assert_eq!(answer, serde_json::json!({"grading": []}));
    register(
        cluster.node(followers[1]),
        &grading.dialect_a("grading", &[]),
    )
    .await;
    let id = grading.addr.to_string();
    for node in &cluster.nodes {
        assert_eq!(
            instances(node, "grading").await,
            [(id.clone(), "passing".to_owned())],
            "node {} answers from the replicated state",
            node.id
        );
    }
    // One notification for one change, though three nodes applied it.
    let (method, instance) = exactly_one(&mut portal).await;
    assert_eq!(
        (method, instance["id"].as_str()),
        (Method::POST, Some(id.as_str()))
    );
    assert_eq!(portal.arrivals.lock().unwrap().len(), 1, "sent once");

    // A deregistration through another follower.
    let response = http()
        .delete(cluster.node(followers[1]).url("/services"))
        .json(&grading.dialect_a("grading", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (method, _) = exactly_one(&mut portal).await;
    assert_eq!(method, Method::DELETE);
    assert_eq!(portal.arrivals.lock().unwrap().len(), 2, "sent once");
    assert!(instances(cluster.node(leader), "grading").await.is_empty());
}

#[tokio::test]
async fn registrations_should_outlive_the_leader_whose_duties_the_next_one_takes_over() {
    let mut cluster = Cluster::start().await;
    let mut portal = Instance::start().await;
    let grading = Instance::start().await;
    let old = cluster.leader().await;
    register(cluster.node(old), &portal.dialect_a("portal", &["grading"])).await;
    register(cluster.node(old), &grading.dialect_a("grading", &[])).await;
    let (method, _) = portal.next().await;
    assert_eq!(method, Method::POST);

    cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == old)
        .unwrap()
        .stop()
        .await;
    let survivor = (1..=3).find(|id| *id != old).unwrap();
    let log = Instance::start().await;
    register(cluster.node(survivor), &log.dialect_a("log", &[])).await;
    let new = cluster.leader().await;
    assert_ne!(new, old);
    for name in ["portal", "grading", "log"] {
        assert_eq!(
            instances(cluster.node(survivor), name).await.len(),
            1,
            "{name} outlived the leader"
        );
    }

    // The new leader checks health: a failing instance turns critical, and the
    // dependent hears of it once.
    grading
        .healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (method, instance) = exactly_one(&mut portal).await;
    assert_eq!(
        (method, instance["name"].as_str()),
        (Method::DELETE, Some("grading"))
    );

    // The old leader comes back with its data and catches up.
    cluster.restart(old).await;
    let back = cluster.node(old);
    assert_eq!(instances(back, "log").await.len(), 1);
    assert!(
        instances(back, "grading")
            .await
            .iter()
            .all(|(_, health)| health == "critical"),
        "critical (or removed by now) on the node that was away"
    );
}

/// Ownership is judged by the replicated state machine: an instance registered by
/// one principal through one node cannot be removed or taken over by another through
/// any other node, and every node still lists it as its owner left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_principal_should_not_remove_an_instance_through_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    let mut text = String::new();
    for principal in ["alice", "mallory"] {
        text.push_str(&keel_auth::token::acl_entry(
            principal,
            &format!("{principal}-token"),
        ));
    }
    // A plaintext cluster: its nodes call each other without credentials.
    text.push_str(
        "[[allow]]\nprincipals = [\"alice\", \"mallory\"]\nservices = [\"*\"]\nactions = [\"register\", \"deregister\", \"read\"]\n\
         [[allow]]\nprincipals = [\"anonymous\"]\ncluster = true\nactions = [\"admin\"]\n",
    );
    std::fs::write(&acl, text).unwrap();
    let cluster = Cluster::start_with(RegistryConfig {
        acl: Some(acl),
        ..fast_config()
    })
    .await;
    let alice = Instance::start().await;
    let id = alice.addr.to_string();
    let body = serde_json::json!({"name": "visit", "addr": id});
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = http()
            .post(cluster.node(1).url("/services"))
            .bearer_auth("alice-token")
            .json(&body)
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::OK => break,
            StatusCode::SERVICE_UNAVAILABLE if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("registering: {other}: {}", response.text().await.unwrap()),
        }
    }
    for node in [2, 3] {
        let response = http()
            .delete(cluster.node(node).url(&format!("/v1/services/visit/{id}")))
            .bearer_auth("mallory-token")
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "through node {node}"
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "not_owner", "{answer}");
    }
    for node in 1..=3 {
        let listed: Value = http()
            .get(cluster.node(node).url("/v1/services/visit?consistent"))
            .bearer_auth("mallory-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            listed.as_array().map(Vec::len),
            Some(1),
            "node {node}: {listed}"
        );
    }
}
