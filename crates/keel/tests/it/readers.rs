//! Readers that stop reading: the service's memory stays bounded in bytes, whatever
//! their number and the size of the records they asked for.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use keel_log::Client;
use keel_proto::log::v1 as wire;

use crate::support::{Served, eventually};

const MIB: u64 = 1024 * 1024;

/// The resident set of a process, in bytes: (now, peak).
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in {status}"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn read_ahead_bytes(addr: &str) -> u64 {
    let metrics = keel_serve::client::new()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("keel_log_read_ahead_bytes "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no read-ahead gauge in {metrics}"))
}

/// The scenario that once took the service from 22 MB to gigabytes: a topic of
/// 100 records of 1 MB; 8 SSE tails and 6 `ConsumeBatchStream`s (8 MiB per message)
/// that never read; 4 range reads of up to 10 000 records at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_should_hold_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), &["--sync", "never"]);
    let pid = served.child.id();
    let mut client = Client::connect(&served.addr).await.unwrap();
    let (idle, _) = rss(pid);
    let record = bytes::Bytes::from(vec![b'm'; 1_000_000]);
    for _ in 0..100 {
        client.produce("big", record.clone()).await.unwrap();
    }
    let (before, _) = rss(pid);

    // SSE tails from offset 0 that never read a byte of their responses.
    let mut tails = Vec::new();
    for _ in 0..8 {
        let mut socket = TcpStream::connect(&served.addr).unwrap();
        socket
            .write_all(b"GET /v1/topics/big/tail?from=0 HTTP/1.1\r\nHost: keel\r\n\r\n")
            .unwrap();
        tails.push(socket);
    }
    // Batched streams whose callers never poll them.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut client = Client::connect(&served.addr).await.unwrap();
        let stream = client
            .grpc()
            .consume_batch_stream(wire::ConsumeBatchRequest {
                topic: "big".into(),
                offset: 0,
                max_bytes: 8 * MIB as u32,
                follow: true,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push((client, stream));
    }
    // Range reads: each response is capped, so these finish.
    let ranges: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("http://{}/v1/topics/big/records?max=10000", served.addr);
            tokio::spawn(async move {
                keel_serve::client::new()
                    .get(url)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            })
        })
        .collect();
    for range in ranges {
        let body = range.await.unwrap();
        assert!(
            body.len() < 8 * MIB as usize,
            "a range response of {} bytes",
            body.len()
        );
    }

    // Every stalled reader holds its read-ahead; the gauge settles at their sum.
    let addr = served.addr.clone();
    let mut last = 0;
    eventually("the stalled readers fill their read-ahead", async || {
        let held = read_ahead_bytes(&addr).await;
        let settled = held > 0 && held == last;
        last = held;
        tokio::time::sleep(Duration::from_millis(200)).await;
        settled
    })
    .await;
    let held = read_ahead_bytes(&addr).await;
    let (after, peak) = rss(pid);
    eprintln!(
        "stalled readers: RSS {} MiB idle, {} MiB before, {} MiB after, peak {} MiB; read-ahead held {} MiB",
        idle / MIB,
        before / MIB,
        after / MIB,
        peak / MIB,
        held / MIB
    );
    assert!(
        held <= 14 * MIB,
        "each of 14 readers holds at most 1 MiB (one record): {held}"
    );
    // Each reader also has the one message its connection is writing (an SSE event
    // of a 1 MB record is 2.3 MB of JSON); unbounded, they took gigabytes.
    assert!(
        after.saturating_sub(before) < 96 * MIB,
        "stalled readers took the service from {} MiB to {} MiB",
        before / MIB,
        after / MIB
    );
    drop(tails);
    drop(streams);
}
