//! Running a schedule of faults against a log cluster of real `keel log serve`
//! processes while clients append and read, then judging the history.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::checker::{Verdict, check};
use crate::cluster::{Cluster, Network, Service};
use crate::history::{FinalState, History, Op, OpKind, Outcome, RegistryState};
use crate::nemesis::{Dice, Nemesis, inject};

/// The topic the clients write.
pub(crate) const TOPIC: &str = "chaos";

/// How long a client keeps retrying one write before it records it as unknown.
pub(crate) const WRITE_PATIENCE: Duration = Duration::from_secs(10);

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
    /// Where the nodes run.
    pub network: Network,
    /// Makes the choices of victims and damaged bits repeatable.
    pub seed: u64,
    /// The service under test.
    pub service: Service,
    /// Whether the log's clients append as idempotent producers. Plain appends
    /// that are retried may be stored twice: the run counts duplicates then, but
    /// they are no violation.
    pub idempotent: bool,
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
    /// How many faults were injected (and healed).
    pub faults: usize,
    /// The longest time no append was acknowledged, in milliseconds.
    pub longest_unavailability_ms: u64,
    /// For each fault, the milliseconds from when it struck until an append first
    /// invoked after it was acknowledged: how long writes were refused.
    pub recoveries_ms: Vec<u64>,
    /// Where the nodes ran: `namespaces` or `loopback`.
    pub network: String,
}

/// The history being recorded, and when the run began.
pub(crate) struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub(crate) fn ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn push(&self, op: Op) {
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
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// One appending client: unique values, as an idempotent producer (unless
/// `idempotent` is false: plain appends), each retried on the next node (after
/// [`ATTEMPT_TIMEOUT`] at most) until acknowledged or [`WRITE_PATIENCE`] runs out.
async fn appender(
    process: u64,
    addrs: Vec<String>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    idempotent: bool,
) {
    let http = keel_serve::client::builder()
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
        let deadline = Instant::now() + WRITE_PATIENCE;
        let outcome = loop {
            next += 1;
            let addr = &addrs[next % addrs.len()];
            let mut request = http
                .post(format!("http://{addr}/v1/topics/{TOPIC}/records"))
                .header("content-type", "application/octet-stream");
            if idempotent {
                request = request
                    .header("keel-producer", producer)
                    .header("keel-sequence", sequence);
            }
            let answer = request.body(value.clone()).send().await;
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
    let http = keel_serve::client::builder()
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

/// The clients of `config.service`, recording into `recorder` until `stop`.
fn spawn_clients(
    config: &RunConfig,
    addrs: &[String],
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let addrs = addrs.to_vec();
    let mut clients = Vec::new();
    for process in 1..=config.clients as u64 {
        let (addrs, recorder, stop) = (addrs.clone(), Arc::clone(recorder), Arc::clone(stop));
        clients.push(match config.service {
            Service::Log => {
                tokio::spawn(appender(process, addrs, recorder, stop, config.idempotent))
            }
            Service::Registry => tokio::spawn(crate::registry_workload::registrar(
                process, addrs, recorder, stop,
            )),
        });
    }
    if config.service == Service::Log {
        clients.push(tokio::spawn(reader(
            0,
            addrs.clone(),
            Arc::clone(recorder),
            Arc::clone(stop),
        )));
    }

    clients
}

/// Reads every node once healed and checks `history` against what they hold: the
/// verdict, and the final state as JSON.
async fn judge(
    config: &RunConfig,
    cluster: &Cluster,
    http: &reqwest::Client,
    history: &History,
) -> std::io::Result<(Verdict, Vec<u8>)> {
    Ok(match config.service {
        Service::Log => {
            let read = async || {
                let mut state = FinalState::default();
                for node in &cluster.nodes {
                    let records = read_all(http, &node.addr).await.unwrap_or_default();
                    state.nodes.insert(node.name(), records);
                }
                state
            };
            let state = settled(read, FinalState::agrees).await;
            let mut verdict = check(history, &state);
            if !config.idempotent {
                verdict
                    .violations
                    .retain(|v| !matches!(v, crate::Violation::Duplicated { .. }));
            }
            (verdict, serde_json::to_vec_pretty(&state)?)
        }
        Service::Registry => {
            let nodes: Vec<(String, String)> = cluster
                .nodes
                .iter()
                .map(|node| (node.name(), node.addr.clone()))
                .collect();
            let read = async || crate::registry_workload::final_state(http, &nodes).await;
            let state = settled(read, RegistryState::agrees).await;
            (
                crate::registry_check::check_registry(history, &state),
                serde_json::to_vec_pretty(&state)?,
            )
        }
    })
}

/// How long the final reads may take to agree: an attempt a client gave up on can
/// still be committed after the run (held in a cut link's buffers until it healed,
/// then delivered), and a node read before it lands differs from one read after.
const SETTLE: Duration = Duration::from_secs(10);

/// Reads the final state until every node agrees, or [`SETTLE`] has passed: the
/// last read is the one judged (a divergence that lasts is a divergence).
async fn settled<S>(mut read: impl AsyncFnMut() -> S, agrees: impl Fn(&S) -> bool) -> S {
    let deadline = Instant::now() + SETTLE;
    loop {
        let state = read().await;
        if agrees(&state) || Instant::now() >= deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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
    let http = keel_serve::client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(std::io::Error::other)?;
    let mut cluster = Cluster::start(&config.keel, &config.dir, 3, config.network, config.service)
        .map_err(std::io::Error::other)?;
    if !cluster.ready(&http, Duration::from_secs(30)).await {
        return Err(std::io::Error::other(
            "the cluster did not become ready within 30 s",
        ));
    }
    let mut dice = Dice::new(config.seed);
    let recorder = Arc::new(Recorder {
        start: Instant::now(),
        ops: Mutex::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_clients(config, &cluster.addrs(), &recorder, &stop);

    let mut timeline = Vec::new();
    let mut fault_starts = Vec::new();
    let started = Instant::now();
    let mut round = 0usize;
    while round < config.nemeses.len() || started.elapsed() < config.time_limit {
        let nemesis = config.nemeses[round % config.nemeses.len()];
        round += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let first_event = timeline.len();
        let mut note = |what: String| {
            timeline.push(Event {
                at_ms: recorder.ms(),
                nemesis,
                what,
            });
        };
        if let Err(err) = inject(&mut cluster, nemesis, &mut dice, &mut note).await {
            stop.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other(format!("{}: {err}", nemesis.name())));
        }
        if let Some(event) = timeline.get(first_event) {
            fault_starts.push(event.at_ms);
        }
        cluster.ready(&http, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }

    // Healed: every node's contents, once it has applied everything committed.
    cluster.ready(&http, Duration::from_secs(30)).await;
    let mut ops = std::mem::take(&mut *recorder.ops.lock().unwrap_or_else(PoisonError::into_inner));
    ops.sort_by_key(|op| op.completed_ms);
    let history = History { ops };
    let (verdict, state) = judge(config, &cluster, &http, &history).await?;
    let report = Report {
        longest_unavailability_ms: longest_unavailability(&history),
        recoveries_ms: recoveries(&history, &fault_starts),
        verdict,
        timeline,
        faults: round,
        network: match config.network {
            Network::Namespaces => "namespaces".into(),
            Network::Loopback => "loopback".into(),
        },
    };
    history
        .write_jsonl(std::fs::File::create(config.dir.join("history.jsonl"))?)
        .map_err(std::io::Error::other)?;
    std::fs::write(config.dir.join("final-state.json"), state)?;
    std::fs::write(
        config.dir.join("verdict.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}

/// For each fault start, how long until an append invoked at or after it was
/// acknowledged (none: the run ended first, and the time to the end counts).
fn recoveries(history: &History, starts: &[u64]) -> Vec<u64> {
    let end = history
        .ops
        .iter()
        .map(|op| op.completed_ms)
        .max()
        .unwrap_or(0);
    starts
        .iter()
        .map(|&start| {
            history
                .ops
                .iter()
                .filter(|op| op.invoked_ms >= start && acknowledged_write(op))
                .map(|op| op.completed_ms)
                .min()
                .unwrap_or(end)
                .saturating_sub(start)
        })
        .collect()
}

/// Whether `op` is a write (an append, a registration or a deregistration) that
/// was acknowledged.
fn acknowledged_write(op: &Op) -> bool {
    matches!(
        (&op.kind, op.outcome),
        (
            OpKind::Append { .. } | OpKind::Register { .. } | OpKind::Deregister { .. },
            Outcome::Ok { .. }
        )
    )
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[u64], q: f64) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The longest time between two acknowledged writes (or from the start to the
/// first).
fn longest_unavailability(history: &History) -> u64 {
    let mut acked: Vec<u64> = history
        .ops
        .iter()
        .filter(|op| acknowledged_write(op))
        .map(|op| op.completed_ms)
        .collect();
    acked.sort_unstable();
    acked
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0)
}

/// A summary table of reports, one row per nemesis, in the order given.
pub fn summary(reports: &[(String, Report)]) -> String {
    let mut out = String::from(
        "| nemesis | faults | operations | acknowledged | lost | duplicated | divergent | stale reads | writes refused after a fault (max) | longest unavailability |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (name, report) in reports {
        let c = &report.verdict.counts;
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} ms | {} ms |\n",
            report.faults,
            c.operations,
            c.acknowledged,
            c.lost,
            c.duplicated,
            c.divergent,
            c.stale_reads,
            report.recoveries_ms.iter().max().copied().unwrap_or(0),
            report.longest_unavailability_ms
        ));
    }
    out
}
