//! A tour of the storage engine: append, read, crash, recover.
//!
//! ```text
//! cargo run -p keel-commitlog --example tour -- /tmp/keel-tour
//! ```
//!
//! Run it twice: the second run finds the records of the first.

use std::fs::OpenOptions;

use keel_commitlog::{Log, LogConfig, SyncPolicy};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| std::env::temp_dir().join("keel-tour").display().to_string());
    let config = LogConfig {
        sync: SyncPolicy::Always,
        ..LogConfig::default()
    };

    let mut log = Log::open(&dir, config.clone())?;
    println!(
        "opened {dir}: offsets {}..{}",
        log.lowest_offset(),
        log.next_offset()
    );

    let first = log.append(b"hello, keel")?;
    let batch = log.append_batch(&[&b"one"[..], b"two", b"three"])?;
    println!("appended offset {first}, then a batch at {batch:?} (one write, one fsync)");

    let record = log.read(first)?;
    println!(
        "read {first}: {:?} at {} ms since the epoch",
        String::from_utf8_lossy(&record.value),
        record.timestamp_ms
    );
    if let Err(err) = log.read(log.next_offset()) {
        println!("reading past the end: {err}");
    }

    // Simulate a torn write: a crash in the middle of appending a record.
    let next = log.next_offset();
    log.close()?;
    let store = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .max()
        .ok_or_else(|| anyhow::anyhow!("no store file in {dir}"))?;
    let file = OpenOptions::new().append(true).open(&store)?;
    std::io::Write::write_all(&mut &file, &[0x42; 10])?;
    println!(
        "wrote 10 bytes of garbage to the end of {}",
        store.display()
    );

    let log = Log::open(&dir, config)?;
    for cut in &log.recovery().truncations {
        println!(
            "recovery cut {} bytes at position {} of {} ({})",
            cut.bytes_cut,
            cut.position,
            cut.path.display(),
            cut.reason
        );
    }
    anyhow::ensure!(log.next_offset() == next, "recovery lost records");
    println!(
        "every record is still there: offsets {}..{}",
        log.lowest_offset(),
        log.next_offset()
    );
    Ok(())
}
