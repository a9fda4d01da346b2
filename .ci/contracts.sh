#!/usr/bin/env bash
# The HTTP APIs against their OpenAPI documents: schemathesis (every check, bounded:
# .ci/schemathesis-*.toml) against a live log service and a live registry, each serving
# its document at /openapi.json. The registry may register loopback addresses only, so
# that it checks and notifies nothing else. Run by .ci/run after the keel binary is built; exits
# non-zero on any failure schemathesis finds.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEL=${KEEL:-./target/debug/keel}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts `keel <args>` on a free port (given as --addr), waits for /healthz.
start() {
  local name=$1 port
  shift
  port=$(free_port)
  "$KEEL" "$@" --addr "127.0.0.1:$port" --log-level warn >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
      echo "$port"
      return
    fi
    sleep 0.1
  done
  echo "$name did not start:" >&2
  cat "$work/$name.log" >&2
  exit 1
}

# Runs schemathesis with .ci/schemathesis-<config>.toml against the document served
# at <port>.
run() {
  local name=$1 port=$2 config=$3
  echo "== schemathesis: $name (http://127.0.0.1:$port/openapi.json)"
  if ! schemathesis --config-file ".ci/schemathesis-$config.toml" run "http://127.0.0.1:$port/openapi.json" \
    --workers 1 --max-failures 20 >"$work/$name.schemathesis" 2>&1; then
    cat "$work/$name.schemathesis"
    echo "== $name server log:"
    tail -50 "$work/$name.log"
    exit 1
  fi
  tail -4 "$work/$name.schemathesis"
}

log_port=$(start log log serve --data-dir "$work/log")
run "log service" "$log_port" log
registry_port=$(start registry registry serve --data-dir "$work/registry" --allow-targets loopback)
run "registry" "$registry_port" registry
