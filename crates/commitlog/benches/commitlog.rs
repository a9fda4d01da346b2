//! Benchmarks of the commit log beside the physical reference, in one run.
//!
//! Every group measures `keel` (the log) and `raw` (the same payload bytes written
//! to, or read from, a plain file) so that the ratio between them means something on
//! a shared, noisy machine. After the groups, the ratios are printed and written to
//! `target/criterion/ratios.md`.
//!
//! `cargo bench -p keel-commitlog` runs everything; pass a filter (`-- append_1KiB`)
//! to run some groups, and set `KEEL_BENCH_NO_SUSTAINED=1` to skip the sustained
//! 2 GiB comparison that follows them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use keel_commitlog::{Log, LogConfig, Retention, SyncPolicy};

const MIB: u64 = 1 << 20;
/// Both sides start a new file at this size and keep two files' worth, so neither
/// fills the disk however many iterations criterion asks for.
const SEGMENT: u64 = 256 * MIB;

fn log_config(sync: SyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: SEGMENT,
        sync,
        retention: Retention {
            bytes: Some(2 * SEGMENT),
            age: None,
        },
        ..LogConfig::default()
    }
}

/// The reference: payload bytes appended to a plain file with `pwrite`, a new file
/// every `SEGMENT` bytes, the one before last deleted. With `seal`, each full file is
/// synced before the next one starts: the same bytes reach the disk as keel's
/// sealed segments do, where plain `raw` lets deletion beat the kernel's write-back.
struct RawFile {
    dir: PathBuf,
    file: File,
    position: u64,
    files: u64,
    seal: bool,
}

impl RawFile {
    fn new(dir: &Path, seal: bool) -> Self {
        let mut raw = Self {
            dir: dir.to_path_buf(),
            file: File::open("/dev/null").unwrap(),
            position: 0,
            files: 0,
            seal,
        };
        raw.next_file();
        raw
    }

    fn next_file(&mut self) {
        if self.seal && self.files > 0 {
            self.file.sync_data().unwrap();
        }
        if self.files >= 2 {
            fs::remove_file(self.dir.join(format!("raw-{}", self.files - 2))).unwrap();
        }
        let path = self.dir.join(format!("raw-{}", self.files));
        self.file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(path)
            .unwrap();
        self.position = 0;
        self.files += 1;
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.position >= SEGMENT {
            self.next_file();
        }
        self.file.write_all_at(bytes, self.position).unwrap();
        self.position += bytes.len() as u64;
    }

    fn sync(&self) {
        self.file.sync_data().unwrap();
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 31 + seed) as u8).collect()
}

/// One append scenario: `batch` records of `size` bytes per iteration.
fn append_group(c: &mut Criterion, name: &str, size: usize, batch: usize, sync: SyncPolicy) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes((size * batch) as u64));
    let values: Vec<Vec<u8>> = (0..batch as u64).map(|i| payload(size, i)).collect();
    let flat: Vec<u8> = values.concat();

    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let mut log = Log::open(dir.path().join("log"), log_config(sync)).unwrap();
    group.bench_function("keel", |b| {
        if batch == 1 {
            b.iter(|| black_box(log.append(&values[0]).unwrap()));
        } else {
            b.iter(|| black_box(log.append_batch(&values).unwrap()));
        }
    });
    drop(log);

    let fsync = sync == SyncPolicy::Always;
    let mut raw = RawFile::new(dir.path(), false);
    group.bench_function("raw", |b| {
        b.iter(|| {
            raw.write(black_box(&flat));
            if fsync {
                raw.sync();
            }
        });
    });
    drop(raw);
    if !fsync {
        let sealed_dir = tempfile::tempdir_in(bench_dir()).unwrap();
        let mut raw = RawFile::new(sealed_dir.path(), true);
        group.bench_function("raw_sealed", |b| {
            b.iter(|| raw.write(black_box(&flat)));
        });
    }
    group.finish();
}

/// A log and a plain file holding the same 1 KiB payloads, for read benchmarks.
struct ReadFixture {
    _dir: tempfile::TempDir,
    log: Log,
    raw: File,
    records: u64,
}

/// Records in the read fixture: 128 MB of 1 KiB values, written in batches of 1000.
const READ_RECORDS: u64 = 125_000;

fn read_fixture() -> ReadFixture {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let records = READ_RECORDS;
    let mut log = Log::open(dir.path().join("log"), log_config(SyncPolicy::Never)).unwrap();
    let raw_path = dir.path().join("raw");
    let raw = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(raw_path)
        .unwrap();
    let batch: Vec<Vec<u8>> = (0..1000).map(|i| payload(1024, i)).collect();
    let flat = batch.concat();
    let mut position = 0;
    for _ in 0..records / 1000 {
        log.append_batch(&batch).unwrap();
        raw.write_all_at(&flat, position).unwrap();
        position += flat.len() as u64;
    }
    log.sync().unwrap();
    raw.sync_data().unwrap();
    ReadFixture {
        _dir: dir,
        records: log.next_offset(),
        log,
        raw,
    }
}

fn read_groups(c: &mut Criterion) {
    let fixture = read_fixture();
    let payload_bytes = fixture.records * 1024;

    let mut group = c.benchmark_group("read_sequential_1KiB");
    group.throughput(Throughput::Bytes(payload_bytes));
    group.sample_size(10);
    let reader = fixture.log.reader();
    group.bench_function("keel", |b| {
        b.iter(|| {
            let mut cursor = reader.cursor(0);
            let mut seen = 0u64;
            loop {
                let chunk = cursor.next_chunk(MIB as usize).unwrap();
                if chunk.is_empty() {
                    break;
                }
                seen += chunk.len() as u64;
                black_box(&chunk);
            }
            assert_eq!(seen, fixture.records);
        });
    });
    group.bench_function("raw", |b| {
        b.iter(|| {
            let mut buf = vec![0u8; MIB as usize];
            let mut position = 0;
            while position < payload_bytes {
                let len = MIB.min(payload_bytes - position) as usize;
                fixture
                    .raw
                    .read_exact_at(&mut buf[..len], position)
                    .unwrap();
                black_box(&buf);
                position += len as u64;
            }
        });
    });
    group.finish();

    let mut group = c.benchmark_group("read_random_1KiB");
    group.throughput(Throughput::Bytes(1024));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_random = move || {
        // xorshift: cheap and the same sequence for both sides.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    group.bench_function("keel", |b| {
        b.iter(|| black_box(fixture.log.read(next_random() % fixture.records).unwrap()));
    });
    group.bench_function("raw", |b| {
        let mut buf = vec![0u8; 1024];
        b.iter(|| {
            let at = (next_random() % fixture.records) * 1024;
            fixture.raw.read_exact_at(&mut buf, at).unwrap();
            black_box(&buf);
        });
    });
    group.finish();
}

/// Sustained appends: 2 GiB of 1 KiB records through several rolls, seals and
/// retention drops, keel and raw taking turns twice. Criterion's short samples catch
/// rolls unevenly; this shows the steady state.
fn sustained() -> String {
    const RECORDS: u64 = 2 * 1024 * 1024;
    let value = payload(1024, 7);
    let mib = (RECORDS * 1024) as f64 / MIB as f64;
    let mut rows = String::new();
    for round in 1..=2 {
        let dir = tempfile::tempdir_in(bench_dir()).unwrap();
        let mut log = Log::open(dir.path().join("log"), log_config(SyncPolicy::Never)).unwrap();
        let started = Instant::now();
        for _ in 0..RECORDS {
            log.append(&value).unwrap();
        }
        let keel = started.elapsed().as_secs_f64();
        drop(log);
        let time_raw = |seal: bool| {
            let dir = tempfile::tempdir_in(bench_dir()).unwrap();
            let mut raw = RawFile::new(dir.path(), seal);
            let started = Instant::now();
            for _ in 0..RECORDS {
                raw.write(&value);
            }
            started.elapsed().as_secs_f64()
        };
        let raw = time_raw(false);
        let sealed = time_raw(true);
        rows.push_str(&format!(
            "| sustained_1KiB_single_never (round {round}, 2 GiB) | {:.0} MiB/s | {:.0} MiB/s | {:.2} | {:.0} MiB/s | {:.2} | {:.0} |\n",
            mib / keel,
            mib / raw,
            raw / keel,
            mib / sealed,
            sealed / keel,
            RECORDS as f64 / keel,
        ));
    }
    rows
}

fn bench_dir() -> PathBuf {
    // The target directory: on the same disk as the build, not a tmpfs.
    target_dir().join("bench-data")
}

fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<bench binary>
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

const GROUPS: &[(&str, usize, usize, SyncPolicy)] = &[
    ("append_100B_single_never", 100, 1, SyncPolicy::Never),
    ("append_1KiB_single_never", 1024, 1, SyncPolicy::Never),
    ("append_100B_batch1000_never", 100, 1000, SyncPolicy::Never),
    ("append_1KiB_batch1000_never", 1024, 1000, SyncPolicy::Never),
    ("append_1KiB_single_always", 1024, 1, SyncPolicy::Always),
    (
        "append_100B_batch1000_always",
        100,
        1000,
        SyncPolicy::Always,
    ),
    (
        "append_1KiB_batch1000_always",
        1024,
        1000,
        SyncPolicy::Always,
    ),
];

/// Reads criterion's mean estimate (ns per iteration) with its confidence interval.
fn estimate(group: &str, function: &str) -> Option<(f64, f64, f64)> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let mean = &json["mean"];
    Some((
        mean["point_estimate"].as_f64()?,
        mean["confidence_interval"]["lower_bound"].as_f64()?,
        mean["confidence_interval"]["upper_bound"].as_f64()?,
    ))
}

fn report(extra_rows: &str) {
    let mut table = String::from(
        "| scenario | keel | raw | keel / raw (95% CI) | raw sealed | keel / raw sealed | keel records/s |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut scenarios: Vec<(String, u64, u64)> = GROUPS
        .iter()
        .map(|&(name, size, batch, _)| (name.to_string(), (size * batch) as u64, batch as u64))
        .collect();
    scenarios.push((
        "read_sequential_1KiB".into(),
        READ_RECORDS * 1024,
        READ_RECORDS,
    ));
    scenarios.push(("read_random_1KiB".into(), 1024, 1));
    for (name, bytes, records) in scenarios {
        let (Some(keel), Some(raw)) = (estimate(&name, "keel"), estimate(&name, "raw")) else {
            continue;
        };
        let speed = |ns: f64| {
            let mib_s = bytes as f64 / ns * 1e9 / MIB as f64;
            if mib_s >= 1.0 {
                format!("{mib_s:.0} MiB/s")
            } else {
                format!("{:.0} KiB/s", mib_s * 1024.0)
            }
        };
        let (sealed, sealed_ratio) = match estimate(&name, "raw_sealed") {
            Some(sealed) if !name.ends_with("_always") && name.starts_with("append") => {
                (speed(sealed.0), format!("{:.2}", sealed.0 / keel.0))
            }
            _ => ("-".into(), "-".into()),
        };
        let records_s = format!("{:.0}", records as f64 / keel.0 * 1e9);
        table.push_str(&format!(
            "| {name} | {} | {} | {:.2} ({:.2}-{:.2}) | {sealed} | {sealed_ratio} | {records_s} |\n",
            speed(keel.0),
            speed(raw.0),
            raw.0 / keel.0,
            raw.1 / keel.2,
            raw.2 / keel.1,
        ));
    }
    table.push_str(extra_rows);
    println!(
        "\nkeel beside the physical reference (keel / raw: 1.00 = as fast as the plain file API; \
         'raw sealed' also syncs each 256 MiB file, as keel's sealer does):\n"
    );
    println!("{table}");
    let path = target_dir().join("criterion").join("ratios.md");
    if fs::write(&path, &table).is_ok() {
        println!("written to {}", path.display());
    }
}

fn main() {
    fs::create_dir_all(bench_dir()).unwrap();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    for &(name, size, batch, sync) in GROUPS {
        append_group(&mut criterion, name, size, batch, sync);
    }
    read_groups(&mut criterion);
    criterion.final_summary();
    let sustained = if std::env::var_os("KEEL_BENCH_NO_SUSTAINED").is_some() {
        String::new()
    } else {
        sustained()
    };
    report(&sustained);
}
