//! A gateway in front of a registry with an ACL: it reads the table with its own
//! token.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::support::{backend, gateway, until_routed};

#[tokio::test]
async fn the_gateway_should_read_a_registry_with_an_acl_by_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    let mut text = String::new();
    for principal in ["gateway", "echo"] {
        text.push_str(&keel_auth::token::acl_entry(
            principal,
            &format!("{principal}-token"),
        ));
    }
    text.push_str(
        "[[allow]]\nprincipals = [\"gateway\"]\nservices = [\"*\"]\nactions = [\"read\"]\n\
         [[allow]]\nprincipals = [\"echo\"]\nservices = [\"echo\"]\nactions = [\"register\"]\n",
    );
    std::fs::write(&acl, text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    let config = keel_registry::RegistryConfig {
        check_interval: Duration::from_secs(3600),
        acl: Some(acl),
        ..Default::default()
    };
    tokio::spawn(keel_registry::run(listener, config, async move {
        let _ = stopped.await;
    }));

    let echo = backend("a").await;
    let http = keel_serve::client::new();
    let registered = http
        .post(format!("http://{registry}/services"))
        .bearer_auth("echo-token")
        .json(&serde_json::json!({"name": "echo", "addr": echo.running.addr.to_string()}))
        .send()
        .await
        .unwrap();
    assert!(
        registered.status().is_success(),
        "{}",
        registered.text().await.unwrap()
    );
    let anonymous = http
        .get(format!("http://{registry}/v1/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let gateway = gateway(registry, |config| {
        config.registry_token = Some("gateway-token".into());
    })
    .await;
    until_routed(gateway.addr, "echo", 1).await;
}

/// The front port on TLS: a client that trusts the CA is served, and the instance
/// reads `X-Forwarded-Proto: https`; a plaintext request gets no answer.
#[tokio::test]
async fn the_gateway_front_should_serve_tls_and_say_so_upstream() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no curl on this machine");
        return;
    }
    use keel_auth::mint::{Ca, Leaf};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("keel test CA", 1).unwrap();
    let node = ca.sign(&Leaf::node("keel-gw", 1)).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (ca_file, cert, key) = (
        file("ca.pem", &ca.cert_pem()),
        file("gw.pem", &node.cert_pem),
        file("gw.key", &node.key_pem),
    );
    let registry = crate::support::registry().await;
    let echo = backend("a").await;
    crate::support::register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |config| {
        config.tls = Some(keel_serve::tls::ServerTlsFiles {
            cert,
            key,
            client_ca: None,
        });
    })
    .await;
    let url = format!("https://localhost:{}/echo/x", gateway.addr.port());
    let curl = move |extra: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-s", "--max-time", "5"])
                .args(extra)
                .output()
                .unwrap()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let echoed: serde_json::Value = loop {
        let out = curl(vec![
            "--cacert".into(),
            ca_file.to_str().unwrap().into(),
            url.clone(),
        ])
        .await
        .unwrap();
        if let Ok(echoed) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && echoed["path"] == "/echo/x"
        {
            break echoed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https", "{echoed}");
    let plain = curl(vec![format!(
        "http://localhost:{}/echo/x",
        gateway.addr.port()
    )])
    .await
    .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("/echo/x"));
    // The admin port takes the same certificate.
    let admin = gateway.admin.unwrap();
    let health = curl(vec![
        "--cacert".into(),
        ca_file.to_str().unwrap().into(),
        format!("https://localhost:{}/healthz", admin.port()),
    ])
    .await
    .unwrap();
    let health = String::from_utf8_lossy(&health.stdout);
    assert!(health.contains("ok"), "{health}");
}

/// An instance registered at an `https` URL: the gateway reaches it over TLS,
/// verifying its certificate for the URL's host against the gateway's CA, and
/// keeps the connection for the next request. A gateway that cannot verify the
/// certificate (the platform's roots do not know the CA) answers 502 saying why.
#[tokio::test]
async fn an_https_instance_should_be_reached_over_tls() {
    use keel_auth::mint::{Ca, Leaf};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("keel test CA", 1).unwrap();
    let node = ca.sign(&Leaf::node("echo-tls", 1)).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_file = file("ca.pem", &ca.cert_pem());
    let tls = keel_serve::tls::server_config(&keel_serve::tls::ServerTlsFiles {
        cert: file("echo.pem", &node.cert_pem),
        key: file("echo.key", &node.key_pem),
        client_ca: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = std::sync::Arc::clone(&accepted);
    let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
        counting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    tokio::spawn(keel_serve::serve_app(
        listener,
        crate::support::echo_app("tls", std::sync::Arc::clone(&hits)),
        keel_serve::AppLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: None,
            tls: Some(tls),
        },
        stop,
    ));
    let registry = crate::support::registry().await;
    let http = keel_serve::client::new();
    let registered = http
        .post(format!("http://{}/services", registry.addr))
        .json(&serde_json::json!({"name": "secure", "addr": format!("https://localhost:{port}")}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let trusting = gateway(registry.addr, |config| {
        config.client_tls = Some(keel_serve::tls::ClientTlsFiles {
            ca: ca_file.clone(),
            identity: None,
        });
    })
    .await;
    until_routed(trusting.addr, "secure", 1).await;
    // One client connection is served by one gateway thread, whose pool keeps the
    // upstream connection from request to request.
    let mut connections = 0;
    for n in 0..3 {
        let echoed: serde_json::Value = http
            .get(format!("http://{}/secure/x/{n}", trusting.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echoed["path"], format!("/secure/x/{n}"), "{echoed}");
        let now = accepted.load(std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            assert_eq!(now, connections, "a new TLS connection for request {n}");
        }
        connections = now;
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 4);
    // A body streamed through: the write half of a TLS upstream.
    let body = vec![b'k'; 4 << 20];
    let sunk = http
        .post(format!("http://{}/secure/sink", trusting.addr))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(sunk.text().await.unwrap(), body.len().to_string());

    // Until it has read the table, a gateway answers 404 or 503.
    let doubting = gateway(registry.addr, |_| {}).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let response = http
            .get(format!("http://{}/secure/x", doubting.addr))
            .send()
            .await
            .unwrap();
        if response.status() != 404 && response.status() != 503 {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.status(), 502);
    let error: serde_json::Value = refused.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate"), "{error}");
}
