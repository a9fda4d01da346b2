#!/usr/bin/env bash
# Gateway benchmark: a trivial backend measured directly, through keel's gateway,
# through nginx (proxy_pass with an upstream keepalive pool) and through haproxy, in
# one run on 127.0.0.1. Installs nginx, haproxy and wrk with apt-get if missing.
#
#   bench/gateway.sh [seconds-per-run] [connections]     (REPS=3 by default)
#   SCENARIOS="small close" bench/gateway.sh 5 64       # a subset of the scenarios
#
# Three scenarios, each a table: "small" (a 3-byte answer over kept-alive client
# connections), "close" (the same, a new client connection per request:
# Connection: close) and "1mib" (a 1 MiB answer, kept alive).
#
# With BASELINE=path/to/another/keel, a second gateway from that binary joins the
# rounds as target "baseline" (same registry, same backend): a change's before and
# after measured side by side in one run.
#
# The targets take turns, REPS rounds, and each figure is the median round. Every proxy
# does the work keel's gateway does to a request: X-Forwarded-For, -Proto and -Host and
# an X-Request-Id are set, the connection to the backend is a kept-alive pool.
#
# Every server is started here with its files in a temp dir and stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
CONNECTIONS=${2:-64}
REPS=${REPS:-3}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q -p keel

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=$(free_port); NGINX=$(free_port); HAPROXY=$(free_port)

# The backend and the nginx proxy are separate processes: the backend (one worker) is
# the same for every target, and the proxy gets a worker per core like keel's gateway
# (a serving thread per core) and haproxy (a thread per core).
nginx_conf() { # dir workers server-block
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<CONF
daemon off;
master_process on;
worker_processes $2;
user root;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 64; }
  $3
}
CONF
}
mkdir -p "$work/www"
head -c 1048576 /dev/urandom > "$work/www/big.bin"
nginx_conf "$work/backend" 1 "server { listen 127.0.0.1:$BACKEND; location / { return 200 \"ok\\n\"; } location ~ big\$ { root $work/www; try_files /big.bin =404; } }"
nginx_conf "$work/nginx" auto "server { listen 127.0.0.1:$NGINX; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme; proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Request-Id \$request_id; } }"
nginx -p "$work/backend" -c "$work/backend/nginx.conf" & pids+=($!)
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!)

cat > "$work/haproxy.cfg" <<CONF
global
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend front
  bind 127.0.0.1:$HAPROXY
  option forwardfor
  unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
  http-request set-header X-Request-Id %[unique-id]
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  default_backend back
backend back
  http-reuse always
  server s1 127.0.0.1:$BACKEND
CONF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

"${CARGO_TARGET_DIR:-target}/release/keel" registry serve --addr 127.0.0.1:0 --check-interval 1h > "$work/registry.out" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/registry.out" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(grep -o '127.0.0.1:[0-9]*' "$work/registry.out" | head -1)
"${CARGO_TARGET_DIR:-target}/release/keel" gateway serve --addr 127.0.0.1:0 --registry "http://$REGISTRY" > "$work/gateway.out" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/gateway.out" 2>/dev/null && break; sleep 0.1; done
GATEWAY=$(grep -o '127.0.0.1:[0-9]*' "$work/gateway.out" | head -1)
if [ -n "${BASELINE:-}" ]; then
  "$BASELINE" gateway serve --addr 127.0.0.1:0 --registry "http://$REGISTRY" > "$work/baseline.out" 2>/dev/null & pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/baseline.out" 2>/dev/null && break; sleep 0.1; done
  BASELINE_GATEWAY=$(grep -o '127.0.0.1:[0-9]*' "$work/baseline.out" | head -1)
fi
curl -s -X POST "http://$REGISTRY/services" -d "{\"name\":\"bench\",\"addr\":\"127.0.0.1:$BACKEND\"}" >/dev/null
for gateway in "$GATEWAY" ${BASELINE_GATEWAY:-}; do
  for _ in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$gateway/bench/")" = 200 ] && break; sleep 0.1; done
done

run() { # scenario name url
  local out path="" args=()
  case "$1" in
    close) args=(-H "Connection: close") ;;
    1mib) path=big ;;
  esac
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" --latency "${args[@]}" "$3$path")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")
  if [ -n "$errors" ]; then echo "== $1 $2: $errors" >&2; fi
  echo "$1 $2 $rps $p50 $p99"
}

targets=("direct http://127.0.0.1:$BACKEND/bench/" "keel http://$GATEWAY/bench/"
  "nginx http://127.0.0.1:$NGINX/bench/" "haproxy http://127.0.0.1:$HAPROXY/bench/")
if [ -n "${BASELINE_GATEWAY:-}" ]; then targets+=("baseline http://$BASELINE_GATEWAY/bench/"); fi
rounds="$work/rounds"
read -r -a scenarios <<<"${SCENARIOS:-small close 1mib}"
for rep in $(seq "$REPS"); do
  for scenario in "${scenarios[@]}"; do
    for target in "${targets[@]}"; do
      echo "== round $rep/$REPS: $scenario ${target%% *}" >&2
      run "$scenario" $target >>"$rounds"
    done
  done
done
echo "All rounds (scenario, target, requests/s, p50, p99):"
sed 's/^/  /' "$rounds"
echo
for scenario in "${scenarios[@]}"; do
  # The median round of each target (by requests/s), in the order above.
  results=()
  for target in "${targets[@]}"; do
    name=${target%% *}
    results+=("$(awk -v s="$scenario" -v n="$name" '$1==s && $2==n' "$rounds" | sort -k3 -g | awk -v reps="$REPS" 'NR==int((reps+1)/2)')")
  done
  case "$scenario" in
    small) echo "### A 3-byte answer, kept-alive connections" ;;
    close) echo "### A 3-byte answer, a new connection per request (Connection: close)" ;;
    1mib) echo "### A 1 MiB answer, kept-alive connections" ;;
  esac
  echo
  direct=$(awk '{print $3}' <<<"${results[0]}")
  nginx=$(awk '$2=="nginx" {print $3}' <<<"$(printf '%s\n' "${results[@]}")")
  echo "| target | requests/s | vs direct | vs nginx | p50 | p99 |"
  echo "| --- | --- | --- | --- | --- | --- |"
  for line in "${results[@]}"; do
    read -r _ name rps p50 p99 <<<"$line"
    ratios=$(python3 -c "print(f'{$rps/$direct:.2f} | {$rps/$nginx:.2f}')")
    echo "| $name | $rps | $ratios | $p50 | $p99 |"
  done
  echo
done
echo "wrk -t2 -c$CONNECTIONS -d${SECONDS_PER_RUN}s on $(nproc) cores, median of $REPS interleaved rounds; backend: nginx 'return 200' (and a 1 MiB file) on 127.0.0.1"
