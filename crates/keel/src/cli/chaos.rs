//! `keel chaos run`: each fault against a fresh cluster, the timeline as it goes,
//! a summary table (also written as `summary.md` and `summary.json`), and exit
//! code 1 when any run found a violation or could not go on.

use anyhow::anyhow;
use keel_chaos::{Kind, Nemesis, Network, Report, Service};

use super::{ChaosArgs, ChaosNetwork, ChaosService, Failure};

/// The faults that take the leader away (killed, paused, cut off).
const LEADER_LOSS: [&str; 5] = [
    "kill-leader",
    "pause-leader",
    "partition-leader",
    "partition-one-way",
    "link-down",
];

/// The faults `--nemesis` names.
fn schedule(text: &str) -> Result<Vec<Nemesis>, Failure> {
    let mut nemeses = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = match name {
            "all" => None,
            "process" => Some(Kind::Process),
            "network" => Some(Kind::Network),
            "disk" => Some(Kind::Disk),
            _ => {
                let nemesis = Nemesis::parse(name).ok_or_else(|| {
                    let known: Vec<&str> = Nemesis::ALL.iter().map(|n| n.name()).collect();
                    Failure::Config(anyhow!(
                        "--nemesis: no fault {name:?} (one of {}, or process, network, disk, all)",
                        known.join(", ")
                    ))
                })?;
                nemeses.push(nemesis);
                continue;
            }
        };
        nemeses.extend(
            Nemesis::ALL
                .into_iter()
                .filter(|n| kind.is_none_or(|kind| n.kind() == kind)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    nemeses.retain(|n| seen.insert(*n));
    if nemeses.is_empty() {
        return Err(Failure::Config(anyhow!("--nemesis names no fault")));
    }
    Ok(nemeses)
}

/// Where the nodes run, as `--network` asks and the machine allows.
fn network(asked: ChaosNetwork) -> Result<Network, Failure> {
    match (asked, keel_chaos::namespaces_available()) {
        (ChaosNetwork::Loopback, _) => Ok(Network::Loopback),
        (_, Ok(())) => Ok(Network::Namespaces),
        (ChaosNetwork::Namespaces, Err(why)) => Err(Failure::Config(anyhow!(
            "--network namespaces: network namespaces cannot be made here ({why})"
        ))),
        (ChaosNetwork::Auto, Err(why)) => {
            println!(
                "network namespaces cannot be made here ({why}): the nodes run on 127.0.0.1, with process and disk faults only; network faults are skipped"
            );
            Ok(Network::Loopback)
        }
    }
}

/// Leaves out (saying so) the faults that need namespaces.
fn skip_network_faults(nemeses: &mut Vec<Nemesis>) -> Result<(), Failure> {
    let skipped: Vec<&str> = nemeses
        .iter()
        .filter(|n| n.kind() == Kind::Network)
        .map(|n| n.name())
        .collect();
    if !skipped.is_empty() {
        println!("skipped (no namespaces): {}", skipped.join(", "));
    }
    nemeses.retain(|n| n.kind() != Kind::Network);
    if nemeses.is_empty() {
        return Err(Failure::Config(anyhow!(
            "every fault asked for needs network namespaces"
        )));
    }
    Ok(())
}

/// Each fault against each service asked for, where it applies (saying which do
/// not).
fn plan(args: &ChaosArgs, nemeses: &[Nemesis]) -> Result<Vec<(Service, Nemesis)>, Failure> {
    let services: &[Service] = match args.service {
        ChaosService::Log => &[Service::Log],
        ChaosService::Registry => &[Service::Registry],
        ChaosService::All => &[Service::Log, Service::Registry],
    };
    let runs: Vec<(Service, Nemesis)> = services
        .iter()
        .flat_map(|service| nemeses.iter().map(move |nemesis| (*service, *nemesis)))
        .filter(|(service, nemesis)| {
            let applies = nemesis.applies_to(*service);
            if !applies {
                println!(
                    "skipped: {} does not apply to the {} (it has no topics)",
                    nemesis.name(),
                    service.name()
                );
            }
            applies
        })
        .collect();
    if runs.is_empty() {
        return Err(Failure::Config(anyhow!(
            "--nemesis {} --service {}: no fault asked for applies to the service",
            args.nemesis,
            services
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    Ok(runs)
}

pub(super) async fn run(args: ChaosArgs) -> Result<(), Failure> {
    let mut nemeses = schedule(&args.nemesis)?;
    let network = network(args.network)?;
    if network == Network::Loopback {
        skip_network_faults(&mut nemeses)?;
    }
    let keel = std::env::current_exe()
        .map_err(|err| Failure::Run(anyhow!("finding the keel binary: {err}")))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let seed = args.seed.unwrap_or(stamp);
    let dir = args.dir.join(format!("run-{stamp}"));
    let runs = plan(&args, &nemeses)?;
    let share = args.time_limit / u32::try_from(runs.len()).unwrap_or(u32::MAX).max(1);
    println!(
        "{} runs (faults by service), {:?} each, nodes on {}, seed {seed}",
        runs.len(),
        share,
        match network {
            Network::Namespaces => "network namespaces",
            Network::Loopback => "127.0.0.1",
        }
    );

    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut failures = Vec::new();
    for (round, (service, nemesis)) in (0u64..).zip(&runs) {
        let name = format!("{}/{}", service.name(), nemesis.name());
        let config = keel_chaos::RunConfig {
            keel: keel.clone(),
            dir: dir.join(service.name()).join(nemesis.name()),
            nemeses: vec![*nemesis],
            time_limit: share,
            clients: args.clients.max(1),
            network,
            seed: seed.wrapping_add(round),
            service: *service,
            idempotent: !args.plain_producers,
        };
        let outcome = tokio::select! {
            outcome = keel_chaos::run(&config) => outcome,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the run stops its nodes and removes its namespaces.
                return Err(Failure::Run(anyhow!("interrupted; the runs so far are in {}", dir.display())));
            }
        };
        match outcome {
            Ok(report) => {
                print_run(&name, &report);
                if !report.verdict.passed() {
                    failures.push(format!(
                        "{name}: {} violations",
                        report.verdict.violations.len()
                    ));
                }
                reports.push((name, report));
            }
            Err(err) => {
                println!("FAILED ({name}): {err}");
                failures.push(format!("{name}: {err}"));
            }
        }
    }

    let table = keel_chaos::summary(&reports);
    println!("\n{table}");
    print_leader_loss(&reports);
    if let Err(err) = write_summary(&dir, &table, &reports) {
        failures.push(format!("writing the summary: {err}"));
    }
    println!(
        "histories, timelines, verdicts and the summary in {}",
        dir.display()
    );
    if failures.is_empty() {
        if args.plain_producers {
            let twice: usize = reports
                .iter()
                .map(|(_, report)| report.verdict.counts.duplicated)
                .sum();
            println!(
                "PASSED: no acknowledged write lost, replicas identical, no stale read ({twice} values stored twice by plain retries, which only producer ids prevent)"
            );
        } else {
            println!(
                "PASSED: no acknowledged write lost or duplicated, replicas identical, no stale read"
            );
        }
        Ok(())
    } else {
        Err(Failure::Run(anyhow!("{}", failures.join("; "))))
    }
}

/// Writes `summary.md` (the table) and `summary.json` (the figures by fault).
fn write_summary(
    dir: &std::path::Path,
    table: &str,
    reports: &[(String, Report)],
) -> std::io::Result<()> {
    let json: serde_json::Map<String, serde_json::Value> = reports
        .iter()
        .map(|(name, report)| {
            let value = serde_json::json!({
                "faults": report.faults,
                "network": report.network,
                "counts": report.verdict.counts,
                "violations": report.verdict.violations.len(),
                "longest_unavailability_ms": report.longest_unavailability_ms,
                "recoveries_ms": report.recoveries_ms,
            });
            (name.clone(), value)
        })
        .collect();
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("summary.md"), table)?;
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&json)?)
}

/// One run's faults as they happened, and its violations.
fn print_run(name: &str, report: &Report) {
    for event in &report.timeline {
        println!("{:>7} ms  {name:<27} {}", event.at_ms, event.what);
    }
    for violation in &report.verdict.violations {
        println!(
            "VIOLATION ({name}): {}",
            serde_json::to_string(violation).unwrap_or_default()
        );
    }
}

/// How long writes were refused after the faults that take the leader away.
fn print_leader_loss(reports: &[(String, Report)]) {
    let leader_loss: Vec<u64> = reports
        .iter()
        .filter(|(name, _)| LEADER_LOSS.contains(&name.rsplit('/').next().unwrap_or_default()))
        .flat_map(|(_, report)| report.recoveries_ms.iter().copied())
        .collect();
    if let (Some(p50), Some(p99)) = (
        keel_chaos::quantile(&leader_loss, 0.5),
        keel_chaos::quantile(&leader_loss, 0.99),
    ) {
        println!(
            "leader lost ({}): writes accepted again after p50 {p50} ms, p99 {p99} ms ({} faults)\n",
            LEADER_LOSS.join(", "),
            leader_loss.len()
        );
    }
}
