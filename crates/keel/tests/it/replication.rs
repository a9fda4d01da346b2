//! A 3-node log service cluster of `keel log serve` processes on loopback: the
//! leader killed with SIGKILL under a produce load loses no acknowledged record,
//! and idempotent producers store each record once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_log::Client;

use crate::support::Served;

/// Free loopback ports for a cluster's `--peers`, which every node must know
/// before any starts: bound by the OS, read back, and released.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

struct Cluster {
    peers: String,
    ports: Vec<u16>,
    nodes: BTreeMap<u64, Served>,
    dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start(size: usize) -> Self {
        let ports = free_ports(size);
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let dirs: Vec<tempfile::TempDir> = (0..size)
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        let mut cluster = Self {
            peers,
            ports,
            nodes: BTreeMap::new(),
            dirs,
        };
        for id in 1..=size as u64 {
            cluster.start_node(id);
        }
        cluster
    }

    fn start_node(&mut self, id: u64) {
        let index = (id - 1) as usize;
        let addr = format!("127.0.0.1:{}", self.ports[index]);
        let node = spawn_node(id, &addr, self.dirs[index].path(), &self.peers);
        self.nodes.insert(id, node);
    }

    fn addrs(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn wait_ready(&self) {
        let http = keel_serve::client::new();
        for node in self.nodes.values() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = http
                    .get(format!("http://{}/readyz", node.addr))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                assert!(Instant::now() < deadline, "{} not ready in 30 s", node.addr);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn leader(&self) -> u64 {
        let mut client = Client::connect(&self.addrs()).await.expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(servers) = client.servers().await
                && let Some(leader) = servers.iter().find(|s| s.is_leader)
            {
                return leader.id.parse().expect("numeric id");
            }
            assert!(Instant::now() < deadline, "no leader in 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn spawn_node(id: u64, addr: &str, dir: &Path, peers: &str) -> Served {
    let id = id.to_string();
    let dir = dir.to_str().expect("utf-8 dir");
    Served::spawn(
        &[
            "log",
            "serve",
            "--addr",
            addr,
            "--data-dir",
            dir,
            "--node-id",
            &id,
            "--peers",
            peers,
        ],
        &[],
    )
}

/// What the producers had acknowledged: offset -> value.
type Acked = Arc<Mutex<HashMap<u64, String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_should_lose_no_acknowledged_record() {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 150;
    let mut cluster = Cluster::start(3);
    cluster.wait_ready().await;
    let acked: Acked = Arc::default();
    let addrs = cluster.addrs();
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let acked = Arc::clone(&acked);
        let addrs = addrs.clone();
        producers.push(tokio::spawn(async move {
            let mut client = Client::connect(&addrs).await.expect("connect");
            let mut failures = Vec::new();
            for i in 0..PER_PRODUCER {
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let value = format!("p{p}-{i}");
                match client.produce("load", value.clone()).await {
                    Ok(offset) => {
                        let before = acked.lock().expect("lock").insert(offset, value);
                        assert!(before.is_none(), "offset {offset} acknowledged twice");
                    }
                    Err(err) => failures.push(format!("{value}: {err}")),
                }
            }
            failures
        }));
    }
    // Kill the leader once the load is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("lock").len() < 100 {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.leader().await;
    cluster.nodes.get(&leader).expect("leader").signal("KILL");
    let mut failures = Vec::new();
    for producer in producers {
        failures.extend(producer.await.expect("producer"));
    }
    assert!(
        failures.is_empty(),
        "writes failed across the failover: {failures:?}"
    );

    cluster.nodes.remove(&leader);
    cluster.start_node(leader);
    cluster.wait_ready().await;
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), PRODUCERS * PER_PRODUCER);
    let mut copies = Vec::new();
    for node in cluster.nodes.values() {
        let mut client = Client::connect(&node.addr).await.expect("connect");
        let info = client
            .topics()
            .await
            .expect("topics")
            .into_iter()
            .find(|t| t.name == "load")
            .expect("topic load");
        let mut values = Vec::new();
        for offset in 0..info.next_offset {
            let record = client
                .consume_with("load", offset, true)
                .await
                .unwrap_or_else(|err| panic!("{} offset {offset}: {err}", node.addr));
            values.push(String::from_utf8(record.value.to_vec()).expect("utf-8"));
        }
        for (offset, value) in &acked {
            assert_eq!(
                values.get(*offset as usize),
                Some(value),
                "{}: acknowledged offset {offset}",
                node.addr
            );
        }
        let distinct: HashSet<&String> = values.iter().collect();
        assert_eq!(
            distinct.len(),
            values.len(),
            "{}: a record stored twice",
            node.addr
        );
        copies.push(values);
    }
    assert!(copies.windows(2).all(|w| w[0] == w[1]), "the nodes differ");
    assert_eq!(copies[0].len(), acked.len(), "only acknowledged records");
}

/// Runs `keel ARGS` to completion and returns its stdout.
fn keel(args: &[&str]) -> String {
    let output = std::process::Command::new(crate::support::KEEL)
        .args(args)
        .env("KEEL_LOG_LEVEL", "warn")
        .output()
        .expect("run keel");
    assert!(
        output.status.success(),
        "keel {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_cluster_should_show_the_members_and_remove_one() {
    let cluster = Cluster::start(3);
    cluster.wait_ready().await;
    let leader = cluster.leader().await;
    let addrs = cluster.addrs();
    let status: serde_json::Value =
        serde_json::from_str(&keel(&["cluster", "status", "--addr", &addrs, "--json"]))
            .expect("status is JSON");
    assert_eq!(status["leader_id"], leader);
    assert_eq!(status["members"].as_array().expect("members").len(), 3);
    let table = keel(&["cluster", "status", "--addr", &addrs]);
    assert!(
        table.contains(&format!("leader:    node {leader}")),
        "{table}"
    );

    let leaving = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let after: serde_json::Value = serde_json::from_str(&keel(&[
        "cluster",
        "remove-node",
        "--addr",
        &addrs,
        "--node-id",
        &leaving.to_string(),
        "--json",
    ]))
    .expect("JSON");
    let members: Vec<u64> = after["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["node_id"].as_u64().expect("id"))
        .collect();
    assert_eq!(members.len(), 2);
    assert!(!members.contains(&leaving), "{members:?}");
    // Writes go on through the two that remain.
    let mut client = Client::connect(&addrs).await.expect("connect");
    assert_eq!(client.produce("after", "x").await.expect("produce"), 0);
}

/// Found by `keel chaos run --nemesis pause-leader`: a write to a follower was
/// forwarded to a leader that then stopped (SIGSTOP) and waited on it for the commit
/// timeout (5 s), though another node led within half a second. Now the follower
/// answers it unavailable as soon as it learns of the new leader, and the client's
/// retry (same producer and sequence) goes to the new leader: stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_to_a_paused_leader_should_not_wait_for_it() {
    let cluster = Cluster::start(3);
    cluster.wait_ready().await;
    let leader = cluster.leader().await;
    let follower = cluster
        .nodes
        .iter()
        .find(|(id, _)| **id != leader)
        .map(|(_, node)| node.addr.clone())
        .unwrap();
    let http = keel_serve::client::new();
    let append = |sequence: u64, value: &'static str| {
        http.post(format!("http://{follower}/v1/topics/paused/records"))
            .header("content-type", "application/octet-stream")
            .header("keel-producer", 7)
            .header("keel-sequence", sequence)
            .body(value)
            .send()
    };
    // The follower's stream to the leader is open.
    assert!(append(1, "before").await.unwrap().status().is_success());

    cluster.nodes[&leader].signal("STOP");
    let paused = Instant::now();
    let mut answers = Vec::new();
    let offset = loop {
        let response = append(2, "while paused").await.unwrap();
        answers.push(response.status().as_u16());
        if response.status().is_success() {
            let body: serde_json::Value = response.json().await.unwrap();
            break body["first_offset"].as_u64().unwrap();
        }
        assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert!(paused.elapsed() < Duration::from_secs(10), "{answers:?}");
    };
    let took = paused.elapsed();
    cluster.nodes[&leader].signal("CONT");
    assert!(
        took < Duration::from_secs(3),
        "the write waited {took:?} for the paused leader ({answers:?})"
    );
    assert_eq!(offset, 1, "stored once, after the first");
}
