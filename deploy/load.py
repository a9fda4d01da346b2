#!/usr/bin/env python3
"""Bounded load for deploy/test.sh, through a gateway on the host.

  load.py produce URL FIRST COUNT ACKED   append values deploy-FIRST.. as one
      idempotent producer (keel-producer/keel-sequence), each retried until
      acknowledged (60 s at most); the acknowledged values go to the file ACKED.
      Stops after COUNT, or at SIGTERM (what was acknowledged so far stands)
  load.py read URL COUNT                  GET /grading/students COUNT times: every
      one must be answered 200 (the gateway retries an idempotent request itself)
  load.py grades WRITE READ COUNT         POST COUNT grades through the gateway
      WRITE; after each, GET the student through the gateway READ with the
      grade's keel-offset as min_offset, twice (the gateway balances over both
      grading instances): each must show the grade, once
  load.py verify ACKED NODE               the output of `keel consume --format json`
      on stdin holds every acknowledged value exactly once
"""
import base64
import json
import signal
import sys
import time
import urllib.error
import urllib.request

PRODUCER = 4242


def produce(url, first, count, acked_file):
    retries = 0
    done = 0
    started = time.monotonic()

    def summary(*_):
        print(f"produced deploy-{first}..: {done} acknowledged "
              f"in {time.monotonic() - started:.1f} s, {retries} attempts retried")
        sys.exit(0)

    signal.signal(signal.SIGTERM, summary)
    with open(acked_file, "a", encoding="utf-8") as acked:
        for n in range(first, first + count):
            value = f"deploy-{n}".encode()
            request = urllib.request.Request(
                f"{url}/log/v1/topics/deploy/records",
                data=value,
                method="POST",
                headers={
                    "content-type": "application/octet-stream",
                    "keel-producer": str(PRODUCER),
                    "keel-sequence": str(n + 1),
                },
            )
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        if response.status // 100 == 2:
                            acked.write(value.decode() + "\n")
                            acked.flush()
                            done += 1
                            break
                except (urllib.error.URLError, OSError) as err:
                    last = err
                if time.monotonic() > deadline:
                    sys.exit(f"deploy-{n} not acknowledged within 60 s: {last}")
                retries += 1
                time.sleep(0.2)
    summary()


def read(url, count):
    # Stopped by a signal at the end of a phase: say how many were answered.
    answered = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(print(f"reads: all {answered} answered")))
    for n in range(count):
        try:
            with urllib.request.urlopen(f"{url}/grading/students", timeout=10) as response:
                body = json.load(response)
                if response.status != 200 or not body:
                    sys.exit(f"read {n}: {response.status} {body}")
                answered += 1
        except (urllib.error.URLError, OSError) as err:
            sys.exit(f"read {n} got no answer: {err}")


def grades(write, read, count):
    for n in range(count):
        title = f"deploy grade {n} {time.time_ns()}"
        request = urllib.request.Request(
            f"{write}/grading/students/2/grades",
            data=json.dumps({"title": title, "type": "quiz", "score": 70}).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            offset = response.headers["keel-offset"]
            if response.status != 201 or offset is None:
                sys.exit(f"grade {n}: {response.status}, keel-offset {offset}")
        for _ in range(2):
            url = f"{read}/grading/students/2?min_offset={offset}"
            with urllib.request.urlopen(url, timeout=15) as response:
                titles = [g["title"] for g in json.load(response)["grades"]]
            if titles.count(title) != 1:
                sys.exit(f"grade {n} at offset {offset}: {titles.count(title)} copies read back")
    print(f"grades: {count} written, each read back from both gateways' picks at its offset")


def verify(acked_file, node):
    with open(acked_file, encoding="utf-8") as acked:
        want = [line.strip() for line in acked if line.strip()]
    got = {}
    for line in sys.stdin:
        line = line.strip()
        if line:
            value = base64.b64decode(json.loads(line)["value"]).decode()
            got[value] = got.get(value, 0) + 1
    missing = [v for v in want if v not in got]
    twice = [v for v in want if got.get(v, 0) > 1]
    if missing or twice:
        sys.exit(f"{node}: {len(missing)} acknowledged records missing {missing[:5]}, "
                 f"{len(twice)} stored twice {twice[:5]}")
    print(f"{node}: all {len(want)} acknowledged records, once each")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "produce":
        produce(args[0], int(args[1]), int(args[2]), args[3])
    elif command == "read":
        read(args[0], int(args[1]))
    elif command == "grades":
        grades(args[0], args[1], int(args[2]))
    elif command == "verify":
        verify(args[0], args[1])
    else:
        sys.exit(__doc__)
