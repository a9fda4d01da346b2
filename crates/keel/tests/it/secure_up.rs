//! `keel up --secure` end to end: TLS on the registry, the log service and the
//! gateway, an ACL, and the demos calling with their own tokens; driven as its
//! printed hints say, with the CA and client certificate it made.

use std::time::{Duration, Instant};

use keel_serve::tls::ClientTlsFiles;
use serde_json::Value;

use crate::support::get_json;
use crate::up::Up;

/// `http://addr` from the table, as `https://addr`.
fn https(url: &str) -> String {
    url.replacen("http://", "https://", 1)
}

/// The record texts of `topic`, read with `client` from the log service at `log`.
async fn texts(client: &reqwest::Client, log: &str, topic: &str) -> Vec<String> {
    let url = format!("{log}/v1/topics/{topic}/records?from=0&max=1000");
    let Ok(response) = client.get(url).send().await else {
        return Vec::new();
    };
    let body: Value = response.json().await.unwrap_or_default();
    body["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|record| record["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn keel_up_secure_should_serve_tls_with_an_acl_end_to_end() {
    let up = Up::start(&["--secure"]);
    let secure = up.data_dir().join("secure");
    let ca = secure.join("ca.pem");
    let client = |identity: bool| {
        let files = ClientTlsFiles {
            ca: ca.clone(),
            identity: identity.then(|| (secure.join("client.pem"), secure.join("client.key"))),
        };
        keel_serve::client::with_tls(keel_serve::client::builder(), Some(&files))
            .unwrap()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (anonymous, user) = (client(false), client(true));
    let (gateway, registry, log) = (
        https(up.url("gateway")),
        https(up.url("registry")),
        https(up.url("log")),
    );

    // The gateway's front: TLS with the CA, no client certificate needed.
    let visit = get_json(&anonymous, &format!("{gateway}/visit/")).await;
    assert_eq!(visit["visits"], 1, "{visit}");
    let plain = keel_serve::client::new()
        .get(up.url("gateway").to_owned() + "/visit/")
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP reached the TLS front: {plain:?}"
    );

    // The registry and the log service: the ACL knows the user's certificate
    // and nobody without credentials.
    let table = anonymous
        .get(format!("{registry}/v1/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(table.status(), 401);
    let table = get_json(&user, &format!("{registry}/v1/services")).await;
    for name in ["log", "visit", "grading", "portal"] {
        let listed = table["instances"].as_array().unwrap().iter();
        assert!(
            listed.clone().any(|instance| instance["name"] == name),
            "{name} not registered: {table}"
        );
    }
    // Every service registered itself over https, and the registry checks each
    // there (trusting the CA); the visit above went through the gateway over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table = get_json(&user, &format!("{registry}/v1/services")).await;
        let instances = table["instances"].as_array().unwrap();
        for instance in instances {
            assert!(
                instance["url"].as_str().unwrap().starts_with("https://"),
                "{instance}"
            );
        }
        if instances
            .iter()
            .all(|instance| instance["health"] == "passing")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all checked passing: {table}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = anonymous
        .get(format!("{log}/v1/topics/logs/records?from=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(records.status(), 401);

    // The visit reached the log service with the demo's token over TLS, and the
    // gateway's access log with the gateway's.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = texts(&user, &log, "logs").await;
        let access = texts(&user, &log, "access").await;
        let visited = logs.iter().any(|line| line.contains("visit 1"));
        let accessed = access.iter().any(|line| line.contains("GET /visit/ 200"));
        if visited && accessed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not in the log service within 30 s: logs {logs:?}, access {access:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    no_part_denied(&up.data_dir().join("up-logs"));
}

/// No part was denied on the way (only a test's anonymous calls were): the ACL
/// gives each part what it needs.
fn no_part_denied(logs_dir: &std::path::Path) {
    for entry in std::fs::read_dir(logs_dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let denied: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("deny") && !line.contains("principal=anonymous"))
            .collect();
        assert!(denied.is_empty(), "{}: {denied:?}", path.display());
    }
}
