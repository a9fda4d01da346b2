//! HTTP/1.1 on the wire, with raw clients and scripted upstreams: pipelining, chunked
//! answers, HTTP/1.0, `Expect: 100-continue`, early answers, malformed requests,
//! stale pooled connections, idle clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Running, backend, counter, gateway, register, registry, until_routed};

/// How long any single step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// A raw client connection that reads answers as bytes.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.unwrap();
    }

    /// Reads more into the buffer; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
            .await
            .expect("the gateway answers within the step")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..at].to_vec()).unwrap();
                self.buf.drain(..at + 2);
                return line;
            }
            assert!(self.fill().await, "the connection closed mid-line");
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "the connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one answer; `bodiless` for an answer to HEAD.
    async fn answer(&mut self, bodiless: bool) -> Answer {
        let status_line = self.line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if bodiless || status < 200 || status == 204 || status == 304 {
            return answer;
        }
        if answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = self.line().await;
                let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let data = self.take(size).await;
                answer.body.extend_from_slice(&data);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        } else if let Some(length) = answer.header("content-length") {
            let length = length.parse().unwrap();
            answer.body = self.take(length).await;
        } else {
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    /// Whether the gateway closes the connection (read returns end of stream) within
    /// the step.
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(STEP, self.stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

/// An upstream that answers each request head it reads with `answer(head)`: the bytes
/// to send and whether to close the connection afterwards (without saying so).
async fn scripted<F>(answer: F) -> SocketAddr
where
    F: Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
{
    scripted_reporting(answer).await.0
}

/// [`scripted`], also saying each time the writing of an answer it closes after has
/// ended, whole or cut short.
async fn scripted_reporting<F>(answer: F) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>)
where
    F: Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    let (ended, endings) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (answer, ended) = (std::sync::Arc::clone(&answer), ended.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let (bytes, close) = answer(&head);
                    let written = stream.write_all(&bytes).await;
                    if close {
                        let _ = ended.send(());
                    }
                    if written.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, endings)
}

/// A gateway routing `service` to `upstream`, answering already.
async fn routed_to(service: &str, upstream: SocketAddr) -> (Running, Running) {
    routed_with(service, upstream, |_| {}).await
}

async fn routed_with(
    service: &str,
    upstream: SocketAddr,
    tune: impl FnOnce(&mut keel_gateway::GatewayConfig),
) -> (Running, Running) {
    let registry = registry().await;
    register(registry.addr, service, upstream).await;
    let gateway = gateway(registry.addr, tune).await;
    let deadline = Instant::now() + STEP;
    loop {
        let mut client = Client::connect(gateway.addr).await;
        client
            .send(format!("GET /{service}/ready HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .await;
        if client.answer(false).await.status != 404 {
            break;
        }
        assert!(Instant::now() < deadline, "{service} never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (registry, gateway)
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn pipelined_requests_should_be_answered_in_order_on_one_connection() {
    let upstream = scripted(|head| {
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        (ok(&path), false)
    })
    .await;
    let (_registry, gateway) = routed_to("pipe", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(
            b"GET /pipe/1 HTTP/1.1\r\nhost: t\r\n\r\nHEAD /pipe/2 HTTP/1.1\r\nhost: t\r\n\r\n\
              GET /pipe/3 HTTP/1.1\r\nhost: t\r\n\r\n",
        )
        .await;
    assert_eq!(client.answer(false).await.body, b"/pipe/1");
    let head = client.answer(true).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some("7"),
        "HEAD keeps the length"
    );
    assert_eq!(client.answer(false).await.body, b"/pipe/3");
}

const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-upstream: yes\r\n\r\n\
    5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n";

#[tokio::test]
async fn a_chunked_answer_should_stream_as_chunks_and_keep_the_connection_open() {
    let upstream = scripted(|_| (CHUNKED.to_vec(), false)).await;
    let (_registry, gateway) = routed_to("chunks", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    for _ in 0..3 {
        client
            .send(b"GET /chunks/ HTTP/1.1\r\nhost: t\r\n\r\n")
            .await;
        let answer = client.answer(false).await;
        assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
        assert_eq!(answer.header("x-upstream"), Some("yes"));
        assert_eq!(answer.body, b"hello, world");
    }
}

#[tokio::test]
async fn an_http10_client_should_get_chunked_data_plain_until_close() {
    let upstream = scripted(|_| (CHUNKED.to_vec(), false)).await;
    let (_registry, gateway) = routed_to("old", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(b"GET /old/ HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("transfer-encoding"), None);
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(answer.body, b"hello, world");
}

#[tokio::test]
async fn an_answer_delimited_by_close_should_arrive_whole_and_close_the_client() {
    let upstream = scripted(|_| (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true)).await;
    let (_registry, gateway) = routed_to("eof", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    client.send(b"GET /eof/ HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let answer = client.answer(false).await;
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(answer.body, b"until the end");
}

#[tokio::test]
async fn a_client_expecting_100_continue_should_get_it_then_the_answer() {
    let registry = registry().await;
    let echo = backend("a").await;
    register(registry.addr, "echo", echo.running.addr).await;
    let gateway = gateway(registry.addr, |_| {}).await;
    until_routed(gateway.addr, "echo", 1).await;

    let mut client = Client::connect(gateway.addr).await;
    client
        .send(
            b"PUT /echo/x HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
        )
        .await;
    let interim = client.answer(false).await;
    assert_eq!(interim.status, 100);
    client.send(b"hello").await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(echo["body"], "hello");
    assert!(
        echo["headers"].get("expect").is_none(),
        "the gateway answered the expectation itself: {echo}"
    );
}

#[tokio::test]
async fn malformed_or_ambiguous_requests_should_be_400_and_close() {
    let upstream = scripted(|_| (ok("reached"), false)).await;
    let (_registry, gateway) = routed_to("strict", upstream).await;
    for (raw, status) in [
        (&b"GET /strict/ HTTP/1.1\r\nbad header\r\n\r\n"[..], 400),
        (
            b"POST /strict/ HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST /strict/ HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            400,
        ),
        (
            b"POST /strict/ HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
            501,
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ] {
        let mut client = Client::connect(gateway.addr).await;
        client.send(raw).await;
        let answer = client.answer(false).await;
        assert_eq!(
            answer.status,
            status,
            "{:?}: {}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&answer.body)
        );
        let error: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert!(error["error"]["message"].is_string(), "{error}");
        assert!(client.closed().await);
    }
}

#[tokio::test]
async fn a_malformed_chunked_request_body_should_be_400() {
    let upstream = scripted(|_| (ok("reached"), false)).await;
    let (_registry, gateway) = routed_to("chunky", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(b"POST /chunky/ HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        .await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status, 400);
    assert!(
        String::from_utf8_lossy(&answer.body).contains("chunked"),
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

#[tokio::test]
async fn an_answer_before_the_whole_body_should_be_relayed_and_end_the_client_connection() {
    // The upstream refuses the upload after its head (keeping the connection, as far
    // as it says), then drains until the gateway hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if !buf.starts_with(b"POST") {
                    let answer =
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = stream.write_all(answer).await;
                    return;
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";
                let _ = stream.write_all(answer).await;
                while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
            });
        }
    });
    // One serving thread: one pool, which the next client's request draws from.
    let (_registry, gateway) = routed_with("upload", upstream, |config| config.workers = 1).await;
    let mut client = Client::connect(gateway.addr).await;
    // 10 MiB announced (streamed, past the retry buffer), 1 KiB sent.
    client
        .send(b"POST /upload/ HTTP/1.1\r\nhost: t\r\ncontent-length: 10485760\r\n\r\n")
        .await;
    client.send(&[b'x'; 1024]).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.body, b"too big!");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(client.closed().await);
    // The upstream connection was left mid-body: the next request needs another.
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(b"GET /upload/ HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    assert_eq!(client.answer(false).await.body, b"ok");
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_should_not_fail_requests() {
    // Each connection serves one answer and closes, without saying so.
    let upstream = scripted(|_| (ok("fresh"), true)).await;
    let (_registry, gateway) = routed_to("flaky", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    for n in 0..20 {
        client
            .send(b"GET /flaky/ HTTP/1.1\r\nhost: t\r\n\r\n")
            .await;
        let answer = client.answer(false).await;
        assert_eq!(
            answer.status,
            200,
            "request {n}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
}

#[tokio::test]
async fn an_idle_client_connection_should_be_closed_after_the_idle_timeout() {
    let upstream = scripted(|_| (ok("hi"), false)).await;
    let (_registry, gateway) = routed_with("idle", upstream, |config| {
        config.idle_timeout = Duration::from_millis(200);
    })
    .await;
    let mut client = Client::connect(gateway.addr).await;
    client.send(b"GET /idle/ HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(client.answer(false).await.body, b"hi");
    let started = Instant::now();
    assert!(client.closed().await, "the idle connection closes");
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

/// The gateway's `keel_gateway_ejections_total`.
async fn ejections(gateway: &Running) -> u64 {
    counter(gateway, "keel_gateway_ejections_total").await
}

#[tokio::test]
async fn a_slow_upload_should_get_408_and_never_eject_the_instance() {
    let echo = backend("a").await;
    let (_registry, gateway) = routed_with("echo", echo.running.addr, |config| {
        config.body_timeout = Duration::from_millis(300);
        config.request_timeout = Duration::from_secs(30);
        config.eject_after = 1;
    })
    .await;
    // Streamed (over the 64 KiB retry buffer) and buffered bodies alike: ten bytes
    // of the length promised, then nothing.
    for length in [100_000, 1_000, 100_000] {
        let mut client = Client::connect(gateway.addr).await;
        client
            .send(
                format!("POST /echo/sink HTTP/1.1\r\nhost: t\r\ncontent-length: {length}\r\n\r\n0123456789")
                    .as_bytes(),
            )
            .await;
        let answer = client.answer(false).await;
        assert_eq!(
            answer.status,
            408,
            "{:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(
            String::from_utf8_lossy(&answer.body).contains("request_timeout"),
            "{answer:?}"
        );
    }
    assert_eq!(
        ejections(&gateway).await,
        0,
        "a slow client is not the instance's failure"
    );
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(b"GET /echo/after HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    assert_eq!(client.answer(false).await.status, 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_should_not_hold_its_upstream_connection() {
    // An upstream that sends a 64 MiB answer and says when its writing ended.
    let (upstream, mut upstream_gone) = scripted_reporting(|head| {
        if head.contains("/ready") {
            return (ok("ready"), false);
        }
        let total = 64 * 1024 * 1024;
        let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").into_bytes();
        out.resize(out.len() + total, b'x');
        (out, true)
    })
    .await;
    let (_registry, gateway) = routed_with("big", upstream, |config| {
        config.send_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(b"GET /big/file HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    // The client reads nothing. Its socket buffers fill, the gateway's writes block,
    // and past the send timeout the gateway lets go of both connections: the
    // upstream's write of its answer ends (failed, or cut short).
    tokio::time::timeout(STEP, upstream_gone.recv())
        .await
        .expect("the gateway let go of the upstream connection");
    // What the client's buffers held, and then the end: the answer was cut short.
    let mut received = client.buf.len();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(STEP, client.stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received += n,
            Err(_) => panic!("the client connection is still open after {received} bytes"),
        }
    }
    assert!(
        received < 64 * 1024 * 1024,
        "{received} bytes: the answer was cut short"
    );
}

#[tokio::test]
async fn heads_the_gateway_cannot_trust_should_be_refused() {
    let upstream = scripted(|_| (ok("reached"), false)).await;
    let (_registry, gateway) = routed_to("strict", upstream).await;
    let long_line = format!(
        "GET /strict/{} HTTP/1.1\r\nhost: t\r\n\r\n",
        "a".repeat(30 * 1024)
    );
    for (raw, status) in [
        (&b"GET /strict/ HTTP/1.1\r\nx: y\r\n\r\n"[..], 400),
        (b"GET /strict/ HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
        (b"GET /strict/ HTTP/1.1\nhost: t\n\n", 400),
        (b"GET /strict/ HTTP/1.1\r\nhost: t\nx: y\r\n\r\n", 400),
        // A 30 KiB request line arriving in one write.
        (long_line.as_bytes(), 431),
        (
            b"POST /strict/ HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5;\x01\x7f\"garbage\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /strict/ HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nGET /strict/x HTTP/1.1\r\n\r\n",
            400,
        ),
    ] {
        let mut client = Client::connect(gateway.addr).await;
        client.send(raw).await;
        let answer = client.answer(false).await;
        assert_eq!(
            answer.status,
            status,
            "{:?}: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)]),
            String::from_utf8_lossy(&answer.body)
        );
    }
    // HTTP/1.0 may leave the host out.
    let mut client = Client::connect(gateway.addr).await;
    client.send(b"GET /strict/ HTTP/1.0\r\n\r\n").await;
    assert_eq!(client.answer(false).await.status, 200);
}

#[tokio::test]
async fn the_instance_should_never_see_forwarding_headers_or_underscored_names_from_the_client() {
    // The upstream answers with the head it received.
    let upstream = scripted(|head| (ok(head), false)).await;
    let (_registry, gateway) = routed_to("echo", upstream).await;
    let mut client = Client::connect(gateway.addr).await;
    client
        .send(
            b"POST /echo/x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nContent_Length: 999\r\n\
              Transfer_Encoding: chunked\r\nForwarded: for=6.6.6.6;host=evil\r\n\
              X-Forwarded-Prefix: /evil\r\nX-Forwarded-Host: evil\r\nX-Kept: yes\r\n\r\nhello",
        )
        .await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status, 200);
    let seen = String::from_utf8_lossy(&answer.body).to_ascii_lowercase();
    for absent in [
        "content_length",
        "transfer_encoding",
        "forwarded: for=6.6.6.6",
        "x-forwarded-prefix",
        "evil",
    ] {
        assert!(
            !seen.contains(absent),
            "{absent} reached the instance: {seen}"
        );
    }
    assert!(
        seen.contains("x-kept: yes") && seen.contains("content-length: 5"),
        "{seen}"
    );
}

/// Slowloris: clients that trickle request heads a byte at a time hold every
/// connection slot, and reconnect when closed. Each legitimate client still gets its
/// answer at once: it takes the slot of the connection that has waited longest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_holding_every_connection_should_not_keep_legitimate_clients_out() {
    const SLOTS: usize = 20;
    let upstream = scripted(|_| (ok("served"), false)).await;
    let (_registry, gateway) = routed_with("loris", upstream, |config| {
        config.max_connections = SLOTS;
    })
    .await;
    let addr = gateway.addr;

    let stop = tokio_util::sync::CancellationToken::new();
    let attackers: Vec<_> = (0..SLOTS)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let head =
                    b"GET /loris/never HTTP/1.1\r\nhost: t\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaa";
                while !stop.is_cancelled() {
                    let Ok(stream) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let (mut reader, mut writer) = stream.into_split();
                    let trickle = async {
                        for byte in head.iter().cycle() {
                            if writer.write_all(&[*byte]).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    };
                    // Reconnect as soon as the gateway closes this one.
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        () = trickle => {}
                        _ = reader.read(&mut byte) => {}
                        () = stop.cancelled() => {}
                    }
                }
            })
        })
        .collect();
    // Every slot is taken once the attackers' connections are accepted.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut latencies = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let mut client = Client::connect(addr).await;
        client
            .send(b"GET /loris/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await;
        let answer = tokio::time::timeout(Duration::from_secs(5), client.answer(false))
            .await
            .expect("a legitimate client is answered while attackers hold every slot");
        assert_eq!(answer.status, 200);
        latencies.push(started.elapsed());
        // Room for the attackers to take every slot again.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for attacker in attackers {
        attacker.await.unwrap();
    }
    latencies.sort();
    eprintln!(
        "legitimate requests under slowloris: p50 {:?}, p99 {:?}, max {:?}",
        latencies[49], latencies[98], latencies[99]
    );
    let shed = counter(&gateway, "keel_gateway_connections_shed_total").await;
    eprintln!("connections shed: {shed}");
    assert!(
        shed >= 50,
        "legitimate clients took the slots of waiting attackers: {shed}"
    );
}
