#!/usr/bin/env bash
# The deploy test: the Compose stack of deploy/compose.yaml for real, under load and
# faults. Builds the image, brings the stack up, and while an idempotent producer
# appends through a gateway and a reader asks for grades through the other:
#   1. kills the log leader's container (docker kill), then starts it again;
#   2. cuts a log follower off the network (docker network disconnect) and
#      connects it back;
#   3. restarts the log nodes one at a time (a rolling upgrade).
# Then every acknowledged record must be on every log node exactly once, and every
# read must have been answered. Skips, saying so, without a Docker daemon.
#
#   deploy/test.sh          (about 3 minutes once the image is built)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED deploy test: no Docker daemon answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "SKIPPED deploy test: neither 'docker compose' nor docker-compose is installed"
  exit 0
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
project="keeldeploy$$"
export KEEL_IMAGE="keel:deploy-test"
export KEEL_GATEWAY_PORT KEEL_GATEWAY_2_PORT
KEEL_GATEWAY_PORT=$(free_port)
KEEL_GATEWAY_2_PORT=$(free_port)
one="http://127.0.0.1:$KEEL_GATEWAY_PORT"
two="http://127.0.0.1:$KEEL_GATEWAY_2_PORT"
work=$(mktemp -d)
acked="$work/acked"

dc() { "${compose[@]}" -p "$project" -f deploy/compose.yaml "$@"; }
keel_in() { dc exec -T "$1" /usr/local/bin/keel "${@:2}"; }
container() { dc ps -q "$1"; }
cleanup() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "== the stack's logs (last lines of each part)"
    dc logs --no-color --tail 20 2>&1 || true
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  docker image rm "$KEEL_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# Polls `$@` until it succeeds, for $limit seconds at most.
until_ok() {
  local what=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "FAILED: $what not within ${limit}s" >&2
      "$@" >&2 || true
      return 1
    fi
    sleep 1
  done
}
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(container "$1")")" = healthy ]; }
leader() { keel_in log-1 cluster status --addr 127.0.0.1:20002 | sed -n 's/^leader: *node \([0-9]*\).*/\1/p'; }
serving() { python3 deploy/load.py read "$1" 1; }

echo "== image"
deploy/image.sh "$KEEL_IMAGE"

echo "== up"
dc up -d >"$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
for part in registry-1 registry-2 registry-3 log-1 log-2 log-3 gateway-1 gateway-2; do
  until_ok "$part healthy" 120 healthy "$part"
done
until_ok "grades through gateway-1" 120 serving "$one"
until_ok "grades through gateway-2" 60 serving "$two"

# The load, in the background for the length of the faults: an idempotent producer
# through gateway-1 (each record retried until acknowledged) and a reader through
# gateway-2 (every request must be answered). Both stop by themselves after a
# bounded count; the producer also at SIGTERM.
python3 deploy/load.py produce "$one" 0 20000 "$acked" &
producer=$!
python3 deploy/load.py read "$two" 100000 &
reader=$!
stop_load() {
  for pid in "$producer" "$reader"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
    wait "$pid"
  done
}
sleep 3

echo "== 1. the log leader's container killed under load"
victim=$(leader)
echo "leader: log-$victim; killing it"
docker kill "$(container "log-$victim")" >/dev/null
sleep 5
dc start "log-$victim" >/dev/null 2>&1
until_ok "log-$victim healthy again" 120 healthy "log-$victim"

echo "== 2. a log follower cut off the network, then back"
now=$(leader)
cut=$(( now % 3 + 1 ))
network="${project}_keel"
echo "leader: log-$now; disconnecting log-$cut for 10 s"
docker network disconnect "$network" "$(container "log-$cut")"
sleep 10
docker network connect --alias "log-$cut" "$network" "$(container "log-$cut")"
until_ok "log-$cut healthy again" 120 healthy "log-$cut"

echo "== 3. a rolling restart of the log nodes under load"
for n in 1 2 3; do
  dc restart "log-$n" >/dev/null 2>&1
  until_ok "log-$n healthy after its restart" 120 healthy "log-$n"
done
sleep 3
stop_load

echo "== every acknowledged record on every log node, once"
total=$(wc -l <"$acked")
check() {
  keel_in "log-$1" consume --addr 127.0.0.1:20002 -t deploy --format json --max "$total" |
    python3 deploy/load.py verify "$acked" "log-$1"
}
for n in 1 2 3; do
  until_ok "log-$n holding every acknowledged record" 60 check "$n"
  check "$n"
done
echo "== grades written through one gateway, read at their offset through the other"
python3 deploy/load.py grades "$one" "$two" 20

echo "PASSED deploy test: $total acknowledged records on 3 nodes, once each, through a leader kill, a partition and a rolling restart"
