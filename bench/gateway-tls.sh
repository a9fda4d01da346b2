#!/usr/bin/env bash
# The gateway's front port on TLS beside plaintext, in one run: a trivial nginx
# backend, one registry, and two gateways (one plaintext, one with a development
# certificate), both loaded with wrk in turn, ROUNDS times; prints each round's
# requests/s and the median TLS/plaintext ratio. Installs nginx and wrk with apt-get
# if missing. Usage: bench/gateway-tls.sh [ROUNDS] [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
duration=${2:-10s}
keel=${KEEL:-target/release/keel}
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x "$keel" ] || cargo build --release -p keel
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(free_port); registry=$(free_port); plain=$(free_port); tls=$(free_port)

mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:$backend; location / { return 200 "ok\n"; } }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -g 'daemon off;' & pids+=($!)

"$keel" certs dev --out "$work/certs" --node keel-gw >/dev/null
"$keel" registry serve --addr "127.0.0.1:$registry" >"$work/registry.log" 2>&1 & pids+=($!)
sleep 0.5
curl -fsS "http://127.0.0.1:$registry/services" -d "{\"name\":\"ok\",\"addr\":\"127.0.0.1:$backend\"}" >/dev/null
"$keel" gateway serve --addr "127.0.0.1:$plain" --registry "http://127.0.0.1:$registry" \
  >"$work/plain.log" 2>&1 & pids+=($!)
"$keel" gateway serve --addr "127.0.0.1:$tls" --registry "http://127.0.0.1:$registry" \
  --tls-cert "$work/certs/keel-gw.pem" --tls-key "$work/certs/keel-gw.key" \
  >"$work/tls.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$plain/ok/" >/dev/null 2>&1 &&
    curl -fs --cacert "$work/certs/ca.pem" "https://localhost:$tls/ok/" >/dev/null 2>&1 && break
  sleep 0.1
done

rate() { wrk -t2 -c32 -d"$duration" "$1" | awk '/Requests\/sec/ {print $2}'; }
ratios=()
echo "| round | plaintext req/s | TLS req/s | TLS/plaintext |"
echo "| --- | --- | --- | --- |"
for round in $(seq "$rounds"); do
  p=$(rate "http://127.0.0.1:$plain/ok/")
  t=$(rate "https://localhost:$tls/ok/")
  r=$(python3 -c "print(f'{$t/$p:.2f}')")
  ratios+=("$r")
  echo "| $round | $p | $t | ${r}x |"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "median TLS/plaintext: ${median}x ($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
