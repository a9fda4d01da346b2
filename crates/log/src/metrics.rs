//! Per-topic counters and the Prometheus text rendering of `GET /metrics`.
//!
//! Counters are plain atomics owned by each topic (no global registry), so that
//! several servers in one process, as in tests, keep separate figures.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use keel_log_client::TopicInfo;
use keel_serve::http::{Histogram, Prometheus};

/// What a topic counts.
#[derive(Debug, Default)]
pub(crate) struct TopicMetrics {
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) commits: AtomicU64,
    /// Commits made by a serving thread instead of the writer thread.
    pub(crate) inline_commits: AtomicU64,
    /// Syncs the writer thread ran under an interval policy.
    pub(crate) interval_syncs: AtomicU64,
    pub(crate) failed_commits: AtomicU64,
    /// Commits that failed because the disk was full.
    pub(crate) storage_full: AtomicU64,
    /// Time of each group commit: the write and, under `always`, the fsync.
    pub(crate) commit_latency: Histogram,
    pub(crate) consumers: AtomicI64,
    /// Records read (by any API: one at a time, in ranges, or streamed).
    pub(crate) read_records: AtomicU64,
    /// Bytes of record values read.
    pub(crate) read_bytes: AtomicU64,
    /// Time of each read from the topic's files (one record, or a chunk of them).
    pub(crate) read_latency: Histogram,
}

impl TopicMetrics {
    /// Counts `records` as read.
    pub(crate) fn count_read(&self, records: &[keel_commitlog::Record]) {
        let bytes: usize = records.iter().map(|record| record.value.len()).sum();
        self.read_records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Counts a live consumer for as long as it is held.
pub(crate) struct ConsumerGuard<'a>(&'a TopicMetrics);

impl<'a> ConsumerGuard<'a> {
    pub(crate) fn new(metrics: &'a TopicMetrics) -> Self {
        metrics.consumers.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for ConsumerGuard<'_> {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One metric family: a name, its kind and help, and how to read it.
struct Family<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&T) -> f64,
}

impl<T> Family<T> {
    fn write<'a>(&self, out: &mut Prometheus, rows: impl Iterator<Item = (&'a str, &'a T)>)
    where
        T: 'a,
    {
        out.family(self.name, self.kind, self.help);
        for (topic, item) in rows {
            out.sample(&[("topic", topic)], (self.value)(item));
        }
    }
}

const COUNTERS: [Family<TopicMetrics>; 10] = [
    Family {
        name: "keel_log_appended_records_total",
        kind: "counter",
        help: "Records appended.",
        value: |m| m.records.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_appended_bytes_total",
        kind: "counter",
        help: "Bytes of record values appended.",
        value: |m| m.bytes.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_commits_total",
        kind: "counter",
        help: "Group commits (one write and at most one fsync each).",
        value: |m| m.commits.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_inline_commits_total",
        kind: "counter",
        help: "Commits made by the serving thread that received the append, without the writer thread (a lone producer's under sync always; every one under interval and never, unless the writer holds queued appends).",
        value: |m| m.inline_commits.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_interval_syncs_total",
        kind: "counter",
        help: "Syncs of the topic's records under an interval sync policy (one per interval while records come, and one when the topic goes idle).",
        value: |m| m.interval_syncs.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_failed_commits_total",
        kind: "counter",
        help: "Group commits that failed.",
        value: |m| m.failed_commits.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_storage_full_total",
        kind: "counter",
        help: "Group commits refused because the disk was full (undone; retry once space is freed).",
        value: |m| m.storage_full.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_read_records_total",
        kind: "counter",
        help: "Records read, by any API (one at a time, in ranges, or streamed).",
        value: |m| m.read_records.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_read_bytes_total",
        kind: "counter",
        help: "Bytes of record values read.",
        value: |m| m.read_bytes.load(Ordering::Relaxed) as f64,
    },
    Family {
        name: "keel_log_consumers",
        kind: "gauge",
        help: "Streaming consumers reading the topic now.",
        value: |m| m.consumers.load(Ordering::Relaxed) as f64,
    },
];

const GAUGES: [Family<TopicInfo>; 4] = [
    Family {
        name: "keel_log_next_offset",
        kind: "gauge",
        help: "The offset the next record will get.",
        value: |i| i.next_offset as f64,
    },
    Family {
        name: "keel_log_lowest_offset",
        kind: "gauge",
        help: "The lowest retained offset.",
        value: |i| i.lowest_offset as f64,
    },
    Family {
        name: "keel_log_size_bytes",
        kind: "gauge",
        help: "Bytes of the topic's store files.",
        value: |i| i.size_bytes as f64,
    },
    Family {
        name: "keel_log_segments",
        kind: "gauge",
        help: "Segments of the topic.",
        value: |i| i.segments as f64,
    },
];

/// A topic's name, counters and listing, as `Topics::metrics` gives them.
pub(crate) type TopicFigures = (String, std::sync::Arc<TopicMetrics>, TopicInfo);

/// The service's own figures, beside the topics'.
pub(crate) struct ServiceFigures<'a> {
    pub(crate) unavailable_topics: usize,
    pub(crate) failed_topics: usize,
    pub(crate) read_ahead_bytes: usize,
    pub(crate) append_latency: &'a Histogram,
}

/// A per-topic histogram family: its name, help, and which histogram of a topic.
type HistogramFamily = (&'static str, &'static str, fn(&TopicMetrics) -> &Histogram);

/// Renders every topic's figures in the Prometheus text format.
pub(crate) fn render_metrics(all: &[TopicFigures], service: &ServiceFigures<'_>) -> Prometheus {
    let mut out = Prometheus::default();
    out.family(
        "keel_log_unavailable_topics",
        "gauge",
        "Topics whose logs failed to open at start.",
    )
    .sample(&[], service.unavailable_topics);
    out.family(
        "keel_log_failed_topics",
        "gauge",
        "Topics whose logs failed while serving (a failed fsync) and refuse writes until a restart.",
    )
    .sample(&[], service.failed_topics);
    out.family(
        "keel_log_read_ahead_bytes",
        "gauge",
        "Bytes streaming readers have read and their connections not yet taken.",
    )
    .sample(&[], service.read_ahead_bytes);
    for family in &COUNTERS {
        family.write(
            &mut out,
            all.iter()
                .map(|(topic, metrics, _)| (topic.as_str(), metrics.as_ref())),
        );
    }
    for family in &GAUGES {
        family.write(
            &mut out,
            all.iter().map(|(topic, _, info)| (topic.as_str(), info)),
        );
    }
    let per_topic: [HistogramFamily; 2] = [
        (
            "keel_log_commit_seconds",
            "Time of a group commit: write, and fsync under the always policy.",
            |m| &m.commit_latency,
        ),
        (
            "keel_log_read_seconds",
            "Time of a read from the topic's files: one record, or a chunk of consecutive ones.",
            |m| &m.read_latency,
        ),
    ];
    for (name, help, histogram) in per_topic {
        out.family(name, "histogram", help);
        for (topic, metrics, _) in all {
            histogram(metrics).write(&mut out, &[("topic", topic)]);
        }
    }
    out.family(
        "keel_log_append_seconds",
        "histogram",
        "Time from an append's arrival to its acknowledgement (queueing, the commit and, on a cluster, the round to a majority), over every topic; unary and batch appends.",
    );
    service.append_latency.write(&mut out, &[]);
    out
}
