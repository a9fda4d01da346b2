#!/usr/bin/env python3
"""Turns bench/cluster.sh's results into the cluster section of docs/benchmarks.md.

usage: cluster_report.py RESULTS.jsonl FAILOVER.json META.json BENCHMARKS.md

The section between the markers below is replaced (appended if absent).
"""
import json
import statistics
import sys
from collections import defaultdict

from compare_report import fmt_rate, fmt_us, write_section

BEGIN = "<!-- cluster.sh: begin (generated; edit bench/cluster_report.py instead) -->"
END = "<!-- cluster.sh: end -->"
ORDER = ["keel", "keel-r3", "nats-r3"]


def main():
    results_path, failover_path, meta_path, out_path = sys.argv[1:5]
    meta = json.load(open(meta_path))
    failover = json.load(open(failover_path))
    runs = defaultdict(list)
    workloads = []
    for line in open(results_path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        runs[(r["workload"], r["system"])].append(r["result"])

    lines = [BEGIN, "", "## Replicated: 3 nodes beside one, and beside NATS R3 (`bench/compare.sh --cluster`)", ""]
    lines.append(
        f"Measured {meta['date']} on {meta['cores']} cores ({meta['cpu']}), {meta['memory']} memory, "
        f"{meta['disk']}, every node of every system on this one machine (so a replicated write "
        f"costs three processes' CPU and three fsyncs on one disk). 100 B records; each figure "
        f"is the median of {meta['reps']} runs of {meta['duration']}, interleaved, with the spread. "
        f"Reproduce with `{meta['command']}`; the runs took {meta['elapsed_s']} s."
    )
    lines += [
        "",
        "- **keel**: one node, `--sync always` (fdatasync before each acknowledgement).",
        "- **keel-r3**: three nodes (`--peers`); an acknowledgement means the batch is in the Raft "
        "log of a majority, fsynced on each, and committed. The client talks to the leader.",
        f"- **nats-r3**: three nats-server {meta['nats']} nodes in one cluster, JetStream file storage, "
        "`sync_interval: always`, streams with 3 replicas.",
        "",
        "| workload | keel | keel-r3 | nats-r3 | keel-r3 / keel | keel-r3 / nats-r3 | keel-r3 p50 | keel-r3 p99 | nats-r3 p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload in workloads:
        med = {}
        lat = {}
        for system in ORDER:
            got = runs.get((workload, system))
            if not got:
                continue
            med[system] = statistics.median(g["records_per_sec"] for g in got)
            p50 = [g["p50_us"] for g in got if g["p50_us"] is not None]
            p99 = [g["p99_us"] for g in got if g["p99_us"] is not None]
            lat[system] = (
                int(statistics.median(p50)) if p50 else None,
                int(statistics.median(p99)) if p99 else None,
            )

        def rate(system):
            return fmt_rate(med[system]) if system in med else "-"

        def ratio(a, b):
            return f"{med[a] / med[b]:.2f}" if a in med and b in med and med[b] else "-"

        lines.append(
            f"| {workload} | {rate('keel')} | {rate('keel-r3')} | {rate('nats-r3')} "
            f"| {ratio('keel-r3', 'keel')} | {ratio('keel-r3', 'nats-r3')} "
            f"| {fmt_us(lat.get('keel-r3', (None, None))[0])} | {fmt_us(lat.get('keel-r3', (None, None))[1])} "
            f"| {fmt_us(lat.get('nats-r3', (None, None))[1])} |"
        )
    lines += [
        "",
        "Goals: batches ≥ 0.5× single-node keel, ProduceStream ≥ 0.4×, ahead of NATS R3 on "
        "every workload, unary acknowledgement p99 under 5 ms at 1 000 records/s (the "
        "`latency:1000` row).",
        "",
        f"### Failover ({len(failover['trials'])} trials)",
        "",
        f"The keel cluster under {failover['producers']} closed-loop producers (unary, idempotent, "
        "following the leader); the leader is killed with SIGKILL, and the time from the kill to "
        "the next acknowledged write is taken (answers already on the wire, within 10 ms, do not "
        "count); the killed node restarts and catches up before the next trial. Default timeouts "
        "(heartbeat 30 ms, election 100–160 ms).",
        "",
        "| p50 | p99 | max |",
        "| --- | --- | --- |",
        f"| {failover['p50_ms']:.0f} ms | {failover['p99_ms']:.0f} ms | {failover['max_ms']:.0f} ms |",
        "",
        "Every trial, in ms: " + ", ".join(f"{t:.0f}" for t in failover["trials"]) + ".",
        "",
        END,
    ]
    write_section(out_path, BEGIN, END, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
