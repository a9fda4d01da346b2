//! The SDK against a real registry on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use keel::service::{Discovery, Policy, Readiness, Service, ServiceConfig};
use keel_registry::RegistryConfig;
use tokio::sync::oneshot;

use crate::support::{eventually, start_log_service};

/// Short intervals; a timeout long enough that a busy machine's slow answer is not
/// taken for a failure (a stopped service refuses connections at once).
fn registry_config() -> RegistryConfig {
    RegistryConfig {
        check_interval: Duration::from_millis(200),
        check_timeout: Duration::from_secs(5),
        check_failures: 2,
        check_retry_delay: Duration::from_millis(50),
        deregister_after: Duration::from_millis(600),
        ..RegistryConfig::default()
    }
}

/// Runs a registry on `listener`; stopped when the sender is dropped or fired.
fn start_registry(listener: tokio::net::TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(keel_registry::run(
        listener,
        registry_config(),
        async move {
            let _ = stopped.await;
        },
    ));
    stop
}

struct Running {
    addr: SocketAddr,
    discovery: Discovery,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops in time")
            .unwrap();
    }
}

async fn start_service(name: &str, registry: &str, required: &[&str]) -> Running {
    let mut config = ServiceConfig::new(name, "127.0.0.1:0", registry);
    config.required_services = required.iter().map(|s| (*s).to_owned()).collect();
    start_config(config).await
}

/// Runs a service with `config` (short waits), answering `/` with its name.
async fn start_config(config: ServiceConfig) -> Running {
    start_with(config, None).await
}

/// As [`start_config`], registering only when `readiness` says ready, if given.
async fn start_with(mut config: ServiceConfig, readiness: Option<Readiness>) -> Running {
    config.watch_wait = Duration::from_millis(300);
    config.max_backoff = Duration::from_millis(200);
    let body = config.name.clone();
    let mut service = Service::new(config);
    if let Some(readiness) = readiness {
        service = service.with_readiness(readiness);
    }
    let discovery = service.discovery();
    let router = axum::Router::new().route("/", get(move || async move { body }));
    let (bound_tx, bound) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        service
            .run(
                router,
                move |addr| {
                    let _ = bound_tx.send(addr);
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("service runs");
    });
    let addr = bound.await.expect("bound");
    Running {
        addr,
        discovery,
        stop: Some(stop),
        task,
    }
}

async fn listed(registry: &str, name: &str) -> usize {
    instances(registry, name).await.len()
}

/// The registry's instances of `name`; none while it does not answer.
async fn instances(registry: &str, name: &str) -> Vec<serde_json::Value> {
    match keel_serve::client::new()
        .get(format!("{registry}/v1/services/{name}"))
        .send()
        .await
    {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_should_find_each_other_and_deregister_on_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("http://{}", listener.local_addr().unwrap());
    let _registry = start_registry(listener);

    let log = start_service("log", &registry, &[]).await;
    let visit = start_service("visit", &registry, &["log"]).await;
    let log_url = format!("http://{}", log.addr);
    eventually("visit discovers log", async || {
        visit
            .discovery
            .pick("log", Policy::RoundRobin)
            .is_some_and(|p| p.url == log_url)
    })
    .await;
    let picked = visit.discovery.pick("log", Policy::Random).unwrap();
    let body = keel_serve::client::new()
        .get(&picked.url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "log", "the picked URL serves the log service");
    drop(picked);

    log.stop().await;
    assert_eq!(
        listed(&registry, "log").await,
        0,
        "shutdown deregistered before it returned"
    );
    eventually("visit hears that log is gone", async || {
        visit.discovery.instances("log").is_empty()
    })
    .await;
    visit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_should_register_when_the_registry_comes_up_and_again_after_it_restarts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = format!("http://127.0.0.1:{port}");
    let service = start_service("grading", &registry, &[]).await;

    // The registry starts after the service: registration retries until it answers.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let first = start_registry(listener);
    eventually("registered once the registry is up", async || {
        listed(&registry, "grading").await == 1
    })
    .await;

    // The registry restarts empty: the service notices and registers again.
    drop(first);
    // The stopped registry releases its port once its open connections are done.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => break listener,
            Err(err) => assert!(Instant::now() < deadline, "port {port} never freed: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _second = start_registry(listener);
    eventually("registered again after the restart", async || {
        listed(&registry, "grading").await == 1
    })
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_should_reach_the_log_service_and_never_block_when_it_is_down() {
    use tracing_subscriber::layer::SubscriberExt;

    let (log_addr, _log) = start_log_service().await;

    let (layer, shipping) =
        keel::service::log_shipping("visit", &format!("http://{log_addr}"), 1000);
    {
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        for i in 0..10 {
            tracing::info!(visit = i, "visit counted");
        }
    }
    eventually("ten lines shipped", async || shipping.sent() == 10).await;
    let mut client = keel_log::Client::connect(&log_addr.to_string())
        .await
        .unwrap();
    let line = client.consume("logs", 3).await.unwrap();
    let text = String::from_utf8_lossy(&line.value);
    assert!(
        text.starts_with("INFO visit ")
            && text.contains("visit counted")
            && text.contains("visit=3"),
        "{text}"
    );

    // A log service that is down: logging never waits; past the buffer (100 lines)
    // and the batch in hand, lines are counted as dropped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (layer, shipping) = keel::service::log_shipping("visit", &format!("http://{closed}"), 100);
    let started = Instant::now();
    {
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        for i in 0..5_000 {
            tracing::info!(i, "busy");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "logging blocked for {:?}",
        started.elapsed()
    );
    eventually("dropped lines are counted", async || {
        shipping.dropped() >= 4_800
    })
    .await;
    assert_eq!(shipping.sent(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_log_shipping_should_follow_the_log_instance_discovery_offers() {
    use tracing_subscriber::layer::SubscriberExt;

    let (log_addr, _log) = start_log_service().await;

    let discovery = keel::service::Discovery::default();
    let (layer, shipping) =
        keel::service::log_shipping_discovered("grading", discovery.clone(), 1000);
    let subscriber = std::sync::Arc::new(tracing_subscriber::registry().with(layer));

    // No log instance known yet: lines wait in the buffer.
    tracing::subscriber::with_default(subscriber.clone(), || {
        for i in 0..3 {
            tracing::info!(i, "before the log service is known");
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((shipping.sent(), shipping.dropped()), (0, 0));

    discovery.add(keel::service::ServiceInstance {
        id: "log-1".into(),
        name: "log".into(),
        url: format!("http://{log_addr}"),
    });
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..5 {
            tracing::info!(i, "grade added");
        }
    });
    // The three that waited, then the five.
    eventually("the lines reach the discovered log service", async || {
        shipping.sent() == 8
    })
    .await;
    assert_eq!(shipping.dropped(), 0);
    let mut client = keel_log::Client::connect(&log_addr.to_string())
        .await
        .unwrap();
    let mut texts = Vec::new();
    for offset in 0..8 {
        let line = client.consume("logs", offset).await.unwrap();
        texts.push(String::from_utf8_lossy(&line.value).into_owned());
    }
    let waited = texts
        .iter()
        .filter(|t| t.contains("before the log service is known"))
        .count();
    let added: Vec<&String> = texts.iter().filter(|t| t.contains("grade added")).collect();
    assert_eq!((waited, added.len()), (3, 5), "{texts:?}");
    assert!(
        added.iter().all(|t| t.starts_with("INFO grading ")),
        "{texts:?}"
    );
}

/// A service listening on one address and reached at another (0.0.0.0 and its
/// service name, in a container) registers the address it advertises, and the
/// registry checks it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_should_register_the_address_it_advertises() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("http://{}", listener.local_addr().unwrap());
    let _registry = start_registry(listener);
    let port = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let mut config = ServiceConfig::new("advertised", format!("127.0.0.1:{port}"), &registry);
    config.advertise = Some(format!("localhost:{port}"));
    let service = start_config(config).await;
    eventually(
        "registered at its advertised address, and passing",
        async || {
            let listed = instances(&registry, "advertised").await;
            listed.len() == 1
                && listed[0]["url"] == format!("http://localhost:{port}")
                && listed[0]["health"] == "passing"
        },
    )
    .await;
    service.stop().await;
}

/// `advertise = "auto"`: the address on the route to the registry (here loopback),
/// with the bound port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_advertising_auto_should_register_its_address_on_the_route_to_the_registry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("http://{}", listener.local_addr().unwrap());
    let _registry = start_registry(listener);
    let mut config = ServiceConfig::new("auto", "127.0.0.1:0", &registry);
    config.advertise = Some("auto".into());
    let service = start_config(config).await;
    let url = format!("http://{}", service.addr);
    eventually("registered at 127.0.0.1 and its bound port", async || {
        let listed = instances(&registry, "auto").await;
        listed.len() == 1 && listed[0]["url"] == url
    })
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_should_register_only_while_it_is_ready_and_learn_its_requirements_before() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("http://{}", listener.local_addr().unwrap());
    let _registry = start_registry(listener);
    let log = start_service("log", &registry, &[]).await;

    let readiness = Readiness::not_ready("warming up");
    let mut config = ServiceConfig::new("grading", "127.0.0.1:0", &registry);
    config.required_services = vec!["log".into()];
    let grading = start_with(config, Some(readiness.clone())).await;
    let readyz = format!("http://{}/readyz", grading.addr);
    let http = keel_serve::client::new();

    // Not ready: it knows where the log service is, but nobody can find it.
    eventually("learns where log runs before it is ready", async || {
        grading.discovery.instances("log").len() == 1
    })
    .await;
    assert_eq!(
        listed(&registry, "grading").await,
        0,
        "registered while not ready"
    );
    let answer = http.get(&readyz).send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.text().await.unwrap().contains("warming up"));

    // Ready: registered, checked on /readyz.
    readiness.set_ready();
    eventually("registered once ready", async || {
        listed(&registry, "grading").await == 1
    })
    .await;
    let listed_as = &instances(&registry, "grading").await[0];
    assert_eq!(listed_as["heartbeat_url"], readyz.as_str(), "{listed_as}");
    assert_eq!(http.get(&readyz).send().await.unwrap().status(), 200);

    // Not ready again: its checks fail, the registry drops it, and it does not
    // register again until it is ready.
    readiness.set_not_ready("behind");
    eventually("dropped by its health checks", async || {
        listed(&registry, "grading").await == 0
    })
    .await;
    readiness.set_ready();
    eventually("registered again once ready", async || {
        listed(&registry, "grading").await == 1
    })
    .await;
    grading.stop().await;
    log.stop().await;
}
