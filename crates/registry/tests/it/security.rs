//! The registry as an attacker would use it: registrations that aim its health
//! checks, its notifications or the gateway's traffic at an internal address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Instance, TestRegistry, fast_config};

/// A server that counts every request it gets, on any path.
async fn internal_service() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "internal records" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

async fn post(registry: &TestRegistry, body: &Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(registry.url("/services"))
        .json(body)
        .send()
        .await
        .unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// With `--allow-targets`, no URL of a registration may reach outside it: not the
/// instance address (what the gateway would proxy to), not the heartbeat URL (a
/// port-scan oracle, and a GET every interval), not the update URL (a POST and a
/// DELETE with JSON bodies), whether written as an address, a name, an IPv4 address
/// in IPv6 form or the unspecified address; and nothing reaches the internal service.
#[tokio::test]
async fn issue_19_registrations_aimed_outside_the_allowed_targets_should_be_refused() {
    let (internal, hits) = internal_service().await;
    let allowed = Instance::start().await;
    let config = keel_registry::RegistryConfig {
        allow_targets: Some(
            format!("127.0.0.1:{}", allowed.addr.port())
                .parse()
                .unwrap(),
        ),
        ..fast_config()
    };
    let registry = TestRegistry::start(config).await;
    let port = internal.port();
    let inside = allowed.addr.to_string();
    let secret = format!("http://{internal}/v1/topics/big/records/0");
    let attempts = [
        (
            "addr",
            json!({"name": "peek", "addr": format!("http://{internal}/v1/topics/big/records/0")}),
        ),
        (
            "addr",
            json!({"name": "peek", "addr": format!("localhost:{port}")}),
        ),
        (
            "addr",
            json!({"name": "peek", "addr": format!("http://[::ffff:127.0.0.1]:{port}")}),
        ),
        (
            "addr",
            json!({"name": "peek", "addr": format!("0.0.0.0:{}", allowed.addr.port())}),
        ),
        (
            "addr",
            json!({"Name": "peek", "Addr": internal.to_string(), "RequiredServices": []}),
        ),
        (
            "addr",
            json!({"ServiceName": "peek", "ServiceURL": format!("http://{internal}")}),
        ),
        (
            "heartbeat_url",
            json!({"name": "peek", "addr": inside, "heartbeat_url": secret}),
        ),
        (
            "update_url",
            json!({"name": "peek", "addr": inside, "update_url": secret,
            "required_services": ["log"]}),
        ),
    ];
    for (field, body) in &attempts {
        let (status, answer) = post(&registry, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "target_not_allowed", "{answer}");
        assert_eq!(answer["error"]["field"], *field, "{answer}");
    }

    // What is inside the list registers, is checked and is notified as before.
    let (status, answer) = post(
        &registry,
        &json!({"name": "peek", "addr": inside,
        "heartbeat_url": format!("http://{inside}/heart-beat"),
        "update_url": format!("http://{inside}/services"), "required_services": ["log"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = post(&registry, &json!({"name": "log", "addr": inside})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut allowed = allowed;
    allowed.next().await;
    let checks = registry.checks_made().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.checks_made().await < checks + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a request reached the internal service"
    );
    let listed: Value = reqwest::get(registry.url("/v1/services/peek"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}
