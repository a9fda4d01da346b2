//! TLS beside plaintext, measured in one run: each workload alternates between a
//! fresh plaintext service and a fresh TLS one (a certificate from a development CA,
//! the client presenting its own), so that the machine's drift falls on both; the
//! figure of merit is the median of the per-round TLS/plaintext ratios.

use keel_auth::mint::{Ca, Leaf};
use keel_log::{Credentials, SyncPolicy};
use keel_serve::tls::{ClientTlsFiles, ServerTlsFiles};

use crate::engine::{self, Workload};
use crate::keel::Keel;
use crate::target::Target;
use crate::{Common, finish, report::Outcome};

/// A development CA's files for a node on localhost and a client.
struct Pki {
    _dir: tempfile::TempDir,
    server: ServerTlsFiles,
    client: ClientTlsFiles,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("keel bench CA", 1)?;
        let node = ca.sign(&Leaf::node("keel-bench", 1))?;
        let client = ca.sign(&Leaf::client("bench", 1))?;
        let file = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let ca_file = file("ca.pem", &ca.cert_pem())?;
        Ok(Self {
            server: ServerTlsFiles {
                cert: file("node.pem", &node.cert_pem)?,
                key: file("node.key", &node.key_pem)?,
                client_ca: Some(ca_file.clone()),
            },
            client: ClientTlsFiles {
                ca: ca_file,
                identity: Some((
                    file("client.pem", &client.cert_pem)?,
                    file("client.key", &client.key_pem)?,
                )),
            },
            _dir: dir,
        })
    }
}

fn workloads() -> Vec<Workload> {
    vec![
        Workload::Stream {
            producers: 1,
            window: engine::WINDOW,
        },
        Workload::Batch {
            producers: 1,
            batch: engine::BATCH,
        },
        Workload::Produce { producers: 4 },
        Workload::Consume { records: 500_000 },
    ]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every workload `rounds` times on each side and prints the ratios.
pub(crate) fn run(
    runtime: &tokio::runtime::Runtime,
    rounds: usize,
    sync: SyncPolicy,
    common: &Common,
) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let tls =
        Credentials::default().with_tls(keel_serve::tls::client_config(&pki.client, &[b"h2"])?);
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut lines = Vec::new();
    for (n, workload) in workloads().into_iter().enumerate() {
        let (mut plain_rates, mut tls_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds.max(1) {
            eprintln!(
                "running {} (round {}): plaintext, then TLS",
                workload.name(),
                round + 1
            );
            let rate = |secure: bool| -> anyhow::Result<Outcome> {
                let target = Target::fresh(sync, secure.then(|| pki.server.clone()))?;
                let port = target
                    .addr
                    .rsplit(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let keel = Keel {
                    addr: format!("localhost:{port}"),
                    topic: format!("tls-{n}-{round}"),
                    credentials: if secure {
                        tls.clone()
                    } else {
                        Credentials::default()
                    },
                };
                let mut outcome = runtime.block_on(engine::run(
                    &keel,
                    workload,
                    common.record_bytes,
                    common.duration,
                ))?;
                outcome.scenario = format!(
                    "{} ({})",
                    outcome.scenario,
                    if secure { "TLS" } else { "plaintext" }
                );
                Ok(outcome)
            };
            let plain = rate(false)?;
            let secure = rate(true)?;
            plain_rates.push(plain.records_per_sec);
            tls_rates.push(secure.records_per_sec);
            ratios.push(secure.records_per_sec / plain.records_per_sec.max(f64::MIN_POSITIVE));
            outcomes.extend([plain, secure]);
        }
        lines.push(format!(
            "| {} | {:.0} | {:.0} | {:.2}x ({}) |",
            workload.name(),
            median(plain_rates),
            median(tls_rates),
            median(ratios.clone()),
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    finish(&outcomes, common)?;
    println!(
        "\n| workload | plaintext records/s (median) | TLS records/s (median) | TLS/plaintext (median; each round) |\n| --- | --- | --- | --- |"
    );
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
