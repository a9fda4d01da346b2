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
        text.push_str(&format!(
            "[[token]]\nprincipal = \"{principal}\"\nsha256 = \"{}\"\n",
            keel_auth::token::hash(&format!("{principal}-token"))
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
    let http = reqwest::Client::new();
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
