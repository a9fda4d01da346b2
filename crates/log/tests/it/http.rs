//! The HTTP/JSON API: the original contract, the log sink, the topic routes, and
//! every error as a JSON body with a precise status.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::TestServer;

fn http() -> reqwest::Client {
    keel_serve::client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Sends `request`, checks that it failed with `status` and the JSON error `code`,
/// and returns the error's message.
async fn expect_error(request: reqwest::RequestBuilder, status: StatusCode, code: &str) -> String {
    let response = request
        .send()
        .await
        .expect("an answer, not a dropped connection");
    let got = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_owned();
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{message}"
    );
    message
}

/// The service's `/metrics` text.
async fn metrics_of(client: &reqwest::Client, server: &TestServer) -> String {
    client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn json_of(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[tokio::test]
async fn json_that_go_accepts_should_be_accepted_too() {
    let server = TestServer::start().await;
    let client = http();
    // Base64 whose bits past the last byte are not zero ("z+==" is "z/==", b"\xcf"),
    // and a null value (an empty record), as Go's encoding/json reads them.
    let produced = json_of(
        client
            .post(server.url("/"))
            .json(&json!({"record": {"value": "z+==", "offset": null}})),
    )
    .await;
    assert_eq!(produced, json!({"offset": 0}));
    let produced = json_of(
        client
            .post(server.url("/v1/topics/t/records"))
            .json(&json!({"records": [{"value": null}, {"value": "z+=="}]})),
    )
    .await;
    assert_eq!(produced, json!({"first_offset": 0, "count": 2}));
    // An offset written as a whole number with a zero fraction.
    let consumed = json_of(client.get(server.url("/")).json(&json!({"offset": 0.0}))).await;
    assert_eq!(consumed, json!({"record": {"value": "zw==", "offset": 0}}));
    for offset in [json!(0.5), json!(-1), json!(1e30)] {
        expect_error(
            client
                .get(server.url("/"))
                .json(&json!({ "offset": offset })),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
    }
    let record = json_of(client.get(server.url("/v1/topics/t/records/0"))).await;
    assert_eq!(record["record"]["value"], "");
    // serde would read a struct from an array of its fields; Go does not, nor do we.
    for (path, body) in [
        ("/", "[0]"),
        ("/", r#"{"record":["aGk="]}"#),
        ("/v1/topics/t/records", r#"["aGk="]"#),
        ("/v1/topics/t/records", r#"{"records":[["aGk="]]}"#),
    ] {
        let method = if body == "[0]" { "GET" } else { "POST" };
        let request = client
            .request(method.parse().unwrap(), server.url(path))
            .header("content-type", "application/json")
            .body(body);
        expect_error(request, StatusCode::BAD_REQUEST, "bad_request").await;
    }
}

#[tokio::test]
async fn original_post_and_get_should_speak_base64_json() {
    let server = TestServer::start().await;
    let client = http();
    // "aGVsbG8=" is base64 for "hello", as Go encodes []byte.
    let produced = json_of(
        client
            .post(server.url("/"))
            .json(&json!({"record": {"value": "aGVsbG8=", "offset": 0}})),
    )
    .await;
    assert_eq!(produced, json!({"offset": 0}));
    let consumed = json_of(client.get(server.url("/")).json(&json!({"offset": 0}))).await;
    assert_eq!(
        consumed,
        json!({"record": {"value": "aGVsbG8=", "offset": 0}})
    );
    let message = expect_error(
        client.get(server.url("/")).json(&json!({"offset": 1})),
        StatusCode::NOT_FOUND,
        "offset_out_of_range",
    )
    .await;
    assert!(message.contains("offset 1"), "{message}");
}

#[tokio::test]
async fn bad_input_should_get_400_with_a_json_error() {
    let server = TestServer::start().await;
    let client = http();
    let cases = [
        ("/", "{not json", "malformed JSON"),
        ("/", r#"{"record":{"value":"***"}}"#, "base64"),
        ("/", r#"{"nothing":1}"#, "malformed JSON"),
        ("/v1/topics/t/records", r#"{"value":"%%"}"#, "base64"),
    ];
    for (path, body, expected) in cases {
        let request = client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body);
        let message = expect_error(request, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains(expected), "{body}: {message}");
    }
    expect_error(
        client.get(server.url("/v1/topics/t/records/abc")),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_error(
        client
            .post(server.url("/v1/topics/bad%20name/records"))
            .body("x"),
        StatusCode::BAD_REQUEST,
        "invalid_topic",
    )
    .await;
}

#[tokio::test]
async fn oversized_body_should_get_413_not_a_dropped_connection() {
    let server = TestServer::start().await;
    let client = http();
    // The test server's body limit is 2 MiB, its record limit 1 MiB.
    let url = server.url("/v1/topics/t/records");
    expect_error(
        client.post(&url).body(vec![b'a'; 3 * 1024 * 1024]),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    expect_error(
        client.post(&url).body(vec![b'b'; 1024 * 1024 + 1]),
        StatusCode::PAYLOAD_TOO_LARGE,
        "record_too_large",
    )
    .await;
    // Nothing of either was appended.
    let topics = json_of(client.get(server.url("/v1/topics"))).await;
    assert!(
        topics["topics"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] != "t" || t["next_offset"] == 0)
    );
}

#[tokio::test]
async fn unknown_route_and_wrong_method_should_be_json_404_and_405() {
    let server = TestServer::start().await;
    let client = http();
    expect_error(
        client.get(server.url("/no/such/route")),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_error(
        client.delete(server.url("/log")),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    expect_error(
        client.get(server.url("/v1/topics/missing/records/0")),
        StatusCode::NOT_FOUND,
        "unknown_topic",
    )
    .await;
}

#[tokio::test]
async fn log_sink_should_append_lines_to_the_logs_topic_and_reject_empty_ones() {
    let server = TestServer::start().await;
    let client = http();
    assert_eq!(
        json_of(client.post(server.url("/log")).body("visit 1\n")).await,
        json!({"offset": 0})
    );
    let record = json_of(client.get(server.url("/v1/topics/logs/records/0"))).await;
    assert_eq!(
        record["record"]["text"], "visit 1",
        "the trailing newline is not part of the line"
    );
    assert!(record["record"]["timestamp_ms"].as_u64().unwrap() > 0);
    for blank in ["", " \n"] {
        expect_error(
            client.post(server.url("/log")).body(blank),
            StatusCode::BAD_REQUEST,
            "bad_request",
        )
        .await;
    }
}

#[tokio::test]
async fn topic_routes_should_append_raw_and_json_and_read_single_and_ranges() {
    let server = TestServer::start().await;
    let client = http();
    let url = server.url("/v1/topics/events/records");
    assert_eq!(
        json_of(client.post(&url).body("raw bytes")).await,
        json!({"first_offset": 0, "count": 1})
    );
    let batch = json!({"records": [{"value": "b25l"}, {"value": "dHdv"}]});
    assert_eq!(
        json_of(client.post(&url).json(&batch)).await,
        json!({"first_offset": 1, "count": 2})
    );

    let one = json_of(client.get(server.url("/v1/topics/events/records/2"))).await;
    assert_eq!(
        (
            one["record"]["text"].as_str(),
            one["record"]["value"].as_str()
        ),
        (Some("two"), Some("dHdv"))
    );
    let range = json_of(client.get(server.url("/v1/topics/events/records?from=1&max=5"))).await;
    let texts: Vec<&str> = range["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    assert_eq!(range["next_offset"], 3);
    expect_error(
        client.get(server.url("/v1/topics/events/records/3")),
        StatusCode::NOT_FOUND,
        "offset_out_of_range",
    )
    .await;

    let listed = json_of(client.get(server.url("/v1/topics"))).await;
    let events = listed["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "events")
        .unwrap();
    assert_eq!(events["next_offset"], 3);
    assert!(events["size_bytes"].as_u64().unwrap() > 16);
}

#[tokio::test]
async fn sse_tail_should_replay_and_deliver_new_records() {
    let server = TestServer::start().await;
    let client = http();
    client
        .post(server.url("/v1/topics/live/records"))
        .body("before")
        .send()
        .await
        .unwrap();
    let response = client
        .get(server.url("/v1/topics/live/tail?from=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let poster = client.clone();
    let url = server.url("/v1/topics/live/records");
    tokio::spawn(async move { poster.post(url).body("after").send().await.unwrap() });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text.contains("\"after\"") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("id: 0") && text.contains("\"text\":\"before\""),
        "{text}"
    );
    assert!(text.contains("id: 1"), "{text}");
}

#[tokio::test]
async fn healthz_and_metrics_should_report_the_service() {
    let server = TestServer::start().await;
    let client = http();
    assert_eq!(
        json_of(client.get(server.url("/healthz"))).await,
        json!({"status": "ok"})
    );
    client
        .post(server.url("/log"))
        .body("one line")
        .send()
        .await
        .unwrap();
    let metrics = metrics_of(&client, &server).await;
    assert!(
        metrics.contains("keel_log_appended_records_total{topic=\"logs\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_log_commit_seconds_count{topic=\"logs\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE keel_log_commit_seconds histogram"));
    assert!(
        metrics.contains("keel_log_read_records_total{topic=\"logs\"} 0"),
        "nothing read yet: {metrics}"
    );

    // Reads count by any API: a range over HTTP, then one record over gRPC.
    let range = client
        .get(server.url("/v1/topics/logs/records?from=0"))
        .send()
        .await
        .unwrap();
    assert!(range.status().is_success());
    range.bytes().await.unwrap();
    server.client().await.consume("logs", 0).await.unwrap();
    let metrics = metrics_of(&client, &server).await;
    assert!(
        metrics.contains("keel_log_read_records_total{topic=\"logs\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_log_read_bytes_total{topic=\"logs\"} 16"),
        "two reads of 8 bytes: {metrics}"
    );
    let reads_timed: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("keel_log_read_seconds_count{topic=\"logs\"} "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no read time for logs: {metrics}"));
    assert!(
        reads_timed >= 2,
        "each read from the files is timed: {metrics}"
    );
    assert!(
        metrics.contains("keel_log_append_seconds_count 1"),
        "the one line appended: {metrics}"
    );
}

#[tokio::test]
async fn topic_creation_should_stop_at_max_topics() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(keel_log::LogServiceConfig {
        max_topics: 3,
        ..crate::support::config(dir.path())
    })
    .await;
    let client = http();
    // The default topic and the log sink exist from the start: one more fits.
    let first = client
        .post(server.url("/v1/topics/first/records"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let message = expect_error(
        client
            .post(server.url("/v1/topics/second/records"))
            .body("x"),
        StatusCode::INSUFFICIENT_STORAGE,
        "too_many_topics",
    )
    .await;
    assert!(message.contains("max_topics"), "{message}");
    // The topics there keep taking records.
    let again = client
        .post(server.url("/v1/topics/first/records"))
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let topics = json_of(client.get(server.url("/v1/topics"))).await;
    assert_eq!(topics["topics"].as_array().unwrap().len(), 3, "{topics}");
}

/// Whether the server closes `stream` (end of stream or a reset, after any answer)
/// within ten seconds.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn half_sent_heads_should_be_closed_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(keel_log::LogServiceConfig {
        header_timeout: Duration::from_millis(300),
        ..crate::support::config(dir.path())
    })
    .await;
    let mut half_sent = Vec::new();
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n")
            .await
            .unwrap();
        half_sent.push(stream);
    }
    for stream in &mut half_sent {
        assert!(
            closed_by_server(stream).await,
            "a half-sent head holds its connection"
        );
    }
    let healthy = http().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(healthy.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_should_be_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(keel_log::LogServiceConfig {
        header_timeout: Duration::from_millis(300),
        ..crate::support::config(dir.path())
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_by_server(&mut silent).await,
        "a connection that never sends a byte holds its slot"
    );
}

#[tokio::test]
async fn connections_past_max_connections_should_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(keel_log::LogServiceConfig {
        max_connections: 2,
        ..crate::support::config(dir.path())
    })
    .await;
    let hogs = [
        tokio::net::TcpStream::connect(server.addr).await.unwrap(),
        tokio::net::TcpStream::connect(server.addr).await.unwrap(),
    ];
    let client = keel_serve::client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let waited = client
        .get(server.url("/healthz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        waited.is_err(),
        "a third connection is not served while two are open"
    );
    drop(hogs);
    let served = client
        .get(server.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_topic_that_cannot_open_should_not_stop_the_others() {
    let mut server = TestServer::start().await;
    let client = http();
    for topic in ["good", "bad"] {
        let appended = client
            .post(server.url(&format!("/v1/topics/{topic}/records")))
            .body("kept")
            .send()
            .await
            .unwrap();
        assert_eq!(appended.status(), StatusCode::OK);
    }
    server.stop().await;
    let dir = server.take_dir();
    // The bad topic's only segment gets a store header of another format.
    let store = dir.path().join("topics/bad/00000000000000000000.log");
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[..4].copy_from_slice(b"JUNK");
    std::fs::write(&store, bytes).unwrap();

    let server = TestServer::start_on(server.addr, crate::support::config(dir.path())).await;
    let good = json_of(client.get(server.url("/v1/topics/good/records/0"))).await;
    assert_eq!(good["record"]["text"], "kept", "{good}");
    let message = expect_error(
        client.get(server.url("/v1/topics/bad/records/0")),
        StatusCode::SERVICE_UNAVAILABLE,
        "topic_unavailable",
    )
    .await;
    assert!(message.contains("00000000000000000000.log"), "{message}");
    expect_error(
        client.post(server.url("/v1/topics/bad/records")).body("x"),
        StatusCode::SERVICE_UNAVAILABLE,
        "topic_unavailable",
    )
    .await;
    let health = json_of(client.get(server.url("/healthz"))).await;
    assert_eq!(health["unavailable_topics"], json!(["bad"]), "{health}");
    let metrics = metrics_of(&client, &server).await;
    assert!(
        metrics.contains("keel_log_unavailable_topics 1"),
        "{metrics}"
    );
}

/// A tmpfs of a few hundred KiB on a temp dir, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` where mounting is not allowed (it needs root).
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k", "keel-test-disk"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Self { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_should_answer_507_storage_full_and_lose_nothing() {
    let Some(disk) = SmallDisk::mount() else {
        eprintln!(
            "skipping a_full_disk_should_answer_507_storage_full_and_lose_nothing: cannot mount a tmpfs here (needs root)"
        );
        return;
    };
    let mut config = crate::support::config(disk.dir.path());
    config.log.preallocate_bytes = 0;
    let server = TestServer::start_with(config).await;
    let client = http();
    let url = server.url("/v1/topics/t/records");
    let mut acknowledged = 0;
    let full = loop {
        assert!(
            acknowledged < 100,
            "a 512 KiB disk took 100 records of 64 KiB"
        );
        let response = client
            .post(&url)
            .body(vec![b'r'; 64 * 1024])
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::OK {
            break response;
        }
        acknowledged += 1;
    };
    assert_eq!(full.status(), StatusCode::INSUFFICIENT_STORAGE);
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_full", "{body}");
    // Retryable: the write was undone and the topic takes the next request as usual.
    expect_error(
        client.post(&url).body(vec![b'r'; 64 * 1024]),
        StatusCode::INSUFFICIENT_STORAGE,
        "storage_full",
    )
    .await;
    for offset in 0..acknowledged {
        let record = client
            .get(server.url(&format!("/v1/topics/t/records/{offset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(record.status(), StatusCode::OK, "record {offset}");
    }
    let metrics = metrics_of(&client, &server).await;
    assert!(
        metrics.contains("keel_log_storage_full_total{topic=\"t\"} 2"),
        "{metrics}"
    );
    drop(server);
}

/// fsyncgate, through the service: a failed fsync kills the topic (503
/// `storage_failed`, listed by /healthz and a gauge) instead of serving records the
/// disk may have dropped; the other topics serve; a restart brings it back at its
/// synced length.
#[tokio::test]
async fn a_failed_fsync_should_mark_the_topic_failed_and_keep_only_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config(dir.path());
    let mut server = TestServer::start_with(config.clone()).await;
    let client = http();
    let url = server.url("/v1/topics/t/records");
    for offset in 0..3 {
        let body = json_of(client.post(&url).body("synced")).await;
        assert_eq!(body["first_offset"], offset, "{body}");
    }
    let other = server.url("/v1/topics/other/records");
    json_of(client.post(&other).body("kept")).await;

    let faults = keel_commitlog::fail_syncs_under(&dir.path().join("topics").join("t"));
    // Its sync fails: it is not acknowledged, and the topic is dead.
    let message = expect_error(
        client.post(&url).body("lost"),
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_failed",
    )
    .await;
    assert!(
        message.contains("fsync") && message.contains("from offset 3 on"),
        "{message}"
    );
    expect_error(
        client.post(&url).body("later"),
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_failed",
    )
    .await;
    let topics = json_of(client.get(server.url("/v1/topics"))).await;
    let topic = topics["topics"]
        .as_array()
        .and_then(|all| all.iter().find(|topic| topic["name"] == "t"))
        .cloned();
    assert_eq!(
        topic.as_ref().map(|topic| topic["next_offset"].clone()),
        Some(json!(3)),
        "only synced records stay: {topics}"
    );
    expect_error(
        client.get(server.url("/v1/topics/t/records/3")),
        StatusCode::NOT_FOUND,
        "offset_out_of_range",
    )
    .await;
    let health = json_of(client.get(server.url("/healthz"))).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["failed_topics"], json!(["t"]), "{health}");
    let metrics = metrics_of(&client, &server).await;
    assert!(metrics.contains("keel_log_failed_topics 1"), "{metrics}");
    json_of(client.post(&other).body("still")).await;

    server.stop().await;
    drop(faults);
    let server = TestServer::start_with(config).await;
    let body = json_of(
        client
            .post(server.url("/v1/topics/t/records"))
            .body("again"),
    )
    .await;
    assert_eq!(body["first_offset"], 3, "{body}");
    let health = json_of(client.get(server.url("/healthz"))).await;
    assert_eq!(health["status"], "ok", "{health}");
}

/// Under an interval policy the service serves, and an idle topic is synced within
/// the interval: its index file (written only for synced records) gains the entries.
#[tokio::test]
async fn given_interval_sync_policy_an_idle_topic_should_be_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config(dir.path());
    config.log.sync = keel_log::SyncPolicy::Interval(Duration::from_millis(50));
    let server = TestServer::start_with(config).await;
    let client = http();
    for i in 0..3 {
        let body = json_of(client.post(server.url("/v1/topics/t/records")).body("idle")).await;
        assert_eq!(body["first_offset"], i, "{body}");
    }
    let index = dir.path().join("topics/t/00000000000000000000.index");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = (std::fs::metadata(&index).unwrap().len() - 16) / 8;
        if entries == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle topic was not synced: {entries} index entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A topic created by its first write is durable before that write is acknowledged:
/// its directory, `topics/` and the data directory were each synced in their parent.
#[tokio::test]
async fn a_new_topic_should_sync_every_parent_directory_before_its_first_ack() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = TestServer::start_with(crate::support::config(&data)).await;
    let client = http();
    json_of(
        client
            .post(server.url("/v1/topics/fresh/records"))
            .body("first"),
    )
    .await;
    let synced = keel_commitlog::synced_dirs_under(root.path());
    for dir in [
        root.path().to_path_buf(),
        data.clone(),
        data.join("topics"),
        data.join("topics").join("fresh"),
    ] {
        assert!(
            synced.contains(&dir),
            "{} not synced: {synced:?}",
            dir.display()
        );
    }
}

#[tokio::test]
async fn the_openapi_document_should_be_served_and_match_every_route_and_method() {
    let server = TestServer::start().await;
    let wrong = keel_serve::openapi::check_served(
        &server.url(""),
        include_str!("../../../../docs/api/log.openapi.json"),
        &[("topic", "t"), ("offset", "0")],
    )
    .await
    .unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");
}
