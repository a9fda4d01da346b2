//! Registry scenarios: registrations/s, lookups/s, and notification latency, with
//! 1 000 instances registered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::Common;
use crate::report::Outcome;

/// Instances registered before the lookup and notification scenarios.
const POPULATION: usize = 1000;
/// Concurrent HTTP clients of the throughput scenarios.
const CLIENTS: usize = 16;
/// Notifications timed.
const NOTIFICATIONS: usize = 300;

/// A registry in this process, on its own two-thread runtime; stopped on drop.
pub(crate) struct RegistryTarget {
    pub(crate) url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegistryTarget {
    pub(crate) fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let config = keel_registry::RegistryConfig {
            // The population has no heartbeat URLs; checks would only add noise.
            check_interval: Duration::from_secs(3600),
            ..keel_registry::RegistryConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("registry-under-test".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                else {
                    eprintln!("cannot start the registry's runtime");
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    if let Err(err) = keel_registry::run(listener, config, async move {
                        let _ = stopped.await;
                    })
                    .await
                    {
                        eprintln!("the registry failed: {err}");
                    }
                });
            })?;
        Ok(Self {
            url,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RegistryTarget {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

fn micros(elapsed: Duration) -> u64 {
    elapsed.as_micros().clamp(1, 60_000_000) as u64
}

fn instance(service: usize, port: usize) -> serde_json::Value {
    serde_json::json!({"name": format!("svc{service}"), "addr": format!("127.0.0.1:{}", 10_000 + port)})
}

async fn populate(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for i in 0..POPULATION {
        client
            .post(format!("{url}/services"))
            .json(&instance(i % 100, i))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Registrations (updates of the population) from concurrent clients.
pub(crate) async fn registrations(common: &Common) -> anyhow::Result<Outcome> {
    let target = RegistryTarget::start()?;
    let deadline = Instant::now() + common.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let url = target.url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = histogram()?;
            let mut i = worker;
            while Instant::now() < deadline {
                let sent = Instant::now();
                client
                    .post(format!("{url}/services"))
                    .json(&instance(i % 100, i % POPULATION))
                    .send()
                    .await?
                    .error_for_status()?;
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
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        format!("registry: registrations, {CLIENTS} clients"),
        all.len(),
        0,
        seconds,
        Some((&all, "answer")),
    ))
}

/// Lookups of one service's instances, 1 000 instances registered.
pub(crate) async fn lookups(common: &Common) -> anyhow::Result<Outcome> {
    let target = RegistryTarget::start()?;
    populate(&reqwest::Client::new(), &target.url).await?;
    let deadline = Instant::now() + common.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let url = target.url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = histogram()?;
            let mut i = worker;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let body = client
                    .get(format!("{url}/v1/services/svc{}", i % 100))
                    .send()
                    .await?
                    .bytes()
                    .await?;
                anyhow::ensure!(body.len() > 2, "a lookup returned no instances");
                latencies.record(micros(sent.elapsed()))?;
                i += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = histogram()?;
    for task in tasks {
        all.add(task.await??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome::new(
        format!("registry: lookups, {CLIENTS} clients, {POPULATION} instances"),
        all.len(),
        0,
        seconds,
        Some((&all, "answer")),
    ))
}

/// From registering an instance of a required service to the dependent receiving
/// the `POST`, 1 000 instances registered.
pub(crate) async fn notification_latency(_common: &Common) -> anyhow::Result<Outcome> {
    let target = RegistryTarget::start()?;
    let client = reqwest::Client::new();
    populate(&client, &target.url).await?;

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
        .post(format!("{}/services", target.url))
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
            .post(format!("{}/services", target.url))
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
        format!("registry: notification latency, {POPULATION} instances"),
        latencies.len(),
        0,
        seconds,
        Some((&latencies, "registration to POST")),
    ))
}
