//! The service at the process's limits: few file descriptors, many connections.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::KEEL;

/// At `ulimit -n 256`, 300 half-sent request heads: the service fits its connection
/// limit under the descriptors it has (and says so), never runs out of them, and
/// answers again once the header deadline has cut the slow heads.
#[test]
fn at_a_low_open_files_limit_the_log_service_should_fit_its_connections_and_keep_serving() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipping: prlimit (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keel.toml");
    std::fs::write(&config, "[log]\nheader_timeout = \"500ms\"\n").unwrap();
    let mut child = Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(std::env::var("KEEL_TEST_BINARY").unwrap_or_else(|_| KEEL.to_owned()))
        .args(["log", "serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("KEEL_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .find(|word| word.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();

    let mut heads = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(&addr).unwrap();
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n");
        heads.push(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        let answered = TcpStream::connect(&addr).ok().and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .ok()?;
            let mut status = String::new();
            BufReader::new(stream).read_line(&mut status).ok()?;
            Some(status)
        });
        if let Some(status) = answered.filter(|status| status.contains(" 200 ")) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the service never answered again"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(healthy.starts_with("HTTP/1.1 200"));
    drop(heads);
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("open-files limit"),
        "the service says it fitted max_connections: {stderr}"
    );
    assert!(
        !stderr.contains("Too many open files"),
        "the service ran out of descriptors: {stderr}"
    );
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// 200 topics created in a burst, then left idle: they cost no thread each once
/// their writers have lingered (two threads per topic, for life, exhausted the
/// process before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_topics_should_cost_no_thread() {
    let dir = tempfile::tempdir().unwrap();
    let served = crate::support::Served::start(dir.path(), &["--sync", "never"]);
    let pid = served.child.id();
    let client = keel_serve::client::new();
    let baseline = threads_of(pid);
    let writes: Vec<_> = (0..200)
        .map(|n| {
            let request = client
                .post(format!("http://{}/v1/topics/idle-{n}/records", served.addr))
                .body(format!("record of topic {n}"));
            tokio::spawn(async move { request.send().await.unwrap().status() })
        })
        .collect();
    for write in writes {
        assert_eq!(write.await.unwrap(), reqwest::StatusCode::OK);
    }
    let busiest = threads_of(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = threads_of(pid);
        if now <= baseline + 8 {
            eprintln!("threads: {baseline} before, {busiest} after the burst, {now} once idle");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "200 idle topics still hold {now} threads ({baseline} before)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
