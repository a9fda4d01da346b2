//! `keel up --cluster 3` end to end: under a steady load through the front door,
//! each kind of process is killed in turn (the log leader, the registry leader, a
//! gateway, a demo instance); nothing acknowledged may be lost, and every idempotent
//! request must be answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::grading::grades_of;
use crate::support::KEEL;
use crate::support::get_json;
use crate::up::{Up, eventually, signal};

/// How long a request may keep being retried by the load's client.
const RETRY_FOR: Duration = Duration::from_secs(15);

/// What the load saw.
#[derive(Debug, Default)]
struct Seen {
    /// Successful requests, by when they were answered.
    answered: Vec<Instant>,
    /// Requests answered only after retries, and the retries they took.
    retried: usize,
    retries: usize,
    /// Idempotent requests not answered within [`RETRY_FOR`].
    unanswered: Vec<String>,
    /// Grades acknowledged (created): title, and the offset of its event.
    grades: Vec<(String, u64)>,
    /// Grade writes that failed (not idempotent: not retried once sent).
    grade_failures: usize,
    /// Records acknowledged, by value: their offset.
    records: BTreeMap<String, u64>,
    visits: usize,
}

/// Visits, grade writes and log produces through the front door, one after
/// another, until `stop`.
async fn load(front: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let http = keel_serve::client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let producer = keel::service::new_producer_id();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // A visit (GET: idempotent for the client; the visit's append carries its own
        // idempotency key).
        let visit = retrying(&seen, &format!("visit {n}"), || {
            http.get(format!("{front}/visit/")).send()
        })
        .await;
        if visit.is_some() {
            seen.lock().unwrap().visits += 1;
        }
        // A record through the gateway to the log cluster, as an idempotent producer.
        let value = format!("ha-{n}");
        let produced = retrying(&seen, &format!("produce {n}"), || {
            http.post(format!("{front}/log/v1/topics/ha/records"))
                .header("content-type", "application/octet-stream")
                .header("keel-producer", producer)
                .header("keel-sequence", n)
                .body(value.clone())
                .send()
        })
        .await;
        if let Some(answer) = produced {
            let offset = answer["first_offset"].as_u64().unwrap();
            seen.lock().unwrap().records.insert(value, offset);
        }
        // A grade: sent once (a POST is not retried once it may have arrived).
        let title = format!("HA quiz {n}");
        let added = http
            .post(format!("{front}/grading/students/2/grades"))
            .json(&json!({"title": title, "type": "quiz", "score": 50}))
            .send()
            .await;
        let mut seen_now = seen.lock().unwrap();
        match added {
            Ok(response) if response.status() == reqwest::StatusCode::CREATED => {
                let offset = response.headers()["keel-offset"].to_str().unwrap();
                seen_now.grades.push((title, offset.parse().unwrap()));
                seen_now.answered.push(Instant::now());
            }
            _ => seen_now.grade_failures += 1,
        }
    }
}

/// Sends what `send` makes until it succeeds, for at most [`RETRY_FOR`]; records the
/// answer's time and the retries.
async fn retrying<F: Future<Output = reqwest::Result<reqwest::Response>>>(
    seen: &Mutex<Seen>,
    what: &str,
    send: impl Fn() -> F,
) -> Option<Value> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut retries = 0;
    loop {
        let answer = match send().await {
            Ok(response) if response.status().is_success() => response.json::<Value>().await.ok(),
            _ => None,
        };
        let mut seen = seen.lock().unwrap();
        if let Some(answer) = answer {
            seen.answered.push(Instant::now());
            if retries > 0 {
                seen.retried += 1;
                seen.retries += retries;
            }
            return Some(answer);
        }
        if Instant::now() >= deadline {
            seen.unanswered.push(what.to_owned());
            return None;
        }
        drop(seen);
        retries += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node of a Raft group that leads, by its label (`log#2`).
async fn leader(up: &Up, group: &str) -> String {
    let addrs: Vec<String> = (1..=3)
        .map(|n| {
            up.url(&format!("{group}#{n}"))
                .trim_start_matches("http://")
                .to_owned()
        })
        .collect();
    let addrs = addrs.join(",");
    eventually(Duration::from_secs(20), "a leader", || {
        let addrs = addrs.clone();
        let group = group.to_owned();
        async move {
            let out = tokio::process::Command::new(KEEL)
                .args(["cluster", "status", "--json", "--addr", &addrs])
                .output()
                .await
                .ok()?;
            let status: Value = serde_json::from_slice(&out.stdout).ok()?;
            let id = status["leader_id"].as_u64().filter(|id| *id != 0)?;
            Some(format!("{group}#{id}"))
        }
    })
    .await
}

/// Kills `label` with SIGKILL under the load; waits until keel up has restarted it
/// and (for a Raft node) it is ready again. Returns the longest time the load went
/// without an answer meanwhile.
async fn kill(up: &Up, label: &str, seen: &Mutex<Seen>) -> Duration {
    let killed = Instant::now();
    signal(up.pid(label), rustix::process::Signal::KILL);
    let ready = ["log#", "registry#", "grading#"]
        .iter()
        .any(|kind| label.starts_with(kind));
    up.restarted(label, ready).await;
    // A little load after it is back, then the longest silence since the kill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = seen.lock().unwrap();
    let mut last = killed;
    let mut longest = Duration::ZERO;
    for at in seen.answered.iter().filter(|at| **at > killed) {
        longest = longest.max(at.duration_since(last));
        last = *at;
    }
    longest.max(Instant::now().duration_since(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_up_cluster_should_lose_nothing_when_any_one_process_is_killed() {
    let mut up = Up::start(&["--cluster", "3", "--grace", "10s"]);
    for n in 1..=3 {
        for group in ["registry", "log"] {
            assert!(
                up.parts.contains_key(&format!("{group}#{n}")),
                "{:?}",
                up.parts
            );
        }
    }
    for label in [
        "front",
        "gateway#1",
        "gateway#2",
        "visit#2",
        "grading#2",
        "portal#2",
    ] {
        assert!(up.parts.contains_key(label), "{label} in {:?}", up.parts);
    }
    let front = up.url("front").to_owned();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(front.clone(), Arc::clone(&stop), Arc::clone(&seen)));
    eventually(Duration::from_secs(30), "the load runs", || {
        let seen = Arc::clone(&seen);
        async move { (seen.lock().unwrap().records.len() >= 5).then_some(()) }
    })
    .await;

    let mut report = Vec::new();
    let log_leader = leader(&up, "log").await;
    report.push((
        format!("log leader ({log_leader})"),
        kill(&up, &log_leader, &seen).await,
    ));
    let registry_leader = leader(&up, "registry").await;
    report.push((
        format!("registry leader ({registry_leader})"),
        kill(&up, &registry_leader, &seen).await,
    ));
    report.push(("gateway#1".into(), kill(&up, "gateway#1", &seen).await));
    report.push(("visit#1".into(), kill(&up, "visit#1", &seen).await));
    report.push(("grading#1".into(), kill(&up, "grading#1", &seen).await));
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(RETRY_FOR * 3, load)
        .await
        .unwrap()
        .unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "load: {} visits, {} records, {} grades; {} requests answered after retries ({} retries); {} grade writes failed",
        seen.visits,
        seen.records.len(),
        seen.grades.len(),
        seen.retried,
        seen.retries,
        seen.grade_failures
    );
    for (what, silence) in &report {
        eprintln!("kill -9 {what}: longest time without an answer {silence:?}");
    }
    assert!(
        seen.unanswered.is_empty(),
        "unanswered: {:?}",
        seen.unanswered
    );
    for (what, silence) in &report {
        assert!(
            *silence < Duration::from_secs(10),
            "{what}: {silence:?} without an answer"
        );
    }

    let http = keel_serve::client::new();
    acknowledged_records_should_be_on_every_log_node(&up, &http, &seen).await;
    acknowledged_grades_should_be_in_every_view(&up, &http, &seen).await;
    every_part_should_be_registered_on_every_registry_node(&up, &http).await;

    signal(up.child.id(), rustix::process::Signal::INT);
    let status = up.exited(Duration::from_secs(120)).await;
    assert!(status.success(), "keel up exited with {status}");
}

/// Every acknowledged record is in the log, once, at its offset, on every node.
async fn acknowledged_records_should_be_on_every_log_node(
    up: &Up,
    http: &reqwest::Client,
    seen: &Seen,
) {
    for n in 1..=3 {
        let node = up.url(&format!("log#{n}"));
        let records: Value = http
            .get(format!(
                "{node}/v1/topics/ha/records?from=0&max=100000&consistency=linearizable"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let stored: Vec<(u64, String)> = records["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["offset"].as_u64().unwrap(),
                    r["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mut values: Vec<&String> = stored.iter().map(|(_, v)| v).collect();
        values.sort();
        values.dedup();
        assert_eq!(values.len(), stored.len(), "log#{n}: a record stored twice");
        for (value, offset) in &seen.records {
            assert!(
                stored.contains(&(*offset, value.clone())),
                "log#{n}: acknowledged {value} at {offset} is missing"
            );
        }
    }
}

/// Every acknowledged grade is in both grading instances' views, once, and the
/// views agree (the same ids in the same order).
async fn acknowledged_grades_should_be_in_every_view(up: &Up, http: &reqwest::Client, seen: &Seen) {
    let newest = seen
        .grades
        .iter()
        .map(|(_, offset)| *offset)
        .max()
        .unwrap_or(0);
    let mut views = Vec::new();
    for label in ["grading#1", "grading#2"] {
        let url = format!("{}/students/2?min_offset={newest}", up.url(label));
        let student = get_json(http, &url).await;
        let grades = grades_of(&student);
        for (title, offset) in &seen.grades {
            let copies = grades.iter().filter(|(_, t)| t == title).count();
            assert_eq!(
                copies, 1,
                "{label}: grade {title} (offset {offset}) is there {copies} times"
            );
        }
        views.push(grades);
    }
    assert_eq!(views[0], views[1], "the grading views differ");
}

/// Every part is registered again (the killed ones too), on every registry node.
async fn every_part_should_be_registered_on_every_registry_node(up: &Up, http: &reqwest::Client) {
    for n in 1..=3 {
        let table: Value = http
            .get(format!(
                "{}/v1/services?consistent",
                up.url(&format!("registry#{n}"))
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for (name, count) in [("log", 3), ("visit", 2), ("grading", 2), ("portal", 2)] {
            let passing = table["instances"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["name"] == name && i["health"] == "passing")
                .count();
            assert!(
                passing >= count,
                "registry#{n}: {passing} {name} instances: {table}"
            );
        }
    }
}
