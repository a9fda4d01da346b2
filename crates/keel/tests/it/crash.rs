//! `kill -9` under load: every acknowledged record survives, offsets stay dense.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_log::Client;

use crate::support::Served;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_should_lose_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(dir.path(), &["--sync", "always"]);
    let acked: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();

    // Four producers, each bounded in count and time; the kill comes mid-load.
    let mut producers = Vec::new();
    for producer in 0..4 {
        let mut client = Client::connect(&served.addr).await.unwrap();
        let acked = Arc::clone(&acked);
        producers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..5_000 {
                if Instant::now() > deadline {
                    break;
                }
                let value = format!("producer {producer} record {i}");
                match client.produce("crash", value.clone()).await {
                    Ok(offset) => {
                        acked.lock().unwrap().insert(offset, value);
                    }
                    Err(_) => break, // the server is gone
                }
            }
        }));
    }
    let started = Instant::now();
    while acked.lock().unwrap().len() < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "producers made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    served.signal("KILL");
    let status = served.wait(Duration::from_secs(10));
    assert!(!status.success(), "killed, not exited");
    for producer in producers {
        producer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);

    let served = Served::start(dir.path(), &[]);
    let mut client = Client::connect(&served.addr).await.unwrap();
    let topics = client.topics().await.unwrap();
    let next = topics
        .iter()
        .find(|t| t.name == "crash")
        .unwrap()
        .next_offset;
    let highest = *acked.keys().next_back().unwrap();
    assert!(
        next > highest,
        "next offset {next} must be past the highest acknowledged {highest}"
    );
    for (offset, value) in &acked {
        let record = client.consume("crash", *offset).await.unwrap();
        assert_eq!(&record.value[..], value.as_bytes(), "offset {offset}");
    }
    // Dense: every offset below next is readable (some were written but not acknowledged).
    for offset in 0..next {
        client
            .consume("crash", offset)
            .await
            .unwrap_or_else(|err| panic!("hole at {offset}: {err}"));
    }
    assert_eq!(client.produce("crash", "after").await.unwrap(), next);
}
