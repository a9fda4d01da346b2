//! The Grafana dashboard (`deploy/grafana/keel.json`) and the Prometheus alert rules
//! (`deploy/prometheus/alerts.yaml`) against a running `keel up --cluster 3`: every
//! metric they name must be one that a part of it exports at `/metrics`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::up::{Up, eventually};

fn deploy_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Every `keel_...` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("keel_") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !preceded_by_word {
            names.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

/// The series names a Prometheus text exposition offers: each family, and a
/// histogram's `_bucket`, `_sum` and `_count`.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(["TYPE", name, kind]) = line
            .strip_prefix("# ")
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
            .as_deref()
        {
            names.insert((*name).to_owned());
            if *kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The expressions of every panel of the dashboard, after checking each panel is
/// one Grafana can show: a unique id, the dashboard's data source, a query.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    let mut ids = BTreeSet::new();
    let mut expressions = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("every panel has a title");
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: the dashboard's data source variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            assert!(!expr.trim().is_empty(), "{title}: an empty query");
            expressions.push(expr.to_owned());
        }
    }
    expressions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_should_use_only_metrics_keel_exports() {
    let dashboard: Value = serde_json::from_str(&deploy_file("grafana/keel.json")).unwrap();
    assert_eq!(dashboard["uid"], "keel-overview");
    let expressions = dashboard_expressions(&dashboard);
    let alerts = deploy_file("prometheus/alerts.yaml");
    let mut used = metric_names(&alerts);
    assert!(
        used.len() >= 10,
        "the alert rules name the metrics they watch: {used:?}"
    );
    for expr in &expressions {
        used.extend(metric_names(expr));
    }

    let up = Up::start(&["--cluster", "3"]);
    let http = keel_serve::client::new();
    // Some traffic through the front door, so every part has served something.
    let front = up.url("front").to_owned();
    eventually(
        Duration::from_secs(30),
        "a visit through the gateway",
        || {
            let (http, front) = (http.clone(), front.clone());
            async move {
                let answer = http.get(format!("{front}/visit/")).send().await.ok()?;
                answer.status().is_success().then_some(())
            }
        },
    )
    .await;
    let mut scraped = Vec::new();
    for label in ["registry#1", "log#1", "log#2", "log#3"] {
        scraped.push(format!("{}/metrics", up.url(label)));
    }
    scraped.extend(
        up.printed_urls()
            .filter(|url| url.ends_with("/metrics"))
            .map(str::to_owned),
    );
    let mut exported = BTreeSet::new();
    for url in &scraped {
        let answer = http.get(url).send().await.unwrap();
        assert!(answer.status().is_success(), "{url}: {}", answer.status());
        exported.extend(exported_names(&answer.text().await.unwrap()));
    }
    assert!(
        exported.contains("keel_gateway_upstream_seconds_bucket")
            && exported.contains("keel_raft_replication_lag_entries"),
        "the gateway's and a cluster node's metrics were scraped: {scraped:?}"
    );
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "named by the dashboard or the alerts but exported by no part: {unknown:?}"
    );
}

#[test]
fn metric_names_should_be_found_whole_and_only_at_a_word_start() {
    let names = metric_names(
        "sum(rate(keel_log_commits_total[5m])) / x_keel_not + keel_raft_term{a=\"keel\"}",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["keel_log_commits_total", "keel_raft_term"]);
}
