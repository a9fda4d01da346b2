//! Grading's views under `keel up --instances grading=2`: each instance keeps its
//! own SQLite file, built from the `grading` topic; they agree, survive `kill -9`
//! and rebuild a deleted file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::get_json;
use crate::up::{Up, eventually, signal};

/// A student's grades as one instance shows them: (id, title), oldest first.
type Grades = Vec<(i64, String)>;

/// A student's grades as an instance answered them.
pub(crate) fn grades_of(student: &Value) -> Grades {
    student["grades"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["id"].as_i64().unwrap(),
                g["title"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every student's grades from `instance`, once its view has applied `min_offset`.
async fn grades(http: &reqwest::Client, instance: &str, min_offset: u64) -> Vec<(i64, Grades)> {
    let response = http
        .get(format!("{instance}/students?min_offset={min_offset}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{instance}");
    let applied: u64 = response.headers()["keel-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        applied >= min_offset,
        "{instance}: {applied} < {min_offset}"
    );
    let students: Vec<Value> = response.json().await.unwrap();
    students
        .iter()
        .map(|s| (s["id"].as_i64().unwrap(), grades_of(s)))
        .collect()
}

/// Posts grades through the gateway, one after another, until `count` are
/// acknowledged or `stop`; returns (title, offset) of each acknowledged one.
async fn post_grades(
    http: reqwest::Client,
    gateway: String,
    prefix: &'static str,
    count: usize,
    acked: Arc<Mutex<Vec<(String, u64)>>>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.starts_with(prefix))
        .count()
        < count
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefix}: not acknowledged in time"
        );
        n += 1;
        let title = format!("{prefix} {n}");
        let answer = http
            .post(format!("{gateway}/grading/students/{}/grades", 1 + n % 5))
            .json(&json!({"title": title, "type": "homework", "score": n % 101}))
            .send()
            .await;
        // A write that failed (its instance died under it) may or may not be stored:
        // it is not acknowledged, and is not sent again.
        if let Ok(response) = answer
            && response.status() == reqwest::StatusCode::CREATED
        {
            let offset = response.headers()["keel-offset"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            acked.lock().unwrap().push((title, offset));
        }
    }
}

/// Both instances show every acknowledged grade, once, with the same ids in the
/// same order.
async fn views_should_agree(http: &reqwest::Client, up: &Up, acked: &[(String, u64)]) {
    let newest = acked.iter().map(|(_, offset)| *offset).max().unwrap_or(0);
    let one = grades(http, up.url("grading#1"), newest).await;
    let two = grades(http, up.url("grading#2"), newest).await;
    assert_eq!(one, two, "the two views differ");
    let titles: Vec<&str> = one
        .iter()
        .flat_map(|(_, grades)| grades.iter().map(|(_, title)| title.as_str()))
        .collect();
    for (title, _) in acked {
        let copies = titles.iter().filter(|t| **t == title).count();
        assert_eq!(
            copies, 1,
            "acknowledged grade {title:?} is there {copies} times"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grading_views_should_agree_survive_kill_9_and_rebuild_a_deleted_file() {
    let up = Up::start(&["--instances", "grading=2"]);
    let gateway = up.url("gateway").to_owned();
    let http = keel_serve::client::new();
    let dir = up.data_dir().join("grading");
    for instance in ["grading-1", "grading-2"] {
        assert!(
            dir.join(format!("{instance}.sqlite3")).exists(),
            "{instance}'s file in {dir:?}"
        );
    }
    // Each says where it stands.
    for label in ["grading#1", "grading#2"] {
        let view = get_json(&http, &format!("{}/view", up.url(label))).await;
        assert_eq!(view["ready"], true, "{view}");
        assert_eq!(view["topic"], "grading", "{view}");
        assert!(
            view["file"].as_str().unwrap().ends_with(".sqlite3"),
            "{view}"
        );
    }

    // Written through the gateway (to either instance), read from each directly.
    let acked = Arc::new(Mutex::new(Vec::new()));
    post_grades(
        http.clone(),
        gateway.clone(),
        "First",
        10,
        Arc::clone(&acked),
    )
    .await;
    views_should_agree(&http, &up, &snapshot(&acked)).await;

    // kill -9 of an instance while grades are posted: nothing acknowledged lost,
    // nothing applied twice.
    let load = tokio::spawn(post_grades(
        http.clone(),
        gateway.clone(),
        "During",
        30,
        Arc::clone(&acked),
    ));
    eventually(Duration::from_secs(30), "grades are being posted", || {
        let acked = Arc::clone(&acked);
        async move {
            let during = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| t.starts_with("During"))
                .count();
            (during >= 3).then_some(())
        }
    })
    .await;
    signal(up.pid("grading#1"), rustix::process::Signal::KILL);
    up.restarted("grading#1", true).await;
    load.await.unwrap();
    views_should_agree(&http, &up, &snapshot(&acked)).await;

    // A deleted file: the instance builds it again from the topic, then agrees.
    let file = dir.join("grading-2.sqlite3");
    for suffix in ["", "-wal", "-shm"] {
        let mut path = file.clone().into_os_string();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
    signal(up.pid("grading#2"), rustix::process::Signal::KILL);
    up.restarted("grading#2", true).await;
    assert!(file.exists(), "grading-2's file is built again");
    let said = std::fs::read_to_string(up.data_dir().join("up-logs/grading-2.log")).unwrap();
    assert!(said.contains("no grading view yet"), "{said}");
    post_grades(
        http.clone(),
        gateway.clone(),
        "After",
        5,
        Arc::clone(&acked),
    )
    .await;
    views_should_agree(&http, &up, &snapshot(&acked)).await;
}

/// The grades acknowledged so far.
fn snapshot(acked: &Mutex<Vec<(String, u64)>>) -> Vec<(String, u64)> {
    acked.lock().unwrap().clone()
}
