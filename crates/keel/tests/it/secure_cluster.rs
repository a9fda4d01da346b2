//! A 3-node log cluster on mutual TLS, as `keel certs dev` and the `--tls-*` flags
//! set it up: Raft runs between nodes that present certificates of the cluster's
//! CA; a plaintext call, a certificate of another CA, or none at all, reaches no
//! node's Raft service, and a node with a stranger's certificate cannot join.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_log::{Client, Credentials};
use keel_raft::peer::PeerTls;

use crate::support::{KEEL, Served};

fn certs(dir: &Path, nodes: &[&str]) -> PathBuf {
    let out = dir.join("certs");
    let mut args = vec!["certs", "dev", "--out", out.to_str().unwrap()];
    for node in nodes {
        args.extend(["--node", node]);
    }
    let made = Command::new(KEEL).args(&args).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn node(id: u64, port: u16, dir: &Path, certs: &Path, membership: [&str; 2]) -> Served {
    let file = |name: String| certs.join(name).to_str().unwrap().to_owned();
    let name = format!("keel-{id}");
    let data = dir.join(format!("node-{id}"));
    Served::spawn(
        &[
            "log",
            "serve",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--node-id",
            &id.to_string(),
            membership[0],
            membership[1],
            "--tls-cert",
            &file(format!("{name}.pem")),
            "--tls-key",
            &file(format!("{name}.key")),
            "--tls-client-ca",
            &file("ca.pem".into()),
        ],
        &[],
    )
}

fn client_credentials(certs: &Path) -> Credentials {
    let files = keel_serve::tls::ClientTlsFiles {
        ca: certs.join("ca.pem"),
        identity: Some((certs.join("client.pem"), certs.join("client.key"))),
    };
    Credentials::default().with_tls(keel_serve::tls::client_config(&files, &[b"h2"]).unwrap())
}

fn node_tls(certs: &Path, name: &str) -> PeerTls {
    PeerTls::from_files(
        &certs.join("ca.pem"),
        &certs.join(format!("{name}.pem")),
        &certs.join(format!("{name}.key")),
    )
    .unwrap()
}

async fn voters(addr: &str, tls: &PeerTls) -> Option<Vec<u64>> {
    let mut admin = keel_raft::membership::admin_over(addr, Some(tls))
        .await
        .ok()?;
    let status = admin
        .status(keel_proto::raft::v1::ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    Some(
        status
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.node_id)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_should_run_over_mutual_tls_and_refuse_a_stranger() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path(), &["keel-1", "keel-2", "keel-3", "keel-4"]);
    let ports = free_ports(4);
    let peers: String = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", ports[id - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let _nodes: Vec<Served> = (1..=3)
        .map(|id| {
            node(
                id,
                ports[id as usize - 1],
                dir.path(),
                &certs,
                ["--peers", &peers],
            )
        })
        .collect();
    let addrs: String = (0..3)
        .map(|i| format!("localhost:{}", ports[i]))
        .collect::<Vec<_>>()
        .join(",");

    // Writes are replicated, so Raft works between the nodes over mutual TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if let Ok(mut client) = Client::connect_with(&addrs, client_credentials(&certs)).await
            && client.produce("secure", "replicated").await.is_ok()
        {
            break client;
        }
        assert!(Instant::now() < deadline, "no write accepted within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every node holds it (this client reads where it is connected).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.consume("secure", 0).await {
            Ok(record) => {
                assert_eq!(&record.value[..], b"replicated");
                break;
            }
            Err(err) => assert!(Instant::now() < deadline, "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = format!("127.0.0.1:{}", ports[0]);
    assert_eq!(
        voters(&first, &node_tls(&certs, "keel-1")).await,
        Some(vec![1, 2, 3])
    );

    // An operator with a client certificate of the cluster's CA sees the members.
    let file = |name: &str| certs.join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let status = Command::new(KEEL)
        .args(["cluster", "status", "--addr", &first, "--json"])
        .args(["--ca", &ca, "--cert", &cert, "--key", &key])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    let plain = Command::new(KEEL)
        .args(["cluster", "status", "--addr", &first])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // No certificate, another CA's, or plaintext: no node's Raft service answers.
    assert!(
        keel_raft::membership::admin(&first).await.is_err() || {
            let mut plain = keel_raft::membership::admin(&first).await.unwrap();
            plain
                .status(keel_proto::raft::v1::ClusterStatusRequest {})
                .await
                .is_err()
        }
    );
    let strangers = certs_elsewhere(dir.path());
    assert_eq!(voters(&first, &node_tls(&strangers, "keel-4")).await, None);

    // A node with a stranger's certificate asks to join, and is never let in.
    let joined = ["--join", &first];
    let _intruder = node(4, ports[3], dir.path(), &strangers, joined);
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let members = voters(&first, &node_tls(&certs, "keel-1")).await;
        assert_eq!(members, Some(vec![1, 2, 3]), "the stranger became a member");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Certificates of another CA, for the same node names.
fn certs_elsewhere(dir: &Path) -> PathBuf {
    let other = dir.join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    certs(&other, &["keel-4"])
}
