//! The cluster under test: real `keel log serve` processes, each with its data
//! directory under the run's directory, on their own hosts (network namespaces) or,
//! where those cannot be made, on 127.0.0.1 ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::Net;

/// The port every node listens on inside its own namespace.
const NODE_PORT: u16 = 7000;

/// A topic's segment size on the nodes: small, so that a run seals segments (and a
/// fault can damage a sealed one).
pub(crate) const SEGMENT_BYTES: &str = "4KiB";

/// Entries between checkpoints on the nodes: few, so that the topics' files (not
/// only the Raft log) hold acknowledged records when a fault damages them.
const SNAPSHOT_EVERY: &str = "200";

/// The replicated service under test.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// `keel log serve`: appends and reads of a topic.
    Log,
    /// `keel registry serve`: registrations, deregistrations and lookups.
    Registry,
}

impl Service {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Registry => "registry",
        }
    }
}

/// Where the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// One network namespace per node, joined by a bridge: partitions possible.
    Namespaces,
    /// Every node on 127.0.0.1: process and disk faults only.
    Loopback,
}

/// A node of the cluster under test.
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) addr: String,
    pub(crate) dir: PathBuf,
    /// The namespace it runs in, if any.
    namespace: Option<String>,
    child: Option<Child>,
}

impl Node {
    pub(crate) fn name(&self) -> String {
        format!("node{}", self.id)
    }

    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub(crate) struct Cluster {
    keel: PathBuf,
    service: Service,
    peers: String,
    pub(crate) nodes: Vec<Node>,
    /// The namespaces, when the nodes have them (removed on drop, after the nodes).
    pub(crate) net: Option<Net>,
}

impl Cluster {
    pub(crate) fn start(
        keel: &Path,
        dir: &Path,
        size: usize,
        network: Network,
        service: Service,
    ) -> Result<Self, String> {
        let (net, addrs) = match network {
            Network::Namespaces => {
                let net = Net::create(size)?;
                let addrs = (0..size)
                    .map(|at| format!("{}:{NODE_PORT}", net.ip(at)))
                    .collect();
                (Some(net), addrs)
            }
            Network::Loopback => {
                let addrs = (0..size)
                    .map(|_| {
                        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                        Ok(format!("127.0.0.1:{}", listener.local_addr()?.port()))
                    })
                    .collect::<std::io::Result<Vec<String>>>()
                    .map_err(|err| format!("choosing ports: {err}"))?;
                (None, addrs)
            }
        };
        let peers = (1u64..)
            .zip(&addrs)
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (1u64..)
            .zip(addrs)
            .enumerate()
            .map(|(at, (id, addr))| Node {
                id,
                addr,
                dir: dir.join(format!("node{id}")),
                namespace: net.as_ref().map(|net| net.namespace(at)),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            keel: keel.to_path_buf(),
            service,
            peers,
            nodes,
            net,
        };
        for at in 0..size {
            cluster
                .spawn(at)
                .map_err(|err| format!("starting node {}: {err}", at + 1))?;
        }
        Ok(cluster)
    }

    pub(crate) fn spawn(&mut self, at: usize) -> std::io::Result<()> {
        let node = &mut self.nodes[at];
        std::fs::create_dir_all(&node.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.with_extension("log"))?;
        let mut command = match &node.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(&self.keel);
                command
            }
            None => Command::new(&self.keel),
        };
        command
            .args([self.service.name(), "serve", "--addr", &node.addr])
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--node-id", &node.id.to_string(), "--peers", &self.peers])
            .args(["--snapshot-every", SNAPSHOT_EVERY]);
        if self.service == Service::Log {
            command.args(["--segment-bytes", SEGMENT_BYTES]);
        }
        let child = command
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    pub(crate) fn kill(&mut self, at: usize) {
        if let Some(mut child) = self.nodes[at].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether node `at` was started and has exited since (it refused to run).
    pub(crate) fn exited(&mut self, at: usize) -> Option<std::process::ExitStatus> {
        self.nodes[at]
            .child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    pub(crate) fn signal(&self, at: usize, signal: rustix::process::Signal) {
        // `ip netns exec` execs keel: the child's pid is the node's.
        if let Some(child) = &self.nodes[at].child
            && let Some(pid) = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    pub(crate) fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The index of the node that leads, as a running node says (over Raft's
    /// admin call, which both services serve).
    pub(crate) async fn leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.running()) {
            let ask = async {
                let mut admin = keel_raft::membership::admin(&node.addr).await.ok()?;
                admin
                    .status(keel_proto::raft::v1::ClusterStatusRequest {})
                    .await
                    .ok()
                    .map(tonic::Response::into_inner)
            };
            let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(1), ask).await else {
                continue;
            };
            if let Some(at) = self.nodes.iter().position(|n| n.id == status.leader_id) {
                return Some(at);
            }
        }
        None
    }

    /// Waits until every node answers `/readyz`.
    pub(crate) async fn ready(&self, http: &reqwest::Client, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        for node in &self.nodes {
            loop {
                let ready = http
                    .get(format!("http://{}/readyz", node.addr))
                    .send()
                    .await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        true
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for at in 0..self.nodes.len() {
            self.signal(at, rustix::process::Signal::CONT);
            self.kill(at);
        }
    }
}
