//! `keel up` end to end: the real binary, every part a real process on free ports,
//! driven through the gateway; and the portal in a headless browser.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::KEEL;

/// A running `keel up`; killed on drop (its parts then stop by themselves).
pub(crate) struct Up {
    pub(crate) child: Child,
    /// label -> (pid, base URL), from the printed table.
    pub(crate) parts: BTreeMap<String, (u32, String)>,
    /// Every URL keel up printed (the table and the ones to try).
    urls: BTreeSet<String>,
    stderr: mpsc::Receiver<String>,
    data: tempfile::TempDir,
}

impl Up {
    pub(crate) fn start(extra: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut args = vec!["up", "--data-dir", data.path().to_str().unwrap()];
        for flag in [
            "--registry-port",
            "--gateway-port",
            "--log-port",
            "--visit-port",
            "--grading-port",
            "--portal-port",
        ] {
            args.extend([flag, "0"]);
        }
        args.extend_from_slice(extra);
        let mut child = Command::new(KEEL)
            .args(&args)
            .env("KEEL_LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (table_tx, table) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = table_tx.send(line);
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (stderr_tx, stderr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[keel up] {line}");
                let _ = stderr_tx.send(line);
            }
        });
        let mut parts = BTreeMap::new();
        let mut urls = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = table.recv_timeout(left).expect("keel up prints its table");
            if line.starts_with("Ctrl-C stops everything") {
                break;
            }
            urls.extend(
                line.split_whitespace()
                    .map(|word| word.trim_matches(|c| c == '\'' || c == ','))
                    .filter(|word| word.starts_with("http://") || word.starts_with("https://"))
                    .map(str::to_owned),
            );
            // "  visit#1      1234     127.0.0.1:5678        http://127.0.0.1:5678/"
            let words: Vec<&str> = line.split_whitespace().collect();
            // The front door of a cluster run has no process of its own: pid 0.
            if let [label, pid, addr, ..] = words[..]
                && let Ok(pid) = pid
                    .parse::<u32>()
                    .or_else(|_| if pid == "-" { Ok(0) } else { Err(()) })
                && let Ok(addr) = addr.parse::<std::net::SocketAddr>()
            {
                parts.insert(label.to_owned(), (pid, format!("http://{addr}")));
            }
        }
        Self {
            child,
            parts,
            urls,
            stderr: stderr_rx,
            data,
        }
    }

    /// Where this run keeps its data.
    pub(crate) fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Every URL keel up printed.
    pub(crate) fn printed_urls(&self) -> impl Iterator<Item = &str> {
        self.urls.iter().map(String::as_str)
    }

    pub(crate) fn url(&self, label: &str) -> &str {
        &self.parts[label].1
    }

    pub(crate) fn pid(&self, label: &str) -> u32 {
        self.parts[label].0
    }

    /// Waits for keel up to exit, at most `limit`.
    pub(crate) async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel up did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until keel up reports `label` restarted and, with `ready`, until its
    /// `/readyz` answers 200.
    pub(crate) async fn restarted(&self, label: &str, ready: bool) {
        self.stderr_line(&format!("{label} restarted"), Duration::from_secs(60));
        if !ready {
            return;
        }
        let ready = format!("{}/readyz", self.url(label));
        eventually(
            Duration::from_secs(30),
            &format!("{label} is ready"),
            || {
                let ready = ready.clone();
                async move {
                    let response = keel_serve::client::new().get(&ready).send().await.ok()?;
                    response.status().is_success().then_some(())
                }
            },
        )
        .await;
    }

    /// Waits for a line of keel up's stderr containing `text`; returns it.
    pub(crate) fn stderr_line(&self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {text:?} from keel up within {limit:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// Polls `check` until it gives a value, at most `limit`.
pub(crate) async fn eventually<T, F: Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_up_should_run_the_system_survive_a_killed_instance_and_stop_cleanly() {
    let mut up = Up::start(&["--instances", "visit=2", "--grace", "10s"]);
    for label in [
        "registry",
        "log",
        "gateway",
        "grading#1",
        "visit#1",
        "visit#2",
        "portal#1",
    ] {
        assert!(up.parts.contains_key(label), "{label} in {:?}", up.parts);
    }
    let gateway = up.url("gateway").to_owned();
    let http = keel_serve::client::new();
    every_printed_url_should_answer(&up, &http).await;
    let count = visits_should_count_up_on_both_instances(&http, &gateway).await;
    grades_should_be_added_and_bad_ones_refused(&http, &gateway).await;
    the_portal_should_show_grades_and_add_one(&http, &gateway).await;
    visit_lines_should_reach_the_logs_topic(&http, up.url("log"), count).await;
    let new_pid = a_killed_instance_should_cost_no_request(&mut up, &http, &gateway).await;
    ctrl_c_should_deregister_every_part_and_leave_no_process(up, &http, new_pid).await;
}

/// Every URL `keel up` printed answers (the gateway's routes once its table is current).
async fn every_printed_url_should_answer(up: &Up, http: &reqwest::Client) {
    // Every URL it printed answers (the gateway's routes once its table is current).
    assert!(up.urls.len() >= 10, "{:?}", up.urls);
    for url in up.urls.clone() {
        let (http, what) = (http.clone(), format!("GET {url} answers 200"));
        eventually(Duration::from_secs(10), &what, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.get(&url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
    }
}

/// Visits count up, shared by both instances, through the gateway; returns the count.
async fn visits_should_count_up_on_both_instances(http: &reqwest::Client, gateway: &str) -> u64 {
    // Visits count up, shared by both instances, through the gateway.
    let visit = |http: reqwest::Client, url: String| async move {
        let response = http.get(url).send().await.ok()?;
        response.status().is_success().then_some(())?;
        response.json::<Value>().await.ok()
    };
    let first = eventually(Duration::from_secs(10), "the gateway routes visit", || {
        visit(http.clone(), format!("{gateway}/visit/"))
    })
    .await;
    let mut count = first["visits"].as_u64().unwrap();
    let mut instances = BTreeSet::from([first["instance"].as_str().unwrap().to_owned()]);
    for _ in 0..5 {
        let next = visit(http.clone(), format!("{gateway}/visit/"))
            .await
            .unwrap();
        assert_eq!(next["visits"].as_u64().unwrap(), count + 1);
        count += 1;
        instances.insert(next["instance"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        instances.len(),
        2,
        "both visit instances served: {instances:?}"
    );

    count
}

/// A grade can be added and read back; bad input is refused precisely.
async fn grades_should_be_added_and_bad_ones_refused(http: &reqwest::Client, gateway: &str) {
    // A grade can be added and read back; bad input is refused precisely.
    let grades = format!("{gateway}/grading/students/3/grades");
    let added = http
        .post(&grades)
        .json(&json!({"title": "End-to-end quiz", "type": "quiz", "score": 64}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), reqwest::StatusCode::CREATED);
    let student: Value = http
        .get(format!("{gateway}/grading/students/3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        student["grades"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["title"] == "End-to-end quiz" && g["score"] == 64.0),
        "{student}"
    );
    let bad = http
        .post(&grades)
        .json(&json!({"title": "x", "type": "quiz", "score": 101}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    let unknown = http
        .post(format!("{gateway}/grading/students/999/grades"))
        .json(&json!({"title": "x", "type": "quiz", "score": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);
}

/// The portal shows the grades, and its form adds one through grading.
async fn the_portal_should_show_grades_and_add_one(http: &reqwest::Client, gateway: &str) {
    // The portal shows it, and its form adds a grade through grading.
    let page = http
        .get(format!("{gateway}/portal/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"<table id="students">"#), "{page}");
    assert!(page.contains("End-to-end quiz"), "{page}");
    // Each grading instance's view: its name, applied offset and lag.
    assert!(page.contains(r#"<table id="views">"#), "{page}");
    assert!(page.contains("<td>grading-1</td>"), "{page}");
    let no_redirects = keel_serve::client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = no_redirects
        .post(format!("{gateway}/portal/grades"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("student=5&title=Portal+lab&type=homework&score=81")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), reqwest::StatusCode::SEE_OTHER);
    // Back to the page, which asks grading for a view that holds the new grade.
    let location = form.headers()["location"].to_str().unwrap().to_owned();
    let offset = location
        .strip_prefix("/portal/?added=Barbara%20Liskov&min_offset=")
        .unwrap_or_else(|| panic!("{location}"));
    assert!(offset.parse::<u64>().is_ok(), "{location}");
    let page = http
        .get(format!("{gateway}{location}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Portal lab"), "{page}");
}

/// The visit log lines (`visit 1` to `visit {count}`) reach the `logs` topic.
async fn visit_lines_should_reach_the_logs_topic(http: &reqwest::Client, log: &str, count: u64) {
    // The visit log lines reach the `logs` topic.
    let log = log.to_owned();
    eventually(
        Duration::from_secs(10),
        "visit lines in the logs topic",
        || {
            let (http, log) = (http.clone(), log.clone());
            async move {
                let records: Value = http
                    .get(format!("{log}/v1/topics/logs/records?from=0&max=1000"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let texts: BTreeSet<&str> = records["records"]
                    .as_array()?
                    .iter()
                    .filter_map(|r| r["text"].as_str())
                    .collect();
                (1..=count)
                    .all(|n| texts.contains(format!("visit {n}").as_str()))
                    .then_some(())
            }
        },
    )
    .await;
}

/// One visit instance killed: every request through the gateway still succeeds, and
/// `keel up` restarts it; returns the new PID.
async fn a_killed_instance_should_cost_no_request(
    up: &mut Up,
    http: &reqwest::Client,
    gateway: &str,
) -> u32 {
    // One visit instance killed: every request through the gateway still succeeds.
    signal(up.pid("visit#1"), rustix::process::Signal::KILL);
    for n in 0..100 {
        let response = http.get(format!("{gateway}/visit/")).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK, "request {n}");
    }
    let restarted = up.stderr_line("visit#1 restarted", Duration::from_secs(30));
    let new_pid: u32 = restarted
        .rsplit("pid ")
        .next()
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .unwrap();

    new_pid
}

/// Ctrl-C: every part deregisters (seen on the registry's stream), then all exit 0
/// and no process outlives `keel up`.
async fn ctrl_c_should_deregister_every_part_and_leave_no_process(
    mut up: Up,
    http: &reqwest::Client,
    new_pid: u32,
) {
    // Ctrl-C: every part deregisters (seen on the registry's stream), then all exit 0.
    let stream = http
        .get(format!("{}/v1/watch/stream", up.url("registry")))
        .send()
        .await
        .unwrap();
    signal(up.child.id(), rustix::process::Signal::INT);
    let mut events = String::new();
    let mut body = stream.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        events.push_str(&String::from_utf8_lossy(&chunk));
    }
    let status = up.exited(Duration::from_secs(60)).await;
    assert!(status.success(), "keel up exited with {status}");
    let gone: BTreeSet<String> = events
        .split("\n\n")
        .filter(|event| event.contains("event: unavailable"))
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data:")))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .filter_map(|instance| instance["url"].as_str().map(str::to_owned))
        .collect();
    for label in ["log", "grading#1", "visit#1", "visit#2", "portal#1"] {
        assert!(
            gone.contains(up.url(label)),
            "{label} ({}) deregistered before the registry stopped: {events}",
            up.url(label)
        );
    }
    let mut pids: Vec<u32> = up.parts.values().map(|(pid, _)| *pid).collect();
    pids.push(new_pid);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived keel up"
        );
    }
}

#[test]
fn keel_up_should_name_the_flag_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(KEEL)
        .args(["up", "--data-dir", data.path().to_str().unwrap()])
        .args([
            "--registry-port",
            "0",
            "--log-port",
            "0",
            "--visit-port",
            "0",
        ])
        .args(["--grading-port", "0", "--portal-port", "0"])
        .args(["--gateway-port", &port])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(70));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("port {port} (gateway)")) && stderr.contains("--gateway-port"),
        "{stderr}"
    );
}

/// Chromium in headless mode, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// Runs headless `browser` with a fresh `profile` and `args`, off the async threads.
async fn headless(browser: &Path, profile: &Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stderr(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_should_render_in_a_headless_browser() {
    let Some(browser) = chromium() else {
        // .ci/run installs Chromium and sets KEEL_REQUIRE_BROWSER, so CI cannot skip.
        assert!(
            std::env::var_os("KEEL_REQUIRE_BROWSER").is_none(),
            "KEEL_REQUIRE_BROWSER is set but no chromium is installed"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let up = Up::start(&[]);
    let portal = format!("{}/portal/", up.url("gateway"));
    let http = keel_serve::client::new();
    // A few visits and a grade, so the log and the table have something to show.
    eventually(
        Duration::from_secs(10),
        "the gateway routes the portal",
        || {
            let (http, url) = (http.clone(), portal.clone());
            async move {
                let page = http.get(url).send().await.ok()?.text().await.ok()?;
                page.contains(r#"id="students""#).then_some(())
            }
        },
    )
    .await;
    for _ in 0..3 {
        http.get(format!("{}/visit/", up.url("gateway")))
            .send()
            .await
            .unwrap();
    }
    http.post(format!("{}/grading/students/4/grades", up.url("gateway")))
        .json(&json!({"title": "Final", "type": "test", "score": 93}))
        .send()
        .await
        .unwrap();
    let profile = tempfile::tempdir().unwrap();

    let dom = headless(&browser, profile.path(), &["--dump-dom", &portal]).await;
    assert!(dom.status.success(), "chromium --dump-dom failed");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains(r#"<table id="students">"#), "{dom}");
    assert!(
        dom.contains("Ada Lovelace") && dom.contains("Final"),
        "{dom}"
    );
    assert!(dom.contains(r#"<table id="services">"#), "{dom}");

    // The screenshot is kept as a test artifact.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("portal.png");
    let _ = std::fs::remove_file(&shot);
    let screenshot = format!("--screenshot={}", shot.display());
    let taken = headless(
        &browser,
        profile.path(),
        &[&screenshot, "--window-size=1280,1100", &portal],
    )
    .await;
    assert!(taken.status.success(), "chromium --screenshot failed");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!("portal screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_should_not_outlive_a_killed_keel_up() {
    let mut up = Up::start(&[]);
    let pids: Vec<u32> = up.parts.values().map(|(pid, _)| *pid).collect();
    assert_eq!(pids.len(), 6);
    // SIGKILL: keel up cannot stop anything; its parts see their stdin close.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    eventually(Duration::from_secs(30), "every part exits", || {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|pid| {
                // A zombie (exited, not yet reaped by init) counts as gone.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| !stat.contains(") Z "))
            })
            .collect();
        async move { alive.is_empty().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_cannot_start_again_should_be_given_up_and_reported() {
    let mut up = Up::start(&[]);
    let visit = up.url("visit#1").trim_start_matches("http://").to_owned();
    signal(up.pid("visit#1"), rustix::process::Signal::KILL);
    // Take its address as soon as the kernel frees it: every restart then fails.
    let _squatter = eventually(Duration::from_secs(10), "visit's port is free", || {
        let taken = std::net::TcpListener::bind(&visit).ok();
        async move { taken }
    })
    .await;
    up.stderr_line(
        "visit#1 failed to start 5 times in a row",
        Duration::from_secs(60),
    );

    // The rest keeps running.
    let students = keel_serve::client::new()
        .get(format!("{}/grading/students", up.url("gateway")))
        .send()
        .await
        .unwrap();
    assert_eq!(students.status(), reqwest::StatusCode::OK);

    // Ctrl-C still stops everything, and the exit code says a part was lost.
    signal(up.child.id(), rustix::process::Signal::INT);
    up.stderr_line("visit#1 was given up earlier", Duration::from_secs(30));
    let status = up.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(70));
}
