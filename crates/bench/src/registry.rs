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
/// Concurrent HTTP clients of the throughput scenarios.
const CLIENTS: usize = 16;
/// Notifications timed.
const NOTIFICATIONS: usize = 300;

/// A registry in this process (see [`InProcess`]), with checks effectively off: the
/// population has no heartbeat URLs, so checks would only add noise.
fn start_registry() -> anyhow::Result<InProcess> {
    let config = keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        ..keel_registry::RegistryConfig::default()
    };
    InProcess::start("registry-under-test", move |listener, stopped| {
        keel_registry::run(listener, config, async move {
            let _ = stopped.await;
        })
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
            let client = reqwest::Client::new();
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
            .json(&instance(i % 100, i))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Registrations (updates of the population) from concurrent clients.
pub(crate) async fn registrations(common: &Common) -> anyhow::Result<Outcome> {
    let target = start_registry()?;
    let url = format!("http://{}", target.addr);
    let started = Instant::now();
    let all = closed_loops(started + common.duration, move |client, i| {
        let url = url.clone();
        async move {
            let body = instance(i % 100, i % POPULATION);
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
        format!("registry: registrations, {CLIENTS} clients"),
        all.len(),
        0,
        seconds,
        Some((&all, "answer")),
    ))
}

/// Lookups of one service's instances, 1 000 instances registered.
pub(crate) async fn lookups(common: &Common) -> anyhow::Result<Outcome> {
    let target = start_registry()?;
    let url = format!("http://{}", target.addr);
    populate(&reqwest::Client::new(), &url).await?;
    let started = Instant::now();
    let all = closed_loops(started + common.duration, move |client, i| {
        let url = url.clone();
        async move {
            let body = client
                .get(format!("{url}/v1/services/svc{}", i % 100))
                .send()
                .await?
                .bytes()
                .await?;
            anyhow::ensure!(body.len() > 2, "a lookup returned no instances");
            Ok(())
        }
    })
    .await?;
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
    let target = start_registry()?;
    let url = format!("http://{}", target.addr);
    let client = reqwest::Client::new();
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
        format!("registry: notification latency, {POPULATION} instances"),
        latencies.len(),
        0,
        seconds,
        Some((&latencies, "registration to POST")),
    ))
}
