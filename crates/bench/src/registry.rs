//! Registry scenarios: registrations/s, lookups/s, and notification latency, with
//! 1 000 instances registered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::Common;
use crate::engine::{histogram, micros};
use crate::report::Outcome;
use crate::target::InProcess;

/// Instances registered before the lookup and notification scenarios.
const POPULATION: usize = 1000;
/// Services the population is spread over (10 instances each).
const SERVICES: usize = 100;
/// Concurrent HTTP clients of the throughput scenarios.
const CLIENTS: usize = 16;
/// Notifications timed.
const NOTIFICATIONS: usize = 300;

/// The registry under test: one node, or the nodes of a cluster, each in this
/// process on its own runtime (see [`InProcess`]).
struct Registries {
    /// Where to send writes (a follower of a cluster: writes to any node work).
    write: String,
    /// Where to send lookups (a cluster's followers).
    read: Vec<String>,
    label: &'static str,
    _nodes: Vec<InProcess>,
    _data: Option<tempfile::TempDir>,
}

/// Checks effectively off: the population has no heartbeat URLs, so checks would
/// only add noise.
fn config() -> keel_registry::RegistryConfig {
    keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        ..keel_registry::RegistryConfig::default()
    }
}

/// A registry of `nodes` nodes (1: a single registry; 3 or 5: a Raft cluster).
async fn start_registry(nodes: usize) -> anyhow::Result<Registries> {
    if nodes <= 1 {
        let node = InProcess::start("registry-under-test", move |listener, stopped| {
            keel_registry::run(listener, config(), async move {
                let _ = stopped.await;
            })
        })?;
        let url = format!("http://{}", node.addr);
        return Ok(Registries {
            write: url.clone(),
            read: vec![url],
            label: "",
            _nodes: vec![node],
            _data: None,
        });
    }
    let data = tempfile::tempdir()?;
    let listeners = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut peers = std::collections::BTreeMap::new();
    for (n, listener) in listeners.iter().enumerate() {
        peers.insert(n as u64 + 1, listener.local_addr()?.to_string());
    }
    let mut started = Vec::new();
    for (n, listener) in listeners.into_iter().enumerate() {
        let id = n as u64 + 1;
        let dir = data.path().join(format!("node{id}"));
        let options = keel_raft::membership::ClusterOptions {
            node_id: id,
            advertise: peers[&id].clone(),
            membership: keel_raft::membership::Membership::Peers(peers.clone()),
            settings: keel_raft::NodeSettings::default(),
        };
        started.push(InProcess::start_on(
            &format!("registry-node-{id}"),
            listener,
            move |listener, stopped| async move {
                let config = config();
                let node = keel_registry::replica::start(&config, &dir, &options).await?;
                keel_registry::run_node(listener, config, node, async move {
                    let _ = stopped.await;
                })
                .await;
                anyhow::Ok(())
            },
        )?);
    }
    // Ready: a leader, every node caught up; then who leads.
    let client = keel_serve::client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &started {
        loop {
            let ready = client
                .get(format!("http://{}/readyz", node.addr))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the registry cluster is not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut admin = keel_raft::membership::admin(&started[0].addr).await?;
    let leader = admin
        .status(keel_proto::raft::v1::ClusterStatusRequest {})
        .await?
        .into_inner()
        .leader_id;
    let followers: Vec<String> = peers
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, addr)| format!("http://{addr}"))
        .collect();
    Ok(Registries {
        write: followers[0].clone(),
        read: followers,
        label: ", 3 nodes (writes and lookups on followers)",
        _nodes: started,
        _data: Some(data),
    })
}

/// Runs `CLIENTS` closed loops of `request(client, i)` until `deadline` and adds up
/// their latencies.
async fn closed_loops<F, Fut>(deadline: Instant, request: F) -> anyhow::Result<Histogram<u64>>
where
    F: Fn(reqwest::Client, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let client = keel_serve::client::new();
            let mut latencies = histogram()?;
            let mut i = worker;
            while Instant::now() < deadline {
                let sent = Instant::now();
                request(client.clone(), i).await?;
                latencies.record(micros(sent.elapsed()))?;
                i += CLIENTS;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = histogram()?;
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok(all)
}

fn instance(service: usize, port: usize) -> serde_json::Value {
    serde_json::json!({"name": format!("svc{service}"), "addr": format!("127.0.0.1:{}", 10_000 + port)})
}

async fn populate(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for i in 0..POPULATION {
        client
            .post(format!("{url}/services"))
            .json(&instance(i % SERVICES, i))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Registrations (updates of the population) from concurrent clients.
pub(crate) async fn registrations(common: &Common, nodes: usize) -> anyhow::Result<Outcome> {
    let target = start_registry(nodes).await?;
    let url = target.write.clone();
    let started = Instant::now();
    let all = closed_loops(started + common.duration, move |client, i| {
        let url = url.clone();
        async move {
            let body = instance(i % SERVICES, i % POPULATION);
            client
                .post(format!("{url}/services"))
                .json(&body)
                .send()
                .await?
                .error_for_status()?;
            Ok(())
        }
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        format!("registry: registrations, {CLIENTS} clients{}", target.label),
        all.len(),
        0,
        seconds,
        Some((&all, "answer")),
    ))
}

/// Lookups of one service's instances, 1 000 instances registered.
pub(crate) async fn lookups(common: &Common, nodes: usize) -> anyhow::Result<Outcome> {
    let target = start_registry(nodes).await?;
    populate(&keel_serve::client::new(), &target.write).await?;
    // Every read node has applied the population before the clock starts.
    for node in &target.read {
        keel_serve::client::new()
            .get(format!("{node}/v1/services?consistent"))
            .send()
            .await?
            .error_for_status()?;
    }
    // Every URL parsed once, before the clock starts: the run measures the
    // registry, not the load generator's URL parser.
    let urls: Arc<[Vec<reqwest::Url>]> = target
        .read
        .iter()
        .map(|node| {
            (0..SERVICES)
                .map(|n| reqwest::Url::parse(&format!("{node}/v1/services/svc{n}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let started = Instant::now();
    let all = closed_loops(started + common.duration, move |client, i| {
        let url = urls[i % urls.len()][i % SERVICES].clone();
        async move {
            let body = client.get(url).send().await?.bytes().await?;
            anyhow::ensure!(body.len() > 2, "a lookup returned no instances");
            Ok(())
        }
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        format!(
            "registry: lookups, {CLIENTS} clients, {POPULATION} instances{}",
            target.label
        ),
        all.len(),
        0,
        seconds,
        Some((&all, "answer")),
    ))
}

/// From registering an instance of a required service to the dependent receiving
/// the `POST`, 1 000 instances registered.
pub(crate) async fn notification_latency(
    _common: &Common,
    nodes: usize,
) -> anyhow::Result<Outcome> {
    let target = start_registry(nodes).await?;
    let url = target.write.clone();
    let client = keel_serve::client::new();
    populate(&client, &url).await?;

    // The dependent: records when each notification arrives.
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<Instant>();
    let arrivals = Arc::new(arrivals);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let dependent = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/services",
        axum::routing::post(move || {
            let arrivals = Arc::clone(&arrivals);
            async move {
                let _ = arrivals.send(Instant::now());
                "ok"
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let registration = serde_json::json!({"name": "watcher", "addr": dependent.to_string(),
        "required_services": ["target"], "update_url": format!("http://{dependent}/services")});
    client
        .post(format!("{url}/services"))
        .json(&registration)
        .send()
        .await?
        .error_for_status()?;

    let mut latencies = histogram()?;
    let started = Instant::now();
    for i in 0..NOTIFICATIONS {
        let sent = Instant::now();
        let body =
            serde_json::json!({"name": "target", "addr": format!("127.0.0.1:{}", 30_000 + i)});
        client
            .post(format!("{url}/services"))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        let at = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
            .await
            .context("a notification did not arrive within 10 s")?
            .context("the dependent stopped")?;
        latencies.record(micros(at.duration_since(sent)))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    server.abort();
    Ok(Outcome::new(
        format!(
            "registry: notification latency, {POPULATION} instances{}",
            target.label
        ),
        latencies.len(),
        0,
        seconds,
        Some((&latencies, "registration to POST")),
    ))
}
