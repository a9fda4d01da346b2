//! `keel-bench`: drives keel's log service through named scenarios and reports
//! throughput and latency percentiles as a table and as JSON.
//!
//! ```text
//! cargo run --release -p keel-bench -- all --json target/bench-log.json
//! cargo run --release -p keel-bench -- produce --clients 16 --duration 10s
//! ```
//!
//! Unless `--addr` names a running service, each scenario starts a fresh log service
//! in this process, on its own runtime and threads, with data in a temp dir, bound to
//! 127.0.0.1:0. Every load is bounded by `--duration` (and a record count where it
//! applies) and stops by itself.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// The same allocator as the `keel` binary, so that a service this tool starts in
/// process runs as it would alone, and the clients pay no more for glibc's malloc
/// than the servers do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cpu;
mod engine;
mod failover;
mod keel;
mod peers;
mod raw;
mod registry;
mod report;
mod target;
mod tls;

use engine::Workload;
use report::Outcome;

#[derive(Debug, Parser)]
#[command(name = "keel-bench", about = "Load generator for keel's log service")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Settings every scenario shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// How long each measured run lasts.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Bytes of each record's value.
    #[arg(long, global = true, default_value_t = 100)]
    record_bytes: usize,
    /// Sync policy of the service this tool starts: always, interval:DURATION (e.g. interval:10ms) or never.
    #[arg(long, global = true, default_value = "always")]
    sync: String,
    /// Drive an already running service instead of starting one.
    #[arg(long, global = true)]
    addr: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Unary Produce from N concurrent clients (one connection each).
    Produce {
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
    /// ProduceStream: records pipelined on one stream, each acknowledged in order.
    ProduceStream {
        /// Records in flight (sent, not yet acknowledged) per stream.
        #[arg(long, default_value_t = 1024)]
        window: usize,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// ProduceBatch: many records per request.
    ProduceBatch {
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        clients: usize,
    },
    /// ConsumeBatchStream over a topic filled beforehand.
    Consume {
        /// Records written before the timed read.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
    },
    /// Unary Produce at a fixed rate (open loop): latency at a steady load.
    Latency {
        /// Records per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
    },
    /// The log service set: produce (1, 4, 16 clients), produce-stream,
    /// produce-batch, consume, and latency at 1000 records/s.
    All,
    /// The registry set: registrations/s, lookups/s, and notification latency, with
    /// 1 000 instances registered.
    Registry {
        /// 1: a single registry; 3 or 5: a Raft cluster in this process, written to
        /// and read from its followers.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// One workload against one system (keel or a peer) through the same code; prints
    /// one JSON line. bench/compare.sh drives this.
    Compare {
        /// keel (a running log service at --url host:port), nats (nats://...),
        /// redis (redis://...), or raw (a file in a temp dir: the physical limit).
        #[arg(long)]
        system: String,
        /// Where the system listens.
        #[arg(long, default_value = "")]
        url: String,
        /// produce:PRODUCERS, stream:PRODUCERS, batch:PRODUCERS, consume:RECORDS or
        /// latency:RATE.
        #[arg(long, value_parser = Workload::parse)]
        workload: Workload,
        /// Names this run's topic, stream or key, so runs never share data.
        #[arg(long)]
        run: String,
        /// A label for the system in the results (e.g. redis-always).
        #[arg(long)]
        label: Option<String>,
        /// Replicas of the run's NATS stream (3 on a 3-node NATS cluster). A keel
        /// cluster is given by all its addresses in --url (a,b,c).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// The server's process, whose CPU time per acknowledged record the result
        /// reports beside the load generator's (produce workloads).
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// TLS beside plaintext: the same workloads (produce-stream, produce-batch,
    /// produce with 4 clients, consume) against a plaintext service and a TLS one
    /// with a client certificate, alternating, ROUNDS times each; prints each
    /// workload's median rates and the median of the per-round TLS/plaintext ratios.
    Tls {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A 3-node cluster of `keel log serve` processes under a steady produce load:
    /// kill the leader with SIGKILL, time until the next acknowledged write; restart
    /// it, and again.
    Failover {
        /// The keel binary to run the nodes with.
        #[arg(long, default_value = "target/release/keel")]
        keel: String,
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Closed-loop producers (unary Produce, idempotent, following the leader).
        #[arg(long, default_value_t = 4)]
        producers: usize,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("bad duration {text:?}: {err}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = cli.common;
    let sync: keel_log::SyncPolicy = common.sync.parse().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    if let Scenario::Compare { .. } = &cli.scenario {
        return compare_report(&runtime, &cli.scenario, &common);
    }
    if let Scenario::Failover {
        keel,
        trials,
        producers,
    } = &cli.scenario
    {
        return failover_report(&runtime, keel, *trials, *producers, &common);
    }
    if let Scenario::Tls { rounds } = cli.scenario {
        return tls::run(&runtime, rounds, sync, &common);
    }
    if let Scenario::Registry { nodes } = cli.scenario {
        let outcomes = runtime.block_on(async {
            anyhow::Ok(vec![
                registry::registrations(&common, nodes).await?,
                registry::lookups(&common, nodes).await?,
                registry::notification_latency(&common, nodes).await?,
            ])
        })?;
        return finish(&outcomes, &common);
    }
    let workloads = match cli.scenario {
        Scenario::Produce { clients } => vec![Workload::Produce { producers: clients }],
        Scenario::ProduceStream { window, streams } => vec![Workload::Stream {
            producers: streams,
            window,
        }],
        Scenario::ProduceBatch { batch, clients } => vec![Workload::Batch {
            producers: clients,
            batch,
        }],
        Scenario::Consume { records } => vec![Workload::Consume { records }],
        Scenario::Latency { rate } => vec![Workload::Latency { rate }],
        Scenario::All => all_workloads(),
        Scenario::Registry { .. }
        | Scenario::Compare { .. }
        | Scenario::Failover { .. }
        | Scenario::Tls { .. } => Vec::new(),
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (n, workload) in workloads.into_iter().enumerate() {
        eprintln!("running {}", workload.name());
        let target = target::Target::start(common.addr.as_deref(), sync)?;
        let keel = keel::Keel {
            addr: target.addr.clone(),
            topic: format!("bench-{n}"),
            credentials: keel_log::Credentials::default(),
        };
        let (bytes, duration) = (common.record_bytes, common.duration);
        let outcome = runtime.block_on(engine::run(&keel, workload, bytes, duration))?;
        drop(target);
        outcomes.push(outcome);
    }
    finish(&outcomes, &common)
}

/// Runs the failover scenario and prints (and with --json, writes) its figures.
fn failover_report(
    runtime: &tokio::runtime::Runtime,
    keel: &str,
    trials: usize,
    producers: usize,
    common: &Common,
) -> anyhow::Result<()> {
    let failover = runtime.block_on(failover::run(keel, trials, producers, common.record_bytes))?;
    println!(
        "failover over {} trials ({} producers): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        failover.trials.len(),
        failover.producers,
        failover.p50_ms,
        failover.p99_ms,
        failover.max_ms
    );
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_vec_pretty(&failover)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The log service set of `keel-bench all`.
fn all_workloads() -> Vec<Workload> {
    let (batch, window) = (engine::BATCH, engine::WINDOW);
    vec![
        Workload::Produce { producers: 1 },
        Workload::Produce { producers: 4 },
        Workload::Produce { producers: 16 },
        Workload::Stream {
            producers: 1,
            window,
        },
        Workload::Stream {
            producers: 4,
            window,
        },
        Workload::Batch {
            producers: 1,
            batch,
        },
        Workload::Batch {
            producers: 4,
            batch,
        },
        Workload::Consume { records: 2_000_000 },
        Workload::Latency { rate: 1000 },
    ]
}

/// Runs `workload` on the system named `system`.
/// One run of `compare`: prints its JSON line, with the CPU time per record of the
/// server (when its PID is given) and of this load generator.
fn compare_report(
    runtime: &tokio::runtime::Runtime,
    scenario: &Scenario,
    common: &Common,
) -> anyhow::Result<()> {
    let Scenario::Compare {
        system,
        url,
        workload,
        run,
        label,
        replicas,
        server_pid,
    } = scenario
    else {
        anyhow::bail!("not a compare scenario");
    };
    let server = server_pid.map(cpu::Meter::start);
    let client = cpu::Meter::start(std::process::id());
    let outcome = runtime.block_on(compare_one(system, url, *workload, run, *replicas, common))?;
    // CPU per record means something where the run is all produce: a consume run
    // spends most of it filling the topic first.
    let produced = !matches!(workload, engine::Workload::Consume { .. });
    let per_record = |meter: Option<&cpu::Meter>| {
        meter
            .filter(|_| produced)
            .and_then(|m| m.per_record_us(outcome.records))
    };
    let line = serde_json::json!({
        "system": label.as_deref().unwrap_or(system),
        "workload": workload.name(),
        "record_bytes": common.record_bytes,
        "parameters": {
            "duration_s": common.duration.as_secs_f64(),
            "batch": engine::BATCH,
            "window": engine::WINDOW,
            "url": url,
            "run": run,
            "replicas": replicas,
        },
        "machine": report::Machine::read(),
        "result": outcome,
        "server_cpu_us_per_record": per_record(server.as_ref()),
        "client_cpu_us_per_record": per_record(Some(&client)),
    });
    println!("{line}");
    Ok(())
}

async fn compare_one(
    system: &str,
    url: &str,
    workload: Workload,
    run: &str,
    replicas: usize,
    common: &Common,
) -> anyhow::Result<Outcome> {
    let (bytes, duration) = (common.record_bytes, common.duration);
    match system {
        "keel" => {
            let keel = keel::Keel {
                addr: url.to_owned(),
                topic: format!("bench-{run}"),
                credentials: keel_log::Credentials::default(),
            };
            engine::run(&keel, workload, bytes, duration).await
        }
        "nats" => {
            let nats = peers::Nats::start(url, run, replicas).await?;
            engine::run(&nats, workload, bytes, duration).await
        }
        "redis" => {
            let redis = peers::Redis::start(url, run)?;
            engine::run(&redis, workload, bytes, duration).await
        }
        "raw" => {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).context("temp dir")?;
            let raw = raw::Raw::start(dir.path(), bytes)?;
            engine::run(&raw, workload, bytes, duration).await
        }
        other => anyhow::bail!("unknown system {other:?}: keel, nats, redis or raw"),
    }
}

/// Prints the table and writes the JSON.
pub(crate) fn finish(outcomes: &[Outcome], common: &Common) -> anyhow::Result<()> {
    let machine = report::Machine::read();
    println!("{}", report::table(outcomes, &machine, &common.sync));
    if let Some(path) = &common.json {
        let json =
            serde_json::json!({ "machine": machine, "sync": common.sync, "results": outcomes });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}
