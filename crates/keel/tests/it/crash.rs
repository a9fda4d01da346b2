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

/// One flipped bit in an acknowledged record, after a clean stop: the topic must not
/// open (its offsets would be handed out again) until an operator repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flip_in_an_acknowledged_record_should_make_the_topic_unavailable_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(dir.path(), &["--sync", "always"]);
    let mut client = Client::connect(&served.addr).await.unwrap();
    for i in 0..20 {
        let offset = client
            .produce("flip", format!("record {i:02}"))
            .await
            .unwrap();
        assert_eq!(offset, i);
    }
    client.produce("other", "untouched").await.unwrap();
    served.signal("TERM");
    assert!(served.wait(Duration::from_secs(10)).success());

    // Every frame is 24 bytes of header and 9 of value, after a 16-byte file header.
    let store = dir.path().join("topics/flip/00000000000000000000.log");
    let record_5 = 16 + 5 * (24 + 9);
    let mut bytes = std::fs::read(&store).unwrap();
    bytes[record_5 + 24 + 3] ^= 0x10;
    std::fs::write(&store, bytes).unwrap();

    let mut served = Served::start(dir.path(), &[]);
    let mut client = Client::connect(&served.addr).await.unwrap();
    let refused = client.produce("flip", "after").await.unwrap_err();
    assert!(
        refused.to_string().contains("unavailable")
            && refused.to_string().contains(&format!("byte {record_5}")),
        "the topic must refuse writes, naming the damage: {refused}"
    );
    assert!(client.consume("flip", 2).await.is_err(), "nor serve reads");
    let kept = client.consume("other", 0).await.unwrap();
    assert_eq!(&kept.value[..], b"untouched", "the other topics serve");
    served.signal("TERM");
    assert!(served.wait(Duration::from_secs(10)).success());

    let repaired = std::process::Command::new(crate::support::KEEL)
        .args(["log", "repair", "--topic", "flip", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&repaired.stdout);
    assert!(
        repaired.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&repaired.stderr)
    );
    assert!(
        said.contains(&format!("at byte {record_5}")) && said.contains("ends before offset 5"),
        "{said}"
    );

    let missing = std::process::Command::new(crate::support::KEEL)
        .args(["log", "repair", "--topic", "nosuch", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("no topic \"nosuch\""), "{said}");

    let served = Served::start(dir.path(), &[]);
    let mut client = Client::connect(&served.addr).await.unwrap();
    let record = client.consume("flip", 4).await.unwrap();
    assert_eq!(&record.value[..], b"record 04");
    assert_eq!(client.produce("flip", "after").await.unwrap(), 5);
}
