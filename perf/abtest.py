"""A/B: two (or more) checkouts of aserver, alternating, CPU per request of each process.

    .venv/bin/python perf/abtest.py before=/tmp/before after=. --configs 50x1,1000x1 --rounds 3
    .venv/bin/python perf/abtest.py c=. python=.:ASERVER_PURE_PYTHON=1 --configs 50x4x16384

Each variant is NAME=CHECKOUT[:ENV=VALUE...]: a directory to run `python -m aserver` in
(its C modules built in place: `.venv/bin/python setup.py build_ext --inplace` there, after
`.venv/bin/pip install setuptools` on Python 3.12+), and environment settings. What each
variant runs in C is printed first (a checkout without its C modules runs pure Python).
Per configuration (CONNECTIONSxDEPTH[xBODY]) and round, each variant in turn gets a fresh
server (1 worker, WARNING log, a free port) and the C load generator (perf/cload.c) for
--duration seconds; it prints the variant's req/s, p99, and the CPU
time per request of its worker and its conn process, read from /proc around a window in
the middle of the run. bench.py compares aserver with the reference; this compares aserver
with itself (perf/README.md's fourth-round req/s and CPU-per-request figures).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
import cload

SETTINGS = """\
[server]
bind = "127.0.0.1:{port}"
log_level = "WARNING"
[workers]
count = 1
[supervisor]
pid_file = "{pid_file}"
"""


def cpu_seconds(pid: int) -> float:
    cpu = bench.process_cpu(pid)
    if cpu is None:
        raise RuntimeError(f"process {pid} is gone")
    return cpu[1]


def describe(checkout: Path, env: dict[str, str]) -> str:
    """What the variant runs in C (aserver.native.describe() in its checkout)."""
    probe = subprocess.run([sys.executable, "-c", "from aserver.native import describe; print(describe())"],
                           cwd=checkout, env={**os.environ, **env, "PYTHONPATH": str(checkout)},
                           capture_output=True, text=True)
    return probe.stdout.strip() or probe.stderr.strip().splitlines()[-1]


def child_named(parent: int, role: str) -> int:
    """The supervisor's child whose process title is `role` (e.g. "worker 0")."""
    for pid in bench.process_tree(parent):
        cpu = bench.process_cpu(pid)
        if cpu is not None and bench.short_title(cpu[0]) == role:
            return pid
    raise RuntimeError(f"no {role!r} process under {parent}: did the server start?")


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    checkout, *settings = rest.split(":")
    env = dict(setting.split("=", 1) for setting in settings)
    return name, Path(checkout).resolve(), env


def run_one(checkout: Path, env: dict[str, str], connections: int, depth: int, body: int, duration: float,
            tmp: Path) -> dict:
    port = bench.free_port()
    settings = tmp / f"ab-{port}.toml"
    settings.write_text(SETTINGS.format(port=port, pid_file=tmp / f"ab-{port}.pid"))
    log = tmp / f"ab-{port}.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "aserver", "--settings", str(settings)], cwd=checkout,
                                  env={**os.environ, **env, "PYTHONPATH": str(checkout)}, stderr=stderr)
    client = None
    try:
        deadline = time.monotonic() + bench.START_TIMEOUT
        while not bench.echo_probe(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aserver in {checkout} did not start:\n" + log.read_text()[-2000:])
            time.sleep(0.1)
        worker, conn = child_named(server.pid, "worker 0"), child_named(server.pid, "conn 0")
        client = subprocess.Popen([str(cload.build()), "--target", f"127.0.0.1:{port}", "-c", str(connections),
                                   "-d", str(depth), "-b", str(body), "-t", str(duration), "--warmup", "1"],
                                  stdout=subprocess.PIPE)
        window = duration * 0.6
        time.sleep(1 + duration * 0.2)
        before = (cpu_seconds(worker), cpu_seconds(conn), time.monotonic())
        time.sleep(window)
        after = (cpu_seconds(worker), cpu_seconds(conn), time.monotonic())
        result = json.loads(client.communicate(timeout=duration + 70)[0])
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=bench.STOP_TIMEOUT)
    requests = result["req_per_s"] * (after[2] - before[2])
    return {"req_per_s": result["req_per_s"], "p99_ms": result["latency_ms"]["p99"], "errors": result["errors"],
            "worker_us": (after[0] - before[0]) / requests * 1e6, "conn_us": (after[1] - before[1]) / requests * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=CHECKOUT[:ENV=VALUE...]")
    parser.add_argument("--configs", default="50x16,50x1,1000x1", help="CONNECTIONSxDEPTH[xBODY], comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variants]
    for name, checkout, env in variants:
        print(f"{name}: {checkout} ({describe(checkout, env)})", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="aserver-ab-") as tmp:
        for config in args.configs.split(","):
            connections, depth, body = ([int(x) for x in config.split("x")] + [64])[:3]
            for _ in range(args.rounds):
                for name, checkout, env in variants:
                    r = run_one(checkout, env, connections, depth, body, args.duration, Path(tmp))
                    failed += r["errors"]
                    print(f"{config:12s} {name:10s} {r['req_per_s']:9,.0f} req/s  p99 {r['p99_ms']:6.2f} ms  "
                          f"worker {r['worker_us']:6.2f} us/req  conn {r['conn_us']:6.2f} us/req"
                          + (f"  {r['errors']} ERRORS" if r["errors"] else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
