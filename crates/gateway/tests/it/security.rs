//! A gateway in front of a registry with an ACL: it reads the table with its own
//! token.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::support::{backend, gateway, until_routed};

#[tokio::test]
async fn issue_19_the_gateway_should_read_a_registry_with_an_acl_by_its_token() {
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
async fn issue_19_the_gateway_front_should_serve_tls_and_say_so_upstream() {
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
