//! Routing, pass-through, balancing, failover and errors.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{
    backend, counter, crashing_backend, gateway, register, registry, until_closed, until_routed,
};

async fn error_code(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    (
        status,
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn method_path_query_headers_body_and_status_should_pass_through() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    until_routed(gateway.addr, "echo", 1).await;

    let response = keel_serve::client::new()
        .post(format!("http://{}/echo/deep/path?x=1&y=two", gateway.addr))
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "hop-by-hop")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(
        echo["path"], "/echo/deep/path",
        "the path reaches the instance unchanged"
    );
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["body"], "payload");
    let headers = &echo["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert!(
        headers.get("x-drop-me").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], gateway.addr.to_string());
    assert!(
        headers["x-request-id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
}

#[tokio::test]
async fn strip_prefix_should_remove_the_service_segment() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "api", echo.running.addr).await;
    let gateway = gateway(registry.addr, |config| {
        config.strip_prefix = vec!["api".into()]
    })
    .await;
    until_routed(gateway.addr, "api", 1).await;
    let echo: Value = keel_serve::client::new()
        .get(format!("http://{}/api/users/7", gateway.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["path"], "/users/7");
    assert_eq!(echo["headers"]["x-forwarded-prefix"], "/api");
}

#[tokio::test]
async fn load_should_spread_over_instances_and_survive_one_being_killed() {
    let registry = registry().await;
    let a = backend("a").await;
    let mut b = backend("b").await;
    register(registry.addr, "visit", a.running.addr).await;
    register(registry.addr, "visit", b.running.addr).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    until_routed(gateway.addr, "visit", 2).await;
    let client = keel_serve::client::new();
    let (a0, b0) = (
        a.hits.load(Ordering::Relaxed),
        b.hits.load(Ordering::Relaxed),
    );
    for _ in 0..100 {
        let response = client
            .get(format!("http://{}/visit/", gateway.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let (a1, b1) = (
        a.hits.load(Ordering::Relaxed) - a0,
        b.hits.load(Ordering::Relaxed) - b0,
    );
    assert_eq!(a1 + b1, 100);
    assert!(a1 >= 40 && b1 >= 40, "round-robin spread: {a1} / {b1}");

    // Kill b: the registry has not noticed (no health checks here), the gateway must.
    b.running.stop();
    until_closed(b.running.addr).await;
    for i in 0..100 {
        let response = client
            .get(format!("http://{}/visit/after-kill", gateway.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "request {i} after the kill"
        );
    }
}

#[tokio::test]
async fn all_instances_dead_should_be_502_then_503_and_unknown_service_404() {
    let registry = registry().await;
    let mut dead = backend("a").await;
    register(registry.addr, "gone", dead.running.addr).await;
    let gateway = gateway(registry.addr, |config| config.eject_after = 2).await;
    until_routed(gateway.addr, "gone", 1).await;
    dead.running.stop();
    until_closed(dead.running.addr).await;
    let client = keel_serve::client::new();
    let (status, code, message) = error_code(
        client
            .get(format!("http://{}/gone/x", gateway.addr))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_failed")
    );
    assert!(message.contains("\"gone\""), "{message}");
    client
        .get(format!("http://{}/gone/x", gateway.addr))
        .send()
        .await
        .unwrap();
    // Two failures ejected the only instance: no healthy instance is left.
    let (status, code, _) = error_code(
        client
            .get(format!("http://{}/gone/x", gateway.addr))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_instance")
    );

    let (status, code, message) = error_code(
        client
            .get(format!("http://{}/nosuch/x", gateway.addr))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "unknown_service")
    );
    assert!(message.contains("nosuch"));
    let (status, code, _) = error_code(
        client
            .get(format!("http://{}/", gateway.addr))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "no_service")
    );
}

#[tokio::test]
async fn slow_upstream_should_be_504_at_the_configured_timeout() {
    let registry = registry().await;
    let slow = backend("a").await;
    register(registry.addr, "slow", slow.running.addr).await;
    let gateway = gateway(registry.addr, |config| {
        config.request_timeout = Duration::from_millis(300)
    })
    .await;
    until_routed(gateway.addr, "slow", 1).await;
    let started = Instant::now();
    let response = keel_serve::client::new()
        .get(format!("http://{}/slow/slow", gateway.addr))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let (status, code, _) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn oversized_headers_should_be_431() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |config| config.max_header_bytes = 2048).await;
    until_routed(gateway.addr, "echo", 1).await;
    let response = keel_serve::client::new()
        .get(format!("http://{}/echo/x", gateway.addr))
        .header("x-big", "v".repeat(4096))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large"
        )
    );
}

/// A connection mid-request is never shed: past the limit, a new one waits.
#[tokio::test]
async fn connections_over_the_limit_should_wait_while_every_one_is_mid_request() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |config| config.max_connections = 1).await;
    until_routed(gateway.addr, "echo", 1).await;
    // Fresh connections each time, so that no idle pooled one holds the only slot.
    let client = keel_serve::client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://{}/echo/x", gateway.addr);
    // Connected first, the hog is first in line for the slot, whether or not the
    // connections of `until_routed` have let go of it yet; its request takes 3 s.
    let before = echo.hits.load(std::sync::atomic::Ordering::Relaxed);
    let mut hog = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut hog, b"GET /echo/slow HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    // Mid-request once the backend has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while echo.hits.load(std::sync::atomic::Ordering::Relaxed) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the hog's request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited = client
        .get(&url)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        waited.is_err(),
        "a second connection is not served while the slot is taken"
    );
    drop(hog);
    let served = client
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

#[tokio::test]
async fn failures_after_sending_should_be_retried_only_for_idempotent_methods() {
    let registry = registry().await;
    let good = backend("good").await;
    let (crashing, crashed) = crashing_backend().await;
    register(registry.addr, "flaky", good.running.addr).await;
    register(registry.addr, "flaky", crashing).await;
    // Never eject: requests keep alternating between the two instances.
    let gateway = gateway(registry.addr, |config| config.eject_after = 1000).await;
    until_routed(gateway.addr, "flaky", 1).await;
    let client = keel_serve::client::new();
    for i in 0..10 {
        let response = client
            .get(format!("http://{}/flaky/read", gateway.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "GET {i} is retried on the good instance"
        );
    }
    let before = crashed.load(Ordering::Relaxed);
    let mut failed = 0;
    for _ in 0..10 {
        let response = client
            .post(format!("http://{}/flaky/write", gateway.addr))
            .body("once")
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::BAD_GATEWAY {
            failed += 1;
        } else {
            assert_eq!(response.status(), StatusCode::CREATED);
        }
    }
    let reached = crashed.load(Ordering::Relaxed) - before;
    assert!(reached > 0, "some POSTs reached the crashing instance");
    assert_eq!(failed, reached, "a POST that was sent is never sent again");
}

#[tokio::test]
async fn admin_address_should_serve_health_and_metrics() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    until_routed(gateway.addr, "echo", 1).await;
    let admin = gateway.admin.unwrap();
    let health: Value = keel_serve::client::new()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let count = async |class: &str| -> u64 {
        counter(
            &gateway,
            &format!("keel_gateway_responses_total{{class=\"{class}\"}}"),
        )
        .await
    };
    let (ok, missing) = (count("2xx").await, count("4xx").await);
    let timed = counter(&gateway, "keel_gateway_upstream_seconds_count").await;
    keel_serve::client::new()
        .get(format!("http://{}/echo/x", gateway.addr))
        .send()
        .await
        .unwrap();
    keel_serve::client::new()
        .get(format!("http://{}/nosuch/x", gateway.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (count("2xx").await, count("4xx").await),
        (ok + 1, missing + 1)
    );
    // Only the answer an upstream gave is timed, not the gateway's own 404.
    assert_eq!(
        counter(&gateway, "keel_gateway_upstream_seconds_count").await,
        timed + 1
    );
    assert!(
        counter(
            &gateway,
            "keel_gateway_upstream_seconds_bucket{le=\"+Inf\"}"
        )
        .await
            > timed
    );

    // The admin address's OpenAPI document: served, and true to its routes.
    let wrong = keel_serve::openapi::check_served(
        &format!("http://{admin}"),
        include_str!("../../../../docs/api/gateway.openapi.json"),
        &[],
    )
    .await
    .unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A listener whose accept queue is full: connection attempts get no answer at all (the
/// kernel drops their SYNs), as with a host that went away. Keep it and the returned
/// connection alive while it is needed.
fn unanswering() -> (tokio::net::TcpListener, std::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    // Backlog 0 holds one connection; this fills it.
    let filler = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (listener, filler)
}

#[tokio::test]
async fn an_unanswering_instance_should_fail_over_at_the_connect_timeout() {
    let registry = registry().await;
    let (hole, _filler) = unanswering();
    let good = backend("good").await;
    register(registry.addr, "svc", hole.local_addr().unwrap()).await;
    register(registry.addr, "svc", good.running.addr).await;
    let gateway = gateway(registry.addr, |config| {
        config.connect_timeout = Duration::from_millis(200);
        // Keep the hole in rotation, so that every other request meets it.
        config.eject_after = 1000;
    })
    .await;
    // Both were registered before the gateway started, so its first table has both.
    until_routed(gateway.addr, "svc", 1).await;
    let client = keel_serve::client::new();
    for n in 0..4 {
        let started = Instant::now();
        let response = client
            .get(format!("http://{}/svc/x", gateway.addr))
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        assert!(
            elapsed < Duration::from_secs(1),
            "request {n} took {elapsed:?}"
        );
    }

    // With only the unanswering instance: a prompt 502 naming the connect failure.
    register(registry.addr, "alone", hole.local_addr().unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (response, elapsed) = loop {
        let started = Instant::now();
        let response = client
            .get(format!("http://{}/alone/x", gateway.addr))
            .send()
            .await
            .unwrap();
        // 404 until the gateway's table has caught up with the registry.
        if response.status() != StatusCode::NOT_FOUND {
            break (response, started.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never learned of alone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, code, message) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_failed")
    );
    assert!(message.contains("connect"), "{message}");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}
