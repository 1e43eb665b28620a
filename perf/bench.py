"""Benchmark matrix: aserver (1 worker) against the single-process reference echo server.

    .venv/bin/python perf/bench.py --duration 5

For each configuration (64-byte bodies; 50 connections x 16 in flight, 50 x 1) the two
servers run alternately, `--rounds` times each, each run on a fresh server and a free
port. Prints every run, then a summary with the aserver/reference ratio, and writes JSON
to perf/results/. Exits 1 if any reply failed verification.

Also samples CPU during each measured window, from /proc: the client's, each server
process's, and the rest of the machine ("other"), because on a 2-core machine the client,
the server processes and anything else running all share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import loadgen

PERF_DIR = Path(__file__).resolve().parent
REPO = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"
TICK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
NOISY_CORES = 0.2  # a run during which other processes used more than this is marked "*"

SETTINGS_TOML = """\
[server]
name = "bench"
log_level = "WARNING"
max_connections = 10000

[workers]
count = {workers}
handlers = ["handlers.echo"]
routing = "connection"
"""


# Servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def echo_probe(port: int, timeout: float = 0.5) -> bool:
    """True if one echo request on a fresh connection gets its exact reply."""
    request = loadgen.HEADER.pack(loadgen.HEADER_SIZE + 4, 7, 1, 0, 9) + b"ping"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while len(reply) < len(request):
                chunk = sock.recv(len(request) - len(reply))
                if not chunk:
                    return False
                reply += chunk
            return reply == request
    except OSError:
        return False


class Server:
    """A server subprocess: started, awaited until it answers, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], port: int, cwd: Path = REPO) -> None:
        self.name = name
        self.cwd = cwd
        self.argv = argv
        self.port = port
        self.stderr: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self._wait_ready()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def _wait_ready(self) -> None:
        # "aserver ready" is logged at INFO, so at log_level WARNING it never shows:
        # an echo round trip through the real request path is the readiness test.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError(f"{self.name} exited at start-up:\n" + "\n".join(self.stderr[-20:]))
            if echo_probe(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s:\n" + "\n".join(self.stderr[-20:]))

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its processes
            self.proc.wait()
            raise RuntimeError(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT}s; killed") from None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def reference_server(port: int) -> Server:
    return Server("reference", [sys.executable, str(PERF_DIR / "reference_server.py"),
                                "--bind", f"127.0.0.1:{port}"], port)


def aserver_server(port: int, workers: int, settings_path: Path, root: Path = REPO) -> Server:
    """aserver run from `root`: `-m` puts the working directory first on sys.path, so a
    checkout elsewhere (e.g. `git archive HEAD`) is benchmarked instead of the installed one."""
    return Server("aserver", [sys.executable, "-m", "aserver", "--settings", str(settings_path),
                              "--bind", f"127.0.0.1:{port}", "--workers", str(workers)], port, cwd=root)


# CPU sampling ------------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """root and all its descendants (from /proc/*/stat ppid fields)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def process_cpu(pid: int) -> tuple[str, float, dict[str, int]] | None:
    """(title, user+system CPU seconds, counters) of one process, None if it is gone.

    Counters: read/write syscalls (/proc/pid/io) and voluntary context switches (each one
    a sleep, i.e. a wakeup needed) and involuntary ones (preempted: cores oversubscribed).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.endswith(tuple("0123456789")) and ":\t" in line)
    except OSError:
        return None
    counters = {
        "read_syscalls": int(io["syscr"]),
        "write_syscalls": int(io["syscw"]),
        "voluntary_switches": int(status["voluntary_ctxt_switches"]),
        "preempted": int(status["nonvoluntary_ctxt_switches"]),
    }
    return title, (int(fields[11]) + int(fields[12])) / TICK, counters


def system_busy() -> float:
    """CPU seconds the whole machine spent not idle (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # minus idle and iowait


def short_title(title: str) -> str:
    if ": " in title and title.startswith("aserver["):
        return title.split(": ", 1)[1]  # "conn 0", "worker 0", "supervisor"
    if "reference_server" in title:
        return "reference"
    return title.split()[-1] if "multiprocessing" not in title else "mp-helper"


def sample(root: int) -> dict:
    procs = {pid: cpu for pid in process_tree(root) if (cpu := process_cpu(pid)) is not None}
    return {"procs": procs, "system": system_busy(), "t": time.monotonic()}


def cpu_delta(before: dict, after: dict) -> dict:
    """Per server process over the window: cores used (1.0 = one core all the time) and
    counter increments; plus "_system": busy cores of the whole machine."""
    span = after["t"] - before["t"]
    cores: dict[str, float] = {}
    counters: dict[str, dict[str, int]] = {}
    for pid, (title, secs, counts) in after["procs"].items():
        if pid in before["procs"]:
            name = short_title(title)
            _, secs0, counts0 = before["procs"][pid]
            cores[name] = cores.get(name, 0.0) + (secs - secs0) / span
            mine = counters.setdefault(name, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                mine[key] += value - counts0[key]
    return {"cores": cores, "counters": counters, "system": (after["system"] - before["system"]) / span}


class WindowSampler(threading.Thread):
    """Samples a server's CPU at the start and the end of the measured window."""

    def __init__(self, root: int, start_at: float, duration: float) -> None:
        super().__init__(daemon=True)
        self.root, self.start_at, self.duration = root, start_at, duration
        self.result: dict = {}

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.monotonic()))
        before = sample(self.root)
        time.sleep(max(0.0, self.start_at + self.duration - time.monotonic()))
        self.result = cpu_delta(before, sample(self.root))


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine is idle for 0.5 s; returns the busy cores
    last seen. Others' test runs on a 2-core box would otherwise skew the comparison."""
    deadline = time.monotonic() + max_wait
    while True:
        before, t0 = system_busy(), time.monotonic()
        time.sleep(0.5)
        busy = (system_busy() - before) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


# Runs --------------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float = 5.0
    warmup: float = 1.0
    rounds: int = 2
    connections: int = 50
    depths: list[int] = field(default_factory=lambda: [16, 1])
    body: int = 64
    workers: int = 1
    client_processes: int = 1
    servers: list[str] = field(default_factory=lambda: ["reference", "aserver"])
    quiet_wait: float = 30.0  # max seconds to wait for an idle machine before each run
    aserver_root: Path = REPO  # where `python -m aserver` runs (and imports aserver from)


def run_one(server_name: str, depth: int, opts: Options, settings_path: Path) -> dict:
    if opts.quiet_wait > 0:
        wait_for_quiet(opts.quiet_wait)
    port = free_port()
    is_reference = server_name == "reference"
    server = (reference_server(port) if is_reference
              else aserver_server(port, opts.workers, settings_path, opts.aserver_root))
    with server:
        assert server.proc is not None
        start_at = time.monotonic() + 0.3 * opts.client_processes + opts.warmup
        cfg = loadgen.LoadConfig(port=port, connections=opts.connections, depth=depth, body=opts.body,
                                 duration=opts.duration, warmup=opts.warmup,
                                 processes=opts.client_processes, start_at=start_at)
        sampler = WindowSampler(server.proc.pid, start_at, opts.duration)
        sampler.start()
        result = loadgen.run(cfg)
        sampler.join(timeout=opts.duration + 10)
    server_cpu = sampler.result.get("cores", {})
    system = sampler.result.get("system", float("nan"))
    per_request = {
        name: {key: value / max(1, result["requests"]) for key, value in counts.items()}
        for name, counts in sampler.result.get("counters", {}).items()
        if server_cpu.get(name, 0.0) >= 0.01  # skip idle helpers (supervisor, trackers)
    }
    result.update(
        server=server_name,
        server_cpu_cores=server_cpu,
        server_per_request=per_request,
        other_cpu_cores=system - sum(server_cpu.values()) - result["client_cpu_cores"],
        server_stderr_tail=server.stderr[-10:],
        loadavg=os.getloadavg(),
    )
    return result


def print_row(r: dict) -> None:
    lat = r["latency_ms"]
    cpu = " ".join(f"{k}={v:.2f}" for k, v in sorted(r["server_cpu_cores"].items()) if v >= 0.005)
    noisy = " *" if r["other_cpu_cores"] > NOISY_CORES else ""
    print(
        f"{r['config']['connections']:>3}x{r['config']['depth']:<3} {r['server']:<9} "
        f"{r['req_per_s']:>10,.0f} {lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['p99.9']:>7.2f} "
        f"{r['errors']:>6} {r['client_cpu_cores']:>6.2f} {r['other_cpu_cores']:>6.2f}  {cpu}{noisy}",
        flush=True,
    )


ROW_HEADER = (
    "config  server         req/s  p50 ms  p99 ms p99.9ms errors client  other  server CPU (cores)"
)


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: statistics.mean(d.get(k, 0.0) for d in dicts) for k in sorted(keys)}


def summarize(runs: list[dict], opts: Options) -> list[dict]:
    rows = []
    for depth in opts.depths:
        row: dict = {"config": f"{opts.connections}x{depth}", "body": opts.body}
        for name in opts.servers:
            mine = [r for r in runs if r["server"] == name and r["config"]["depth"] == depth]
            if not mine:
                continue
            clean = [r for r in mine if r["other_cpu_cores"] <= NOISY_CORES]
            mine = clean or mine  # runs disturbed by other processes count only if all were
            row[name] = {
                "clean_runs": len(clean),
                "req_per_s_each": [round(r["req_per_s"]) for r in mine],
                "req_per_s": statistics.mean(r["req_per_s"] for r in mine),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in mine),
                "client_cpu_cores": statistics.mean(r["client_cpu_cores"] for r in mine),
                "server_cpu_cores": _mean_dicts([r["server_cpu_cores"] for r in mine]),
                "per_request": {
                    proc: _mean_dicts([r["server_per_request"].get(proc, {}) for r in mine])
                    for proc in mine[0]["server_per_request"]
                },
            }
        if "reference" in row and "aserver" in row:
            row["ratio"] = row["aserver"]["req_per_s"] / row["reference"]["req_per_s"]
        rows.append(row)
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\nsummary: mean req/s and median p99 over the runs not marked * (over all if every run is)")
    print(f"{'config':<8}{'server':<10}{'req/s':>10}  {'runs used':<26}{'p99 ms':>7}{'client':>8}")
    for row in rows:
        for name in ("reference", "aserver"):
            if name in row:
                s = row[name]
                runs = ", ".join(f"{x:,}" for x in s["req_per_s_each"])
                print(f"{row['config']:<8}{name:<10}{s['req_per_s']:>10,.0f}  {runs:<26}"
                      f"{s['p99_ms']:>7.2f}{s['client_cpu_cores']:>8.2f}")
        if "ratio" in row:
            print(f"{row['config']:<8}{'ratio':<10}{row['ratio']:>10.2f}  (aserver / reference)")
    print("\nper server process (mean over the same runs): cores busy; per request: read and write")
    print("syscalls, voluntary context switches (sleeps = wakeups needed), preemptions")
    for row in rows:
        for name in ("reference", "aserver"):
            for proc, per in row.get(name, {}).get("per_request", {}).items():
                cores = row[name]["server_cpu_cores"].get(proc, 0.0)
                print(f"{row['config']:<8}{name:<10}{proc:<10} {cores:5.2f} cores  "
                      f"read {per['read_syscalls']:.3f}  write {per['write_syscalls']:.3f}  "
                      f"sleeps {per['voluntary_switches']:.3f}  preempted {per['preempted']:.3f}")


def bench(opts: Options) -> dict:
    """Run the whole matrix; returns {"options", "runs", "summary"}."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="aserver-bench-") as tmp:
        settings_path = Path(tmp) / "settings.toml"
        settings_path.write_text(SETTINGS_TOML.format(workers=opts.workers))
        print(ROW_HEADER, flush=True)
        for _ in range(opts.rounds):
            for depth in opts.depths:
                for name in opts.servers:
                    result = run_one(name, depth, opts, settings_path)
                    print_row(result)
                    runs.append(result)
    options = {**opts.__dict__, "aserver_root": str(opts.aserver_root)}
    return {"options": options, "runs": runs, "summary": summarize(runs, opts)}


def write_results(report: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    return path


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server per configuration")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--depths", default="16,1", help="requests in flight per connection, comma-separated")
    parser.add_argument("--body", type=int, default=64, help="body bytes")
    parser.add_argument("--workers", type=int, default=1, help="aserver workers")
    parser.add_argument("--client-processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--servers", default="reference,aserver", help="which servers, comma-separated")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="max seconds to wait for an idle machine before each run (0: don't)")
    parser.add_argument("--aserver-root", type=Path, default=REPO,
                        help="run aserver from this source tree (default: this repository)")
    args = parser.parse_args(argv)
    return Options(args.duration, args.warmup, args.rounds, args.connections,
                   [int(d) for d in args.depths.split(",")], args.body, args.workers,
                   args.client_processes, args.servers.split(","), args.quiet_wait,
                   args.aserver_root.resolve())


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    report = bench(opts)
    print_summary(report["summary"])
    noisy = sum(r["other_cpu_cores"] > NOISY_CORES for r in report["runs"])
    if noisy:
        print(f"\n* {noisy} run(s) shared the machine with other busy processes: treat with care")
    path = write_results(report)
    print(f"\nresults: {path}")
    errors = sum(r["errors"] for r in report["runs"])
    if errors:
        print(f"\nFAILED: {errors} replies failed verification", file=sys.stderr)
        for r in report["runs"]:
            for s in r["error_samples"]:
                print(f"  {r['server']} {r['config']['connections']}x{r['config']['depth']}: {s}",
                      file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
