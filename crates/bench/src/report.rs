//! Results: one outcome per scenario, the machine, and the table printed at the end.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What one scenario measured.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub(crate) scenario: String,
    pub(crate) records: u64,
    pub(crate) seconds: f64,
    pub(crate) records_per_sec: f64,
    pub(crate) mb_per_sec: f64,
    /// Latency percentiles in microseconds (acknowledgement or batch latency).
    pub(crate) p50_us: Option<u64>,
    pub(crate) p99_us: Option<u64>,
    pub(crate) p999_us: Option<u64>,
    pub(crate) max_us: Option<u64>,
    pub(crate) latency_of: &'static str,
}

impl Outcome {
    pub(crate) fn new(
        scenario: String,
        records: u64,
        record_bytes: usize,
        seconds: f64,
        latency: Option<(&Histogram<u64>, &'static str)>,
    ) -> Self {
        let quantile = |q: f64| latency.map(|(h, _)| h.value_at_quantile(q));
        Self {
            scenario,
            records,
            seconds,
            records_per_sec: records as f64 / seconds,
            mb_per_sec: (records * record_bytes as u64) as f64 / seconds / 1e6,
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: latency.map(|(h, _)| h.max()),
            latency_of: latency.map_or("-", |(_, of)| of),
        }
    }
}

/// The machine the figures come from.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    cores: usize,
    memory: String,
    cpu: String,
    /// The file system and device of the temp dir, where the services keep data.
    disk: String,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split(':').nth(1))
                    .map(|name| name.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines().next().map(|line| {
                    line.split_whitespace()
                        .skip(1)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory,
            cpu,
            disk: disk_of(&std::env::temp_dir()),
        }
    }
}

/// `ext4 on /dev/vda1`: the mount holding `path`, from /proc/self/mounts.
fn disk_of(path: &std::path::Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), format!("{kind} on {device}")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, disk)| disk)
}

fn micros(value: Option<u64>) -> String {
    match value {
        None => "-".into(),
        Some(us) if us >= 10_000 => format!("{:.1} ms", us as f64 / 1000.0),
        Some(us) => format!("{us} µs"),
    }
}

/// The results as a Markdown table.
pub(crate) fn table(outcomes: &[Outcome], machine: &Machine, sync: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "machine: {} cores, {} memory, {}, {}; service sync policy: {sync}\n",
        machine.cores, machine.memory, machine.cpu, machine.disk
    );
    let _ = writeln!(
        out,
        "| scenario | records/s | MB/s | p50 | p99 | p999 | max | latency of |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
            o.scenario,
            o.records_per_sec,
            o.mb_per_sec,
            micros(o.p50_us),
            micros(o.p99_us),
            micros(o.p999_us),
            micros(o.max_us),
            o.latency_of
        );
    }
    out
}
