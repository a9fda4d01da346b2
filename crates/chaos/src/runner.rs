//! Running a schedule of faults against a log cluster of real `keel log serve`
//! processes on loopback while clients append and read, then judging the history.
//!
//! This is the suite's process-fault mode (kill, pause): every node on 127.0.0.1,
//! each with its own data directory under the run's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::checker::{Verdict, check};
use crate::history::{FinalState, History, Op, OpKind, Outcome};

/// The topic the clients write.
const TOPIC: &str = "chaos";

/// How long a client keeps retrying one append before it records it as unknown.
const APPEND_PATIENCE: Duration = Duration::from_secs(10);

/// A fault, and how it heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// SIGKILL the leader; restart it after a while.
    KillLeader,
    /// SIGKILL a random node; restart it after a while.
    KillRandom,
    /// SIGKILL a majority; restart them after a while.
    KillMajority,
    /// SIGSTOP the leader for longer than an election; then SIGCONT.
    PauseLeader,
}

impl Nemesis {
    /// Every process fault.
    pub const ALL: [Self; 4] = [
        Self::KillLeader,
        Self::KillRandom,
        Self::KillMajority,
        Self::PauseLeader,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillLeader => "kill-leader",
            Self::KillRandom => "kill-random",
            Self::KillMajority => "kill-majority",
            Self::PauseLeader => "pause-leader",
        }
    }
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `keel` binary.
    pub keel: PathBuf,
    /// Where the run keeps the nodes' data, their logs, the history and the verdict.
    pub dir: PathBuf,
    /// The faults, in turn, as often as the time limit allows (each at least once).
    pub nemeses: Vec<Nemesis>,
    /// How long the faults go on; the run then heals and checks.
    pub time_limit: Duration,
    /// Concurrent appending clients.
    pub clients: usize,
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the run began.
    pub at_ms: u64,
    /// The fault.
    pub nemesis: Nemesis,
    /// What was done (`node 2 killed`, `restarted`).
    pub what: String,
}

/// What a run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The checker's judgement.
    pub verdict: Verdict,
    /// The faults, as they happened.
    pub timeline: Vec<Event>,
    /// The longest time no append was acknowledged, in milliseconds.
    pub longest_unavailability_ms: u64,
}

/// A node of the cluster under test.
struct Node {
    id: u64,
    addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

struct Cluster {
    keel: PathBuf,
    peers: String,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(keel: &Path, dir: &Path, size: usize) -> std::io::Result<Self> {
        let ports = (0..size)
            .map(|_| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                Ok(listener.local_addr()?.port())
            })
            .collect::<std::io::Result<Vec<u16>>>()?;
        let peers = (1u64..)
            .zip(&ports)
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            keel: keel.to_path_buf(),
            peers,
            nodes: (1u64..)
                .zip(&ports)
                .map(|(id, port)| Node {
                    id,
                    addr: format!("127.0.0.1:{port}"),
                    dir: dir.join(format!("node{id}")),
                    child: None,
                })
                .collect(),
        };
        for at in 0..size {
            cluster.spawn(at)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, at: usize) -> std::io::Result<()> {
        let node = &mut self.nodes[at];
        std::fs::create_dir_all(&node.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.with_extension("log"))?;
        let child = Command::new(&self.keel)
            .args(["log", "serve", "--addr", &node.addr])
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--node-id", &node.id.to_string(), "--peers", &self.peers])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    fn kill(&mut self, at: usize) {
        if let Some(mut child) = self.nodes[at].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, at: usize, signal: rustix::process::Signal) {
        if let Some(child) = &self.nodes[at].child
            && let Some(pid) = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The index of the node that leads, as a running node says.
    async fn leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(mut client) = keel_log_client::Client::connect(&node.addr).await else {
                continue;
            };
            let Ok(servers) = client.servers().await else {
                continue;
            };
            if let Some(leader) = servers.iter().find(|s| s.is_leader) {
                return self.nodes.iter().position(|n| n.addr == leader.rpc_addr);
            }
        }
        None
    }

    /// Waits until every node answers `/readyz`.
    async fn ready(&self, http: &reqwest::Client, limit: Duration) -> bool {
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

/// The history being recorded, and when the run began.
struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn push(&self, op: Op) {
        self.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(op);
    }
}

#[derive(Deserialize)]
struct Appended {
    first_offset: u64,
}

#[derive(Deserialize)]
struct Records {
    records: Vec<RecordText>,
    next_offset: u64,
}

#[derive(Deserialize)]
struct RecordText {
    offset: u64,
    #[serde(default)]
    text: Option<String>,
}

/// How long one attempt at an append may take before the client tries the next
/// node (a paused node never answers).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// One appending client: unique values, as an idempotent producer, each retried on
/// the next node (after [`ATTEMPT_TIMEOUT`] at most) until acknowledged or
/// [`APPEND_PATIENCE`] runs out.
async fn appender(
    process: u64,
    addrs: Vec<String>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .unwrap_or_default();
    let producer = keel_log_client::new_producer_id();
    let mut next = process as usize;
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        sequence += 1;
        let value = format!("{process}-{sequence}");
        let invoked_ms = recorder.ms();
        let deadline = Instant::now() + APPEND_PATIENCE;
        let outcome = loop {
            next += 1;
            let addr = &addrs[next % addrs.len()];
            let answer = http
                .post(format!("http://{addr}/v1/topics/{TOPIC}/records"))
                .header("content-type", "application/octet-stream")
                .header("keel-producer", producer)
                .header("keel-sequence", sequence)
                .body(value.clone())
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    match response.json::<Appended>().await {
                        Ok(appended) => {
                            break Outcome::Ok {
                                offset: Some(appended.first_offset),
                            };
                        }
                        Err(_) => break Outcome::Unknown,
                    }
                }
                Ok(response) if response.status().is_client_error() => break Outcome::Fail,
                _ if Instant::now() >= deadline => break Outcome::Unknown,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        recorder.push(Op {
            process,
            kind: OpKind::Append { value },
            invoked_ms,
            completed_ms: recorder.ms(),
            outcome,
        });
    }
}

/// Reads the whole topic from `addr`, page by page, linearizably.
async fn read_all(http: &reqwest::Client, addr: &str) -> Option<Vec<(u64, String)>> {
    let mut from = 0;
    let mut all = Vec::new();
    loop {
        let url = format!(
            "http://{addr}/v1/topics/{TOPIC}/records?from={from}&max=10000&consistency=linearizable"
        );
        let response = http.get(url).send().await.ok()?;
        if response.status() == reqwest::StatusCode::NOT_FOUND && from == 0 {
            return Some(all);
        }
        let page: Records = response.error_for_status().ok()?.json().await.ok()?;
        if page.records.is_empty() {
            return Some(all);
        }
        all.extend(
            page.records
                .into_iter()
                .map(|r| (r.offset, r.text.unwrap_or_default())),
        );
        from = page.next_offset;
    }
}

/// A reading client: linearizable reads of the whole topic from each node in turn.
async fn reader(process: u64, addrs: Vec<String>, recorder: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        next += 1;
        let invoked_ms = recorder.ms();
        if let Some(records) = read_all(&http, &addrs[next % addrs.len()]).await {
            recorder.push(Op {
                process,
                kind: OpKind::LinearizableRead {
                    values: records.into_iter().map(|(_, v)| v).collect(),
                },
                invoked_ms,
                completed_ms: recorder.ms(),
                outcome: Outcome::Ok { offset: None },
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `config`: starts the cluster, runs the clients and the faults, heals, reads
/// every node, checks, and writes `history.jsonl`, `timeline.json` and
/// `verdict.json` into `config.dir`.
///
/// # Errors
///
/// The cluster could not start, or the run's files could not be written. A failed
/// check is not an error: it is in the report.
pub async fn run(config: &RunConfig) -> std::io::Result<Report> {
    std::fs::create_dir_all(&config.dir)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(std::io::Error::other)?;
    let mut cluster = Cluster::start(&config.keel, &config.dir, 3)?;
    if !cluster.ready(&http, Duration::from_secs(30)).await {
        return Err(std::io::Error::other(
            "the cluster did not become ready within 30 s",
        ));
    }
    let recorder = Arc::new(Recorder {
        start: Instant::now(),
        ops: Mutex::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = cluster.addrs();
    let mut clients = Vec::new();
    for process in 1..=config.clients as u64 {
        clients.push(tokio::spawn(appender(
            process,
            addrs.clone(),
            Arc::clone(&recorder),
            Arc::clone(&stop),
        )));
    }
    clients.push(tokio::spawn(reader(
        0,
        addrs.clone(),
        Arc::clone(&recorder),
        Arc::clone(&stop),
    )));

    let mut timeline = Vec::new();
    let started = Instant::now();
    let mut round = 0usize;
    while round < config.nemeses.len() || started.elapsed() < config.time_limit {
        let nemesis = config.nemeses[round % config.nemeses.len()];
        round += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        inject(&mut cluster, nemesis, &recorder, &mut timeline).await?;
        cluster.ready(&http, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }

    // Healed: every node's contents, once it has applied everything committed.
    cluster.ready(&http, Duration::from_secs(30)).await;
    let mut state = FinalState::default();
    for node in &cluster.nodes {
        let records = read_all(&http, &node.addr).await.unwrap_or_default();
        state.nodes.insert(format!("node{}", node.id), records);
    }
    let mut ops = std::mem::take(&mut *recorder.ops.lock().unwrap_or_else(PoisonError::into_inner));
    ops.sort_by_key(|op| op.completed_ms);
    let history = History { ops };
    let verdict = check(&history, &state);
    let report = Report {
        longest_unavailability_ms: longest_unavailability(&history),
        verdict,
        timeline,
    };
    history
        .write_jsonl(std::fs::File::create(config.dir.join("history.jsonl"))?)
        .map_err(std::io::Error::other)?;
    std::fs::write(
        config.dir.join("final-state.json"),
        serde_json::to_vec_pretty(&state)?,
    )?;
    std::fs::write(
        config.dir.join("verdict.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}

/// Injects one fault and heals it.
async fn inject(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    recorder: &Recorder,
    timeline: &mut Vec<Event>,
) -> std::io::Result<()> {
    let mut note = |what: String| {
        timeline.push(Event {
            at_ms: recorder.ms(),
            nemesis,
            what,
        });
    };
    let leader = cluster.leader().await.unwrap_or(0);
    let size = cluster.nodes.len();
    let victims: Vec<usize> = match nemesis {
        Nemesis::KillLeader | Nemesis::PauseLeader => vec![leader],
        Nemesis::KillRandom => vec![(recorder.ms() as usize) % size],
        Nemesis::KillMajority => (0..size).filter(|at| *at != (leader + 1) % size).collect(),
    };
    let names: Vec<String> = victims
        .iter()
        .map(|at| format!("node{}", cluster.nodes[*at].id))
        .collect();
    if nemesis == Nemesis::PauseLeader {
        cluster.signal(leader, rustix::process::Signal::STOP);
        note(format!("{} paused", names.join(", ")));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.signal(leader, rustix::process::Signal::CONT);
        note(format!("{} resumed", names.join(", ")));
        return Ok(());
    }
    for at in &victims {
        cluster.kill(*at);
    }
    note(format!("{} killed", names.join(", ")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for at in victims {
        cluster.spawn(at)?;
    }
    note(format!("{} restarted", names.join(", ")));
    Ok(())
}

/// The longest time between two acknowledged appends (or from the start to the
/// first).
fn longest_unavailability(history: &History) -> u64 {
    let mut acked: Vec<u64> = history
        .ops
        .iter()
        .filter(|op| {
            matches!(
                (&op.kind, op.outcome),
                (OpKind::Append { .. }, Outcome::Ok { .. })
            )
        })
        .map(|op| op.completed_ms)
        .collect();
    acked.sort_unstable();
    acked
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0)
}

/// A summary table of reports, by nemesis.
pub fn summary(reports: &BTreeMap<String, Report>) -> String {
    let mut out = String::from(
        "| nemesis | operations | acknowledged | lost | duplicated | divergent | stale reads | longest unavailability |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (name, report) in reports {
        let c = &report.verdict.counts;
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} ms |\n",
            c.operations,
            c.acknowledged,
            c.lost,
            c.duplicated,
            c.divergent,
            c.stale_reads,
            report.longest_unavailability_ms
        ));
    }
    out
}
