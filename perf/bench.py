"""The benchmark: aserver against the single-process reference echo server, and the targets.

    .venv/bin/python perf/bench.py                 # everything, ~5 min
    .venv/bin/python perf/bench.py --quick         # ~1 min look
    .venv/bin/python perf/bench.py --only matrix --connections 50 --bodies 64

Sections (--only): "matrix" = connections x in-flight x body for the reference and aserver
with each of --workers; "bytes" = 16 KiB bodies at 50 x 4; "cpu" = cmd 2 (~200 us of
Python per request) with 1 and 2 workers, and the same work in 1 and 2 bare processes (the
machine's own scaling: that target's ceiling); "idle" = --idle connections held open, the
conn process's VmRSS growth per connection, then one echo on each. Servers of one
configuration run one after another, each run on a fresh server and a free port.

Prints every run, the matrix, the targets of issue 4 (ratios measured in this run) and
writes results.json, results.md, throughput.png and latency.png to --out (default
perf/results/bench-<time>/). Exits 1 if any reply failed verification. CPU of the client,
each server process and the rest of the machine ("other") is sampled from /proc in each
measured window: on a 2-core machine they all share the same cores.

The load generator (--client) is perf/cload.c ("c", built with gcc on first use; the
default when gcc is there) or perf/loadgen.py ("python"): same checks, same results.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cload
import idle
import loadgen
import report

PERF_DIR = Path(__file__).resolve().parent
REPO = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"
TICK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

SETTINGS_TOML = """\
[server]
name = "bench"
log_level = "WARNING"
# Room for the 10,000 idle connections; the supervisor raises its open-files limit to
# match, which must stay under the hard limit (20,000 here).
max_connections = 15000

[supervisor]
pid_file = "{pid_file}"

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


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when bench dies, even by SIGKILL (e.g. a test
    timeout), so no server outlives it. Linux prctl(PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


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
            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent,
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

SECTIONS = ("matrix", "bytes", "cpu", "idle")


@dataclass(frozen=True)
class Spec:
    """One run: a server (aserver with `workers` workers, or the reference) under one load."""

    server: str
    connections: int
    depth: int
    body: int
    workers: int = 0
    cmd: int = 1

    def as_dict(self) -> dict:
        return {**asdict(self), "key": report.config_key(self.connections, self.depth, self.body, self.cmd),
                "label": report.server_label(self.server, self.workers)}


@dataclass
class Options:
    duration: float = 3.0
    warmup: float = 0.5
    rounds: int = 1
    connections: list[int] = field(default_factory=lambda: [50, 1000])
    depths: list[int] = field(default_factory=lambda: [1, 16])
    bodies: list[int] = field(default_factory=lambda: [64, 16384])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    only: list[str] = field(default_factory=lambda: list(SECTIONS))
    idle: int = 10_000  # idle connections opened in the "idle" section
    client_processes: int = 0  # 0: auto (see clients_for)
    quiet_wait: float = 30.0  # max seconds to wait for an idle machine before each run
    aserver_root: Path = REPO  # where `python -m aserver` runs (and imports aserver from)
    out: Path | None = None  # results directory (default: perf/results/bench-<time>)
    client: str = field(default_factory=lambda: default_client())  # load generator: "c" or "python"


def plan(opts: Options) -> list[list[Spec]]:
    """Groups of runs at one load; the servers of a group run one after another (alternating)."""
    groups: list[list[Spec]] = []

    def group(connections: int, depth: int, body: int, servers: list[tuple[str, int]], cmd: int = 1) -> None:
        groups.append([Spec(name, connections, depth, body, workers, cmd) for name, workers in servers])

    aservers = [("aserver", w) for w in opts.workers]
    if "matrix" in opts.only:
        for connections in opts.connections:
            for depth in opts.depths:
                for body in opts.bodies:
                    group(connections, depth, body, [("reference", 0), *aservers])
    if "bytes" in opts.only:  # target: 16 KiB bodies at 50 x 4, bytes/s
        group(50, 4, 16384, [("reference", 0), ("aserver", 1)])
    if "cpu" in opts.only:  # target: cmd 2 scales with workers (the reference does no work)
        group(50, 4, 64, [("aserver", 1), ("aserver", 2)], cmd=2)
    return groups


CLIENTS = ("c", "python")


def default_client() -> str:
    """The C load generator if it can be built (or already is), else the Python one."""
    return "c" if cload.available() else "python"


def clients_for(spec: Spec, opts: Options) -> int:
    """Load generator processes. The C client: one. The Python one cannot outrun a pipelined
    server with one process, two can (measured in perf/README.md); at depth 1 the server
    waits on round trips and one is plenty."""
    if opts.client_processes:
        return opts.client_processes
    if opts.client == "c":
        return 1
    return 2 if spec.depth > 1 else 1


def write_settings(directory: Path) -> Path:
    path = directory / "settings.toml"
    path.write_text(SETTINGS_TOML.format(workers=1, pid_file=directory / "aserver.pid"))
    return path


def start_server(spec: Spec, port: int, settings_path: Path, opts: Options) -> Server:
    if spec.server == "reference":
        return reference_server(port)
    return aserver_server(port, spec.workers, settings_path, opts.aserver_root)


def run_load(spec: Spec, opts: Options, settings_path: Path) -> dict:
    """Start the server, run one load against it with CPU sampling, stop it."""
    if opts.quiet_wait > 0:
        wait_for_quiet(opts.quiet_wait)
    port = free_port()
    clients = clients_for(spec, opts)
    in_flight_bytes = spec.connections * spec.depth * (loadgen.HEADER_SIZE + spec.body)
    with start_server(spec, port, settings_path, opts) as server:
        assert server.proc is not None
        # Connecting 1,000 sockets takes a moment: measuring starts after that and the warm-up.
        start_at = time.monotonic() + 0.3 * clients + 0.001 * spec.connections + opts.warmup
        cfg = loadgen.LoadConfig(port=port, connections=spec.connections, depth=spec.depth, body=spec.body,
                                 duration=opts.duration, warmup=opts.warmup, cmd_id=spec.cmd,
                                 processes=clients, start_at=start_at,
                                 drain_timeout=5.0 + in_flight_bytes / 20e6)
        sampler = WindowSampler(server.proc.pid, start_at, opts.duration)
        sampler.start()
        try:
            result = cload.run(cfg) if opts.client == "c" else loadgen.run(cfg)
        except (OSError, RuntimeError, queue.Empty) as exc:  # e.g. connections refused: a failed run
            result = failed_result(cfg, f"load generator failed: {type(exc).__name__}: {exc}")
        sampler.join(timeout=opts.duration + 10)
    return finish_result(result, spec, sampler.result, server)


def failed_result(cfg: loadgen.LoadConfig, why: str) -> dict:
    """A run that produced no measurement: counted as one error so bench exits 1."""
    nan = float("nan")
    return {"config": asdict(cfg), "requests": 0, "elapsed_s": 0.0, "req_per_s": 0.0, "bytes_per_s": 0.0,
            "latency_ms": {"p50": nan, "p99": nan, "p99.9": nan, "samples": 0}, "errors": 1,
            "error_samples": [why], "client_cpu_s": 0.0, "client_cpu_cores": 0.0, "connect_s": nan}


def finish_result(result: dict, spec: Spec, window: dict, server: Server) -> dict:
    server_cpu = window.get("cores", {})
    per_request = {
        name: {key: value / max(1, result["requests"]) for key, value in counts.items()}
        for name, counts in window.get("counters", {}).items()
        if server_cpu.get(name, 0.0) >= 0.01  # skip idle helpers (supervisor, trackers)
    }
    result.update(
        spec=spec.as_dict(),
        server=spec.server,
        server_cpu_cores=server_cpu,
        server_per_request=per_request,
        other_cpu_cores=window.get("system", float("nan")) - sum(server_cpu.values()) - result["client_cpu_cores"],
        server_stderr_tail=server.stderr[-10:],
        loadavg=os.getloadavg(),
    )
    return result


def holder_pid(server: Server) -> int:
    """The process holding client sockets: aserver's conn process, or the reference itself."""
    assert server.proc is not None
    if server.name == "reference":
        return server.proc.pid
    for pid in process_tree(server.proc.pid):
        cpu = process_cpu(pid)
        if cpu is not None and short_title(cpu[0]) == "conn 0":
            return pid
    raise RuntimeError("no 'conn 0' process under the aserver supervisor")


def run_idle(spec: Spec, opts: Options, settings_path: Path) -> dict:
    if opts.quiet_wait > 0:
        wait_for_quiet(opts.quiet_wait)
    port = free_port()
    with start_server(spec, port, settings_path, opts) as server:
        result = idle.run("127.0.0.1", port, holder_pid(server), opts.idle)
    print(f"idle {spec.as_dict()['label']:<11} {opts.idle:,} connections: "
          f"{result['kib_per_conn_open']:.2f} KiB/conn open, {result['kib_per_conn_answered']:.2f} answered, "
          f"{result['answered']:,} answered", flush=True)
    return result


ROW_HEADER = ("config            server           req/s     MB/s  p50 ms  p99 ms p99.9ms errors "
              "client  other  server CPU (cores)")


def print_row(r: dict) -> None:
    lat, spec = r["latency_ms"], r["spec"]
    cpu = " ".join(f"{k}={v:.2f}" for k, v in sorted(r["server_cpu_cores"].items()) if v >= 0.005)
    noisy = " *" if r["other_cpu_cores"] > report.NOISY_CORES else ""
    if r.get("connect_s", 0.0) > 1.0:  # the window then started late, after the connects
        noisy += f" (connecting took {r['connect_s']:.1f} s)"
    print(
        f"{spec['key']:<17} {spec['label']:<11} {r['req_per_s']:>10,.0f} {r['bytes_per_s'] / 1e6:>8,.1f} "
        f"{lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['p99.9']:>7.2f} {r['errors']:>6} "
        f"{r['client_cpu_cores']:>6.2f} {r['other_cpu_cores']:>6.2f}  {cpu}{noisy}",
        flush=True,
    )


def _burn_for(seconds: float, out: multiprocessing.queues.Queue, root: Path) -> None:
    sys.path.insert(0, str(root))
    from handlers.echo import burn

    done = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        burn()
        done += 1
    out.put(done)


def machine_scaling(seconds: float, root: Path) -> float:
    """cmd 2's work (handlers.echo.burn of the aserver checkout at `root`) in two
    processes at once against one alone: how far this machine lets two CPU-bound
    processes scale, the ceiling of the cmd 2 target."""
    context = multiprocessing.get_context("fork")
    totals = []
    for processes in (1, 2):
        out = context.Queue()
        workers = [context.Process(target=_burn_for, args=(seconds, out, root)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        totals.append(sum(out.get(timeout=seconds + 30) for _ in workers))
        for worker in workers:
            worker.join()
    return totals[1] / totals[0]


def bench(opts: Options) -> dict:
    """Run everything selected; returns the report (options, runs, summary, idle,
    machine_scaling, targets)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    if opts.client == "c":
        print(f"load generator: C ({cload.build().relative_to(REPO)})", flush=True)
    else:
        print("load generator: Python (perf/loadgen.py)", flush=True)
    runs: list[dict] = []
    idle_results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="aserver-bench-") as tmp:
        settings_path = write_settings(Path(tmp))
        print(ROW_HEADER, flush=True)
        scaling: list[float] = []
        for _ in range(opts.rounds):
            for group in plan(opts):
                for spec in group:
                    runs.append(run_load(spec, opts, settings_path))
                    print_row(runs[-1])
            if "cpu" in opts.only:
                scaling.append(machine_scaling(opts.duration, opts.aserver_root))
                print(f"machine: cmd 2's work in 2 processes vs 1 (no server): {scaling[-1]:.2f}", flush=True)
        if "idle" in opts.only:
            for spec in (Spec("reference", opts.idle, 0, 0), Spec("aserver", opts.idle, 0, 0, workers=1)):
                idle_results[spec.as_dict()["label"]] = run_idle(spec, opts, settings_path)
    summary = report.summarize(runs)
    options = {**asdict(opts), "aserver_root": str(opts.aserver_root), "out": str(opts.out)}
    return {"started": started, "options": options, "runs": runs, "summary": summary, "idle": idle_results,
            "machine_scaling": scaling, "targets": report.targets(summary, idle_results, scaling)}


def error_lines(rep: dict) -> list[str]:
    lines = [f"{r['spec']['label']} {r['spec']['key']}: {s}" for r in rep["runs"] for s in r["error_samples"]]
    lines += [f"{label} idle: {r['errors']} of {r['connections']} connections not answered"
              for label, r in rep["idle"].items() if r["errors"]]
    return lines


def total_errors(rep: dict) -> int:
    return sum(r["errors"] for r in rep["runs"]) + sum(r["errors"] for r in rep["idle"].values())


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="runs per server per configuration")
    parser.add_argument("--connections", type=csv_ints, default=[50, 1000], help="matrix: e.g. 50,1000")
    parser.add_argument("--depths", type=csv_ints, default=[1, 16], help="matrix: requests in flight, e.g. 1,16")
    parser.add_argument("--bodies", type=csv_ints, default=[64, 16384], help="matrix: body bytes, e.g. 64,16384")
    parser.add_argument("--workers", type=csv_ints, default=[1, 2], help="matrix: aserver workers, e.g. 1,2")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections in the idle section")
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 minute look: 1 s runs, 50 connections only, 2,000 idle connections")
    parser.add_argument("--client", choices=CLIENTS, default=None,
                        help="load generator: c (perf/cload.c, built with gcc) or python (perf/loadgen.py); "
                             "default c if gcc is available, else python")
    parser.add_argument("--client-processes", type=int, default=0,
                        help="load generator processes (0: 1 for the C client; for the Python one 2 when "
                             "pipelining, else 1)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="max seconds to wait for an idle machine before each run (0: don't)")
    parser.add_argument("--aserver-root", type=Path, default=REPO,
                        help="run aserver from this source tree (default: this repository)")
    parser.add_argument("--out", type=Path, help="results directory (default: perf/results/bench-<time>)")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown --only section(s): {', '.join(sorted(unknown))}")
    if args.client == "c" and not cload.available():
        parser.error("--client c needs gcc to build perf/cload.c (not found on PATH)")
    opts = Options(args.duration, args.warmup, args.rounds, args.connections, args.depths, args.bodies,
                   args.workers, only, args.idle, args.client_processes, args.quiet_wait,
                   args.aserver_root.resolve(), args.out, args.client or default_client())
    if args.quick:
        opts.duration, opts.warmup, opts.connections, opts.idle = 1.0, 0.3, [50], min(opts.idle, 2000)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    rep = bench(opts)
    print("\n## Matrix\n\n" + report.matrix_table(rep["summary"]))
    if rep["idle"]:
        print("\n## Idle connections\n\n" + report.idle_table(rep["idle"]))
    print("\n## Targets\n\n" + report.targets_table(rep["targets"]))
    noisy = sum(r["other_cpu_cores"] > report.NOISY_CORES for r in rep["runs"])
    if noisy:
        print(f"\n* {noisy} run(s) shared the machine with other busy processes: treat with care")
    out = opts.out or RESULTS_DIR / time.strftime("bench-%Y%m%d-%H%M%S")
    paths = report.write(rep, out)
    print("\nresults: " + ", ".join(str(p) for p in paths))
    if errors := total_errors(rep):
        print(f"\nFAILED: {errors} error(s): replies failing verification or missing, or runs that failed",
              file=sys.stderr)
        for line in error_lines(rep):
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
