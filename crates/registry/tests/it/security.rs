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
    let response = keel_serve::client::new()
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
async fn registrations_aimed_outside_the_allowed_targets_should_be_refused() {
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
    let listed: Value = keel_serve::client::new()
        .get(registry.url("/v1/services/peek"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

/// An ACL file in `dir` with a token for each principal (its token is its name
/// with `-token`): alice and mallory may register, deregister and read `visit`
/// (mallory also `evil`), ops is an admin of every service, and every
/// authenticated principal may read every service.
fn acl(dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = String::new();
    for principal in ["alice", "mallory", "ops"] {
        text.push_str(&keel_auth::token::acl_entry(
            principal,
            &format!("{principal}-token"),
        ));
    }
    text.push_str(
        r#"
[[allow]]
principals = ["alice"]
services = ["visit"]
actions = ["register", "deregister", "read"]

[[allow]]
principals = ["mallory"]
services = ["visit", "evil"]
actions = ["register", "deregister", "read"]

[[allow]]
principals = ["ops"]
services = ["*"]
actions = ["admin", "deregister"]

[[allow]]
principals = ["*"]
services = ["*"]
actions = ["read"]
"#,
    );
    let file = dir.join("acl.toml");
    std::fs::write(&file, text).unwrap();
    file
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = keel_serve::client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(format!("{token}-token"));
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    (
        response.status(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Hijack: once an ACL is in force, nobody without a token registers or reads,
/// a principal registers only the services its rules name, and no principal but
/// an instance's owner (or an admin) removes it, heartbeats it, or registers it
/// again with its own update URL; the instance stays as its owner left it.
#[tokio::test]
async fn a_principal_should_not_remove_or_take_over_another_ones_instance() {
    let dir = tempfile::tempdir().unwrap();
    let config = keel_registry::RegistryConfig {
        acl: Some(acl(dir.path())),
        ..fast_config()
    };
    let registry = TestRegistry::start(config).await;
    let alice = Instance::start().await;
    let mallory = Instance::start().await;
    let id = alice.addr.to_string();
    let mine = json!({"name": "visit", "addr": id,
        "update_url": format!("http://{}/services", alice.addr), "required_services": ["log"]});
    let post = |token: Option<&'static str>, body: Value| {
        let url = registry.url("/services");
        async move { call(reqwest::Method::POST, url, token, Some(&body)).await }
    };

    // No token, a guessed one: 401 with the JSON envelope; nothing registered.
    let (status, answer) = post(None, mine.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["error"]["code"], "unauthenticated", "{answer}");
    let (status, _) = post(Some("guessed"), mine.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, answer) = post(Some("alice"), mine.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Mallory: not alice's instance, whichever way it is asked.
    let instance_url = registry.url(&format!("/v1/services/visit/{id}"));
    for (method, url, body) in [
        (reqwest::Method::DELETE, instance_url.clone(), None),
        (
            reqwest::Method::DELETE,
            registry.url("/services"),
            Some(json!({"name": "visit", "addr": id})),
        ),
        (
            reqwest::Method::PUT,
            format!("{instance_url}/heartbeat"),
            None,
        ),
        (
            reqwest::Method::POST,
            registry.url("/services"),
            Some(json!({"name": "visit", "addr": id,
            "update_url": format!("http://{}/services", mallory.addr), "required_services": ["log"]})),
        ),
    ] {
        let (status, answer) = call(method.clone(), url, Some("mallory"), body.as_ref()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method}: {answer}");
        assert_eq!(answer["error"]["code"], "not_owner", "{answer}");
    }
    // A service mallory has no rule for, and one it has no register rule for.
    let (status, answer) = post(
        Some("mallory"),
        json!({"name": "grading", "addr": mallory.addr.to_string()}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{answer}"
    );

    // The instance is as alice left it; reading needs a token.
    let (status, _) = call(
        reqwest::Method::GET,
        registry.url("/v1/services/visit"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        reqwest::Method::GET,
        registry.url("/v1/services"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, listed) = call(
        reqwest::Method::GET,
        registry.url("/v1/services"),
        Some("mallory"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let instances = listed["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{listed}");
    assert_eq!(
        instances[0]["update_url"],
        format!("http://{}/services", alice.addr)
    );

    // Its owner may update it; an admin may remove it.
    let (status, _) = post(Some("alice"), mine.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = call(reqwest::Method::DELETE, instance_url, Some("ops"), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// A notification carries `Keel-Signature`, the HMAC of its method, index and body
/// under the secret the dependent got in `Keel-Instance-Secret` when it registered.
#[tokio::test]
async fn notifications_should_be_signed_with_the_dependents_secret() {
    use std::sync::Mutex;

    type Seen = Arc<Mutex<Vec<(String, u64, String, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/services",
        axum::routing::any(
            move |method: axum::http::Method,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let record = Arc::clone(&record);
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let index = header(keel_registry::INDEX_HEADER).parse().unwrap_or(0);
                    let signature = header(keel_auth::signature::SIGNATURE_HEADER);
                    record.lock().unwrap().push((
                        method.to_string(),
                        index,
                        signature,
                        body.to_vec(),
                    ));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dependent = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let registry = TestRegistry::start(fast_config()).await;
    let response = keel_serve::client::new()
        .post(registry.url("/services"))
        .json(&json!({"name": "visit", "addr": dependent.to_string(),
            "update_url": format!("http://{dependent}/services"), "required_services": ["log"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let secret = response
        .headers()
        .get(keel_auth::signature::SECRET_HEADER)
        .expect("a secret")
        .to_str()
        .unwrap()
        .to_owned();
    let log = Instance::start().await;
    let (status, _) = post(&registry, &log.dialect_a("log", &[])).await;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (method, index, signature, body) = seen.lock().unwrap()[0].clone();
    assert!(
        keel_auth::signature::verify(&secret, &signature, &method, index, &body),
        "{signature}"
    );
    assert!(!keel_auth::signature::verify(
        "another", &signature, &method, index, &body
    ));
}

/// Amplification: a hundred dependents all naming the same update URL are told of
/// a change at the per-target pace (a burst of `max_requests_per_target`, then that
/// many a second), not all at once; and every one of them is told in the end.
#[tokio::test]
async fn notifications_to_one_target_should_be_paced() {
    let (victim, hits) = internal_service().await;
    let config = keel_registry::RegistryConfig {
        max_requests_per_target: 20,
        ..fast_config()
    };
    let registry = TestRegistry::start(config).await;
    let holder = Instance::start().await;
    for n in 0..100 {
        let (status, answer) = post(
            &registry,
            &json!({"name": "dep",
            "addr": format!("http://{}/d{n}", holder.addr),
            "update_url": format!("http://{victim}/services"), "required_services": ["log"]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let log = Instance::start().await;
    let started = Instant::now();
    let (status, _) = post(&registry, &log.dialect_a("log", &[])).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The burst, and at most what the rate refills in the time that passed.
    let allowed = 20 + (started.elapsed().as_secs_f64() * 20.0).ceil() as usize;
    let early = hits.load(Ordering::SeqCst);
    assert!(
        early <= allowed,
        "{early} requests reached one target; at most {allowed} may"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits.load(Ordering::SeqCst) < 100 {
        assert!(
            Instant::now() < deadline,
            "only {} of 100 notifications arrived",
            hits.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rule's `targets` limits what its principals may register, within the
/// registry's own list.
#[tokio::test]
async fn a_principal_should_register_only_the_targets_its_rules_give() {
    let (elsewhere, hits) = internal_service().await;
    let allowed = Instance::start().await;
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        format!(
            "[[token]]\nprincipal = \"alice\"\nsha256 = \"{}\"\n\n[[allow]]\nprincipals = [\"alice\"]\nservices = [\"visit\"]\nactions = [\"register\"]\ntargets = [\"127.0.0.1:{}\"]\n",
            keel_auth::token::hash("alice-token"),
            allowed.addr.port()
        ),
    )
    .unwrap();
    let registry = TestRegistry::start(keel_registry::RegistryConfig {
        acl: Some(acl),
        ..fast_config()
    })
    .await;
    let register = |addr: String| {
        let url = registry.url("/services");
        async move {
            call(
                reqwest::Method::POST,
                url,
                Some("alice"),
                Some(&json!({"name": "visit", "addr": addr,
                    "heartbeat_url": format!("http://{addr}/heart-beat")})),
            )
            .await
        }
    };
    let (status, answer) = register(elsewhere.to_string()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["error"]["code"], "target_not_allowed", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("targets for alice"),
        "{answer}"
    );
    let (status, answer) = register(allowed.addr.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}
