//! Registration, notification, health and discovery over HTTP.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::Method;
use reqwest::StatusCode;
use serde_json::{Value, json};

use keel_registry::RegistryConfig;

use crate::support::{BlackHole, Instance, TestRegistry, fast_config};

fn http() -> reqwest::Client {
    keel_serve::client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn register(registry: &TestRegistry, body: &Value) -> Value {
    let response = http()
        .post(registry.url("/services"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn available(registry: &TestRegistry, name: &str) -> Vec<Value> {
    http()
        .get(registry.url(&format!("/v1/services/{name}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until `check` holds, with a deadline.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dependent_registered_after_its_dependency_should_get_it_in_the_answer_and_a_post() {
    let registry = TestRegistry::start(fast_config()).await;
    let log = Instance::start().await;
    let mut visit = Instance::start().await;
    assert_eq!(
        register(&registry, &log.dialect_a("log", &[])).await,
        json!({})
    );
    let answer = register(&registry, &visit.dialect_a("visit", &["log"])).await;
    assert_eq!(answer["log"][0]["url"], format!("http://{}", log.addr));
    let (method, instance) = visit.next().await;
    assert_eq!(
        (method, instance["name"].as_str()),
        (Method::POST, Some("log"))
    );
}

#[tokio::test]
async fn dependent_registered_first_should_be_told_when_the_dependency_appears_and_goes() {
    let registry = TestRegistry::start(fast_config()).await;
    let mut portal = Instance::start().await;
    let grading = Instance::start().await;
    let answer = register(&registry, &portal.dialect_a("portal", &["grading"])).await;
    assert_eq!(
        answer,
        json!({"grading": []}),
        "an empty list when none are available"
    );
    register(&registry, &grading.dialect_a("grading", &[])).await;
    let (method, instance) = portal.next().await;
    assert_eq!(
        (method, instance["id"].as_str()),
        (Method::POST, Some(grading.addr.to_string().as_str()))
    );

    let response = http()
        .delete(registry.url("/services"))
        .json(&grading.dialect_a("grading", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (method, instance) = portal.next().await;
    assert_eq!(
        (method, instance["name"].as_str()),
        (Method::DELETE, Some("grading"))
    );
    assert!(available(&registry, "grading").await.is_empty());
}

/// A write sent again under its `Idempotency-Key` is answered but not applied again
/// (a late copy of a registration must not bring back a deregistered instance); a
/// bad key is refused.
#[tokio::test]
async fn a_write_repeated_under_its_idempotency_key_should_be_applied_once() {
    let registry = TestRegistry::start(fast_config()).await;
    let body = json!({"name": "visit", "addr": "127.0.0.1:9"});
    let send = |key: &'static str, delete: bool| {
        let request = if delete {
            http().delete(registry.url("/v1/services/visit/127.0.0.1:9"))
        } else {
            http().post(registry.url("/services")).json(&body)
        };
        request.header("idempotency-key", key).send()
    };
    assert_eq!(send("w1", false).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send("w2", true).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send("w1", false).await.unwrap().status(), StatusCode::OK);
    assert!(
        available(&registry, "visit").await.is_empty(),
        "brought back"
    );
    assert_eq!(send("w3", false).await.unwrap().status(), StatusCode::OK);
    assert_eq!(available(&registry, "visit").await.len(), 1);

    // Too long, or not visible ASCII only (a space inside).
    for key in ["x".repeat(129), "a b".to_owned()] {
        let refused = http()
            .post(registry.url("/services"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        let error: Value = refused.json().await.unwrap();
        assert!(error.to_string().contains("Idempotency-Key"), "{error}");
    }
    // A name no instance can have is refused as such, even under a key already
    // answered (the key's earlier answer is not given for it).
    let refused = http()
        .delete(registry.url("/v1/services/%C2%84/127.0.0.1:9"))
        .header("idempotency-key", "w2")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
}

/// A redirect is not followed: an instance's heartbeat or update URL answering
/// `302`/`307` to an internal address must not turn the registry into a proxy that
/// reaches it (and a redirect is no healthy answer).
#[tokio::test]
async fn health_checks_and_notifications_should_not_follow_redirects() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    async fn serve(app: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let internal = serve(axum::Router::new().route(
        "/secret",
        axum::routing::any(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "secret" }
        }),
    ))
    .await;
    let to_secret = format!("http://{internal}/secret");
    let (found, temporary) = (to_secret.clone(), to_secret);
    let redirector = serve(
        axum::Router::new()
            .route(
                "/heart-beat",
                axum::routing::get(move || {
                    let found = found.clone();
                    async move { axum::response::Redirect::to(&found) }
                }),
            )
            .route(
                "/services",
                axum::routing::any(move || {
                    let temporary = temporary.clone();
                    async move { axum::response::Redirect::temporary(&temporary) }
                }),
            ),
    )
    .await;

    let registry = TestRegistry::start(fast_config()).await;
    register(
        &registry,
        &json!({"name": "peek", "addr": redirector.to_string(), "required_services": ["log"],
            "update_url": format!("http://{redirector}/services"),
            "heartbeat_url": format!("http://{redirector}/heart-beat")}),
    )
    .await;
    // A notification to its update URL, and health checks of its heartbeat URL.
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    eventually("peek no longer available", async || {
        available(&registry, "peek").await.is_empty()
    })
    .await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the registry followed a redirect"
    );
}

#[tokio::test]
async fn registering_twice_should_update_not_duplicate() {
    let registry = TestRegistry::start(fast_config()).await;
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    register(&registry, &log.dialect_a("log", &[])).await;
    assert_eq!(available(&registry, "log").await.len(), 1);
}

#[tokio::test]
async fn canonical_and_dialect_b_registrations_should_be_accepted() {
    let registry = TestRegistry::start(fast_config()).await;
    let a = Instance::start().await;
    let b = Instance::start().await;
    let canonical = json!({"name": "grading", "addr": a.addr.to_string(), "meta": {"version": "1"},
        "heartbeat_url": format!("http://{}/heart-beat", a.addr)});
    register(&registry, &canonical).await;
    let dialect_b = json!({"ServiceName": "grading", "ServiceURL": format!("http://{}", b.addr),
        "RequiredServices": [], "ServiceUpdateURL": format!("http://{}/services", b.addr),
        "HeartbeatURL": format!("http://{}/heart-beat", b.addr)});
    register(&registry, &dialect_b).await;
    let instances = available(&registry, "grading").await;
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().any(|i| i["meta"]["version"] == "1"));
    let response = http()
        .delete(registry.url(&format!("/v1/services/grading/{}", b.addr)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(available(&registry, "grading").await.len(), 1);
}

#[tokio::test]
async fn dead_instance_should_turn_critical_notify_dependents_and_be_removed() {
    let registry = TestRegistry::start(fast_config()).await;
    let log = Instance::start().await;
    let mut visit = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    register(&registry, &visit.dialect_a("visit", &["log"])).await;
    assert_eq!(visit.next().await.0, Method::POST);

    log.healthy.store(false, Ordering::SeqCst);
    let failed_at = Instant::now();
    let (method, instance) = visit.next().await;
    assert_eq!(
        (method, instance["health"].as_str()),
        (Method::DELETE, Some("critical"))
    );
    // Within check interval x (failures, with their retry delay), plus slack.
    assert!(
        failed_at.elapsed() < Duration::from_secs(3),
        "took {:?}",
        failed_at.elapsed()
    );
    assert!(available(&registry, "log").await.is_empty());
    let all: Vec<Value> = http()
        .get(registry.url("/v1/services/log?all=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "critical but not yet removed");

    eventually(
        "the critical instance is removed after deregister_after",
        async || {
            let all: Vec<Value> = http()
                .get(registry.url("/v1/services/log?all=true"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            all.is_empty()
        },
    )
    .await;
}

#[tokio::test]
async fn recovered_instance_should_pass_again_and_healthy_ones_should_never_be_dropped() {
    let registry = TestRegistry::start(fast_config()).await;
    let flaky = Instance::start().await;
    let steady = Instance::start().await;
    let mut watcher = Instance::start().await;
    register(&registry, &flaky.dialect_a("log", &[])).await;
    register(&registry, &steady.dialect_a("log", &[])).await;
    register(&registry, &watcher.dialect_a("visit", &["log"])).await;
    watcher.next().await;
    watcher.next().await;

    flaky.healthy.store(false, Ordering::SeqCst);
    assert_eq!(watcher.next().await.0, Method::DELETE);
    flaky.healthy.store(true, Ordering::SeqCst);
    let (method, instance) = watcher.next().await;
    assert_eq!(
        (method, instance["health"].as_str()),
        (Method::POST, Some("passing"))
    );
    // Several more rounds of checks (three of each instance): both stay.
    let before = registry.checks_made().await;
    eventually("three more rounds of checks", async || {
        registry.checks_made().await >= before + 9
    })
    .await;
    assert_eq!(available(&registry, "log").await.len(), 2);
}

#[tokio::test]
async fn unreachable_dependent_should_not_delay_the_others() {
    // Each notification of the ghost would take a minute: were dependents notified
    // one after the other, visit would wait past the ten seconds `next` allows.
    let registry = TestRegistry::start(RegistryConfig {
        notify_timeout: Duration::from_secs(60),
        ..fast_config()
    })
    .await;
    // A dependent whose update URL accepts connections and never answers.
    let (ghost_addr, _hole) = BlackHole::start().await;
    let ghost = json!({"name": "ghost", "addr": ghost_addr.to_string(), "required_services": ["log"],
        "update_url": format!("http://{ghost_addr}/services")});
    register(&registry, &ghost).await;
    let mut visit = Instance::start().await;
    register(&registry, &visit.dialect_a("visit", &["log"])).await;
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    assert_eq!(visit.next().await.0, Method::POST);
}

#[tokio::test]
async fn ttl_instances_should_stay_passing_while_they_heartbeat() {
    let registry = TestRegistry::start(fast_config()).await;
    // Heartbeats ten times as often as the TTL asks, for more than twice the TTL: a
    // busy machine does not miss one, and without them the instance would have
    // turned critical.
    let body = json!({"name": "worker", "addr": "127.0.0.1:9", "ttl": "1s"});
    register(&registry, &body).await;
    let heartbeat = registry.url("/v1/services/worker/127.0.0.1:9/heartbeat");
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let response = http().put(&heartbeat).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        available(&registry, "worker").await.len(),
        1,
        "heartbeats kept it passing"
    );
    eventually("without heartbeats it turns critical", async || {
        available(&registry, "worker").await.is_empty()
    })
    .await;
    let response = http()
        .put(registry.url("/v1/services/worker/nope/heartbeat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn blocking_watch_should_return_on_change_or_at_the_timeout() {
    let registry = TestRegistry::start(fast_config()).await;
    let state: Value = http()
        .get(registry.url("/v1/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let index = state["index"].as_u64().unwrap();
    let started = Instant::now();
    let idle: Value = http()
        .get(registry.url(&format!("/v1/watch?index={index}&wait=300ms")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(idle["index"], index);
    assert!(started.elapsed() >= Duration::from_millis(250));

    let watch = tokio::spawn({
        let url = registry.url(&format!("/v1/watch?index={index}&wait=20s"));
        async move {
            http()
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    let changed = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("returns on change")
        .unwrap();
    assert!(changed["index"].as_u64().unwrap() > index);
    assert_eq!(changed["instances"][0]["name"], "log");
}

#[tokio::test]
async fn change_stream_should_send_server_sent_events() {
    use futures::StreamExt;
    let registry = TestRegistry::start(fast_config()).await;
    let response = http()
        .get(registry.url("/v1/watch/stream"))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    let mut text = String::new();
    while !text.contains("event: available") || !text.contains("\"name\":\"log\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn bad_input_should_get_json_errors_naming_the_field() {
    let registry = TestRegistry::start(fast_config()).await;
    let client = http();
    let cases = [
        ("{not json", "body"),
        (r#"{"Addr":"127.0.0.1:1"}"#, "name"),
        (r#"{"Name":"x","Addr":"not-an-address"}"#, "Addr"),
        (r#"{"name":"x","addr":"ftp://h:1"}"#, "addr"),
    ];
    for (body, field) in cases {
        let response = client
            .post(registry.url("/services"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            (
                error["error"]["code"].as_str(),
                error["error"]["field"].as_str()
            ),
            (Some("bad_request"), Some(field)),
            "{body}"
        );
    }
    let response = client.get(registry.url("/services")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let big = format!(
        r#"{{"name":"x","addr":"h:1","meta":{{"pad":"{}"}}}}"#,
        "x".repeat(100_000)
    );
    let response = client
        .post(registry.url("/services"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let response = client
        .delete(registry.url("/v1/services/log/127.0.0.1:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_instance");
    let response = client.get(registry.url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_and_healthz_should_report_the_registry() {
    let registry = TestRegistry::start(fast_config()).await;
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    let health: Value = http()
        .get(registry.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let metrics = http()
        .get(registry.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("keel_registry_instances{health=\"passing\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn follow_should_keep_a_discovery_table_current() {
    use keel_registry::client::{Discovery, RegistryClient, follow};
    let registry = TestRegistry::start(fast_config()).await;
    let discovery = Discovery::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let client = RegistryClient::new(&registry.url(""), keel_serve::client::new());
    tokio::spawn(follow(
        client,
        discovery.clone(),
        None,
        Duration::from_millis(500),
        Duration::from_millis(200),
        stop.clone(),
        |_| {},
    ));
    let log = Instance::start().await;
    register(&registry, &log.dialect_a("log", &[])).await;
    eventually("the new instance is followed", async || {
        discovery.instances("log").len() == 1
    })
    .await;
    http()
        .delete(registry.url("/services"))
        .json(&log.dialect_a("log", &[]))
        .send()
        .await
        .unwrap();
    eventually("a service that is gone is forgotten", async || {
        discovery.instances("log").is_empty()
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn shutdown_should_end_open_watch_streams_instead_of_waiting_for_them() {
    use futures::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keel_registry::run(listener, fast_config(), async move {
        let _ = stopped.await;
    }));
    let client = http();
    let stream = client
        .get(format!("http://{addr}/v1/watch/stream"))
        .send()
        .await
        .unwrap();
    drop(stop);
    let limit = Duration::from_secs(5);
    tokio::time::timeout(limit, server)
        .await
        .expect("the registry stops despite open watches")
        .unwrap()
        .unwrap();
    let mut body = stream.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(limit, body.next())
        .await
        .expect("the stream ends")
    {
        chunk.unwrap();
    }
}

#[tokio::test]
async fn slow_checks_should_delay_neither_ttl_reaping_nor_shutdown() {
    // A heartbeat URL that accepts connections and never answers.
    let (hole, _hole) = BlackHole::start().await;
    let registry = TestRegistry::start(RegistryConfig {
        check_workers: 2,
        check_timeout: Duration::from_secs(60),
        check_failures: 1,
        check_interval: Duration::from_millis(100),
        ..fast_config()
    })
    .await;
    // Ten times more silent instances than check workers: their checks take a minute.
    for port in 0..20 {
        let body = json!({"name": "silent", "addr": format!("127.0.0.1:{}", 10_000 + port),
            "heartbeat_url": format!("http://{hole}/health")});
        register(&registry, &body).await;
    }
    let worker = json!({"name": "worker", "addr": "127.0.0.1:9", "ttl": "1s"});
    register(&registry, &worker).await;
    eventually("the TTL instance turns critical on time", async || {
        available(&registry, "worker").await.is_empty()
    })
    .await;
    // Shutdown does not wait for the checks under way.
    registry.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn control_bytes_in_urls_and_dot_names_should_be_refused() {
    let registry = TestRegistry::start(fast_config()).await;
    for (body, field) in [
        (json!({"name": "..", "addr": "127.0.0.1:9"}), "name"),
        (json!({"name": ".hidden", "addr": "127.0.0.1:9"}), "name"),
        (json!({"name": "x", "addr": "127.0.0.1:9/a\u{0}b"}), "addr"),
        (
            json!({"name": "x", "addr": "http://127.0.0.1:9/a b HTTP/1.1\r\nx:"}),
            "addr",
        ),
        (
            json!({"name": "x", "addr": "127.0.0.1:9", "heartbeat_url": "http://127.0.0.1:9/h\u{1}"}),
            "heartbeat_url",
        ),
        (
            json!({"Name": "x", "Addr": "127.0.0.1:9", "RequiredServices": [".."]}),
            "RequiredServices",
        ),
        (
            json!({"ServiceName": "x", "ServiceURL": "http://127.0.0.1:9/\u{7f}"}),
            "ServiceURL",
        ),
    ] {
        let response = http()
            .post(registry.url("/services"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
    }
    assert!(available(&registry, "x").await.is_empty());
}

#[tokio::test]
async fn registrations_should_be_bounded() {
    let registry = TestRegistry::start(RegistryConfig {
        max_instances: 3,
        ..fast_config()
    })
    .await;
    let post = async |body: &Value| {
        let response = http()
            .post(registry.url("/services"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    };
    for port in 1..=3 {
        let body = json!({"name": "many", "addr": format!("127.0.0.1:{port}")});
        assert_eq!(post(&body).await.0, StatusCode::OK);
    }
    let (status, error) = post(&json!({"name": "many", "addr": "127.0.0.1:4"})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, Some("registry_full")),
        "{error}"
    );
    // An instance already registered may always register again.
    let again = json!({"name": "many", "addr": "127.0.0.1:2", "meta": {"v": "2"}});
    assert_eq!(post(&again).await.0, StatusCode::OK);
    assert_eq!(available(&registry, "many").await.len(), 3);

    let big_meta = json!({"name": "many", "addr": "127.0.0.1:1", "meta": {"k": "v".repeat(5000)}});
    let long_url = json!({"name": "many", "addr": format!("127.0.0.1:1/{}", "p".repeat(3000))});
    let many_required: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    let required =
        json!({"name": "many", "addr": "127.0.0.1:1", "required_services": many_required});
    for (body, field) in [
        (big_meta, "meta"),
        (long_url, "addr"),
        (required, "required_services"),
    ] {
        let (status, error) = post(&body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }
}

#[tokio::test]
async fn half_sent_heads_and_extra_connections_should_not_hold_the_registry() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let registry = TestRegistry::start(RegistryConfig {
        header_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..fast_config()
    })
    .await;
    // Half-sent heads are closed at the header timeout.
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(registry.addr).await.unwrap();
        stream
            .write_all(b"POST /services HTTP/1.1\r\nhost: t\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("a half-sent head holds its connection"),
            }
        }
    }
    // So is a connection that sends nothing at all.
    let mut silent = tokio::net::TcpStream::connect(registry.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a connection that never sends a byte holds its slot: {closed:?}"
    );
    // Past max_connections, a client waits until a connection closes: four blocking
    // watches hold every slot.
    let client = keel_serve::client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let state: Value = client
        .get(registry.url("/v1/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let index = state["index"].as_u64().unwrap();
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let mut hog = tokio::net::TcpStream::connect(registry.addr).await.unwrap();
        hog.write_all(
            format!("GET /v1/watch?index={index}&wait=20s HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        hogs.push(hog);
    }
    let waited = client
        .get(registry.url("/healthz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        waited.is_err(),
        "a fifth connection is not served while four are open"
    );
    drop(hogs);
    let served = client
        .get(registry.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

/// A change to one service sends watchers that service, not the whole table.
#[tokio::test]
async fn a_watch_should_carry_the_changed_service_not_the_whole_table() {
    let registry = TestRegistry::start(fast_config()).await;
    let padding = "m".repeat(3000);
    for n in 0..50 {
        register(
            &registry,
            &json!({
                "name": format!("bulky-{n}"),
                "addr": format!("127.0.0.1:{}", 1000 + n),
                "meta": {"padding": padding},
            }),
        )
        .await;
    }
    let full = http()
        .get(registry.url("/v1/watch?index=0&changes=true"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let full: Value = serde_json::from_slice(&full).unwrap();
    assert_eq!(full["full"], true);
    assert_eq!(full["instances"].as_array().unwrap().len(), 50);
    let index = full["index"].as_u64().unwrap();

    let watch = tokio::spawn({
        let url = registry.url(&format!("/v1/watch?index={index}&wait=20s&changes=true"));
        async move { http().get(url).send().await.unwrap().bytes().await.unwrap() }
    });
    register(
        &registry,
        &json!({"name": "late", "addr": "127.0.0.1:2000"}),
    )
    .await;
    let answer = watch.await.unwrap();
    assert!(
        answer.len() < 2048,
        "one small service changed, yet the watch carried {} bytes",
        answer.len()
    );
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["full"], false, "{answer}");
    assert_eq!(answer["changed"], json!(["late"]), "{answer}");
    assert_eq!(answer["instances"][0]["name"], "late", "{answer}");
    assert_eq!(answer["index"], index + 1, "{answer}");
}

#[tokio::test]
async fn a_client_of_several_nodes_should_pass_over_the_dead_and_the_unready() {
    use keel_registry::client::RegistryClient;
    let registry = TestRegistry::start(fast_config()).await;
    // A node that answers 503 (it knows no leader yet) and counts the calls it got.
    let unready = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unready_addr = unready.local_addr().unwrap();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&refused);
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { (StatusCode::SERVICE_UNAVAILABLE, "no leader") }
    });
    tokio::spawn(async move { axum::serve(unready, app).await });
    // Port 1 on loopback refuses connections: a dead node.
    let nodes = format!("http://127.0.0.1:1, {unready_addr} ,{}", registry.url(""));
    let client = RegistryClient::new(&nodes, keel_serve::client::new());
    assert_eq!(client.bases().len(), 3);
    let log = Instance::start().await;
    let registration = keel_registry::Registration::parse(
        &serde_json::to_vec(&log.dialect_a("log", &[])).unwrap(),
    )
    .unwrap();
    client.register(&registration).await.unwrap();
    assert_eq!(refused.load(Ordering::SeqCst), 1);
    // The node that answered is asked first from now on.
    let table = client.services().await.unwrap();
    assert_eq!(table.passing("log").len(), 1);
    assert_eq!(refused.load(Ordering::SeqCst), 1, "not asked again");

    // With one node only, a 503 is the answer.
    let alone = RegistryClient::new(&format!("http://{unready_addr}"), keel_serve::client::new());
    assert!(matches!(
        alone.services().await,
        Err(keel_registry::RegistryClientError::Refused { status: 503, .. })
    ));
}

#[tokio::test]
async fn the_openapi_document_should_be_served_and_match_every_route_and_method() {
    let registry = TestRegistry::start(fast_config()).await;
    // One change, so that a watch from index 0 answers at once.
    let registered = http()
        .post(registry.url("/services"))
        .json(&json!({"name": "svc", "addr": "127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::OK);
    let wrong = keel_serve::openapi::check_served(
        registry.url("").trim_end_matches('/'),
        include_str!("../../../../docs/api/registry.openapi.json"),
        &[("name", "svc"), ("id", "127.0.0.1:9")],
    )
    .await
    .unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
