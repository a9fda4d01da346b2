//! Failover: a 3-node cluster of `keel log serve` processes under a steady produce
//! load; the leader is killed with SIGKILL, and the time from the kill to the next
//! acknowledged write is measured, over many trials (the killed node restarts and
//! catches up between them).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_log::Client;
use tokio::sync::watch;

/// Acknowledgements this soon after the kill were on their way before it.
const ANSWERS_IN_FLIGHT: Duration = Duration::from_millis(10);

/// One node process.
struct NodeProcess {
    id: u64,
    addr: String,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The failover times measured, in trial order.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Failover {
    pub(crate) trials: Vec<f64>,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) producers: usize,
}

fn spawn(keel: &str, node: &NodeProcess, peers: &str) -> anyhow::Result<Child> {
    Command::new(keel)
        .args([
            "log",
            "serve",
            "--addr",
            &node.addr,
            "--node-id",
            &node.id.to_string(),
        ])
        .arg("--data-dir")
        .arg(&node.dir)
        .args(["--peers", peers, "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("KEEL_FAILOVER_LOGS") {
            Some(dir) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(std::path::Path::new(&dir).join(format!("node{}.log", node.id)))
                .map_or_else(|_| Stdio::null(), Stdio::from),
            None => Stdio::null(),
        })
        .spawn()
        .with_context(|| format!("starting {keel}"))
}

async fn wait_ready(addr: &str) -> anyhow::Result<()> {
    let http = keel_serve::client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{addr} not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `trials` failovers of a cluster of `keel` processes under `producers`
/// closed-loop producers of `record_bytes`-byte records.
pub(crate) async fn run(
    keel: &str,
    trials: usize,
    producers: usize,
    record_bytes: usize,
) -> anyhow::Result<Failover> {
    let work = tempfile::tempdir().context("temp dir")?;
    let (mut nodes, peers) = start_cluster(keel, work.path()).await?;
    let addrs = nodes
        .iter()
        .map(|n| n.addr.clone())
        .collect::<Vec<_>>()
        .join(",");

    // The load: every acknowledgement is published with its time.
    let (acked_tx, acked) = watch::channel(Instant::now());
    let acked_tx = Arc::new(acked_tx);
    let stop = Arc::new(AtomicBool::new(false));
    let value = bytes::Bytes::from(vec![b'x'; record_bytes]);
    let mut load = Vec::new();
    for _ in 0..producers {
        let (addrs, acked_tx, stop, value) = (
            addrs.clone(),
            Arc::clone(&acked_tx),
            Arc::clone(&stop),
            value.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut client = Client::connect(&addrs)
                .await?
                .retry_for(Duration::from_secs(30));
            while !stop.load(Ordering::Relaxed) {
                client.produce("failover", value.clone()).await?;
                acked_tx.send_replace(Instant::now());
            }
            anyhow::Ok(())
        }));
    }

    let mut times = Vec::with_capacity(trials);
    for trial in 0..trials {
        // Steady state: the load runs through a known leader.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = leader_of(&addrs).await?;
        let node = nodes
            .iter_mut()
            .find(|n| n.id == leader)
            .context("the leader is not a node of this cluster")?;
        let mut child = node.child.take().context("the leader is not running")?;
        let mut after = acked.clone();
        after.mark_unchanged();
        child.kill().context("SIGKILL")?;
        let killed = Instant::now();
        let _ = child.wait();
        // The next acknowledgement after the kill; answers already on their way
        // when it died (within ANSWERS_IN_FLIGHT) are not failover.
        let next = loop {
            tokio::time::timeout(Duration::from_secs(30), after.changed())
                .await
                .context("no write acknowledged within 30 s of the kill")?
                .context("the load stopped")?;
            let at = *after.borrow_and_update();
            if at > killed + ANSWERS_IN_FLIGHT {
                break at;
            }
        };
        let ms = next.duration_since(killed).as_secs_f64() * 1000.0;
        eprintln!(
            "trial {}/{trials}: node {leader} killed; next ack after {ms:.0} ms",
            trial + 1
        );
        times.push(ms);
        node.child = Some(spawn(keel, node, &peers)?);
        wait_ready(&node.addr).await?;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.context("producer")??;
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    };
    Ok(Failover {
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        trials: times,
        producers,
    })
}

/// Starts three nodes on free loopback ports under `work`; returns them and their
/// `--peers`.
async fn start_cluster(
    keel: &str,
    work: &std::path::Path,
) -> anyhow::Result<(Vec<NodeProcess>, String)> {
    let ports: Vec<u16> = {
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?
    };
    let mut nodes: Vec<NodeProcess> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| NodeProcess {
            id: i as u64 + 1,
            addr: format!("127.0.0.1:{port}"),
            dir: work.join(format!("node{}", i + 1)),
            child: None,
        })
        .collect();
    let peers = nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.addr))
        .collect::<Vec<_>>()
        .join(",");
    for node in &mut nodes {
        node.child = Some(spawn(keel, node, &peers)?);
    }
    for node in &nodes {
        wait_ready(&node.addr).await?;
    }
    Ok((nodes, peers))
}

/// The id of the node that leads, as any node of `addrs` reports it.
async fn leader_of(addrs: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect(addrs).await
            && let Ok(servers) = client.servers().await
            && let Some(leader) = servers.iter().find(|s| s.is_leader)
        {
            return leader.id.parse().context("a node id");
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
