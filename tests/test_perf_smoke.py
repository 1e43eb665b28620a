"""Keeps perf/ working: a tiny benchmark against both real servers. No timing asserts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"
sys.path.insert(0, str(PERF))

import bench  # noqa: E402  (from perf/, put on the path above)
import cload  # noqa: E402
import loadgen  # noqa: E402

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="the C load generator needs gcc")


def test_bench_command_end_to_end(tmp_path: Path) -> None:
    """The documented command on a tiny scale: it runs, writes its files and every reply (and
    every idle connection's echo) verified. "bytes" is left out: it is a matrix run at 16 KiB.
    The Python load generator here; the C one in test_bench_with_c_client."""
    out = tmp_path / "results"
    argv = [sys.executable, str(PERF / "bench.py"), "--duration", "0.2", "--warmup", "0.1",
            "--connections", "4", "--depths", "2", "--bodies", "64", "--workers", "1",
            "--idle", "200", "--only", "matrix,cpu,idle", "--client", "python", "--client-processes", "1",
            "--quiet-wait", "0", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=PERF.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "throughput.png", "latency.png"}
    report = json.loads((out / "results.json").read_text())
    labels = {(r["spec"]["key"], r["spec"]["label"]) for r in report["runs"]}
    assert labels == {("4x2 64 B", "reference"), ("4x2 64 B", "aserver w1"), ("50x4 64 B cmd 2", "aserver w1"),
                      ("50x4 64 B cmd 2", "aserver w2")}
    for run in report["runs"]:
        assert run["requests"] > 0 and run["errors"] == 0, run["error_samples"]
    assert [r["answered"] for r in report["idle"].values()] == [200, 200]
    assert len(report["machine_scaling"]) == 1 and report["machine_scaling"][0] > 0  # the cmd 2 ceiling
    assert "## Targets" in (out / "results.md").read_text()


@needs_gcc
def test_bench_with_c_client(tmp_path: Path) -> None:
    """bench with perf/cload.c (built on demand): every reply verified, reference and aserver."""
    out = tmp_path / "results"
    argv = [sys.executable, str(PERF / "bench.py"), "--duration", "0.3", "--warmup", "0.1",
            "--connections", "4", "--depths", "4", "--bodies", "3000", "--workers", "1",
            "--only", "matrix", "--client", "c", "--quiet-wait", "0", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=PERF.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "load generator: C" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["options"]["client"] == "c"
    assert {r["spec"]["label"] for r in report["runs"]} == {"reference", "aserver w1"}
    for run in report["runs"]:
        assert run["requests"] > 0 and run["errors"] == 0, run["error_samples"]
        assert run["latency_ms"]["samples"] > 0


@needs_gcc
def test_cload_two_processes_same_result_keys() -> None:
    """Split over two processes and merged; the result has loadgen's keys."""
    port = bench.free_port()
    with bench.reference_server(port):
        cfg = loadgen.LoadConfig(port=port, connections=5, depth=3, body=100, duration=0.3, warmup=0.1,
                                 processes=2)
        result = cload.run(cfg)
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests"] > 0
    assert set(result) == set(bench.failed_result(cfg, "")) and set(result["latency_ms"]) == {
        "p50", "p99", "p99.9", "samples"}
    assert result["config"]["processes"] == 2
    assert "req/s" in loadgen.format_result(result)


def serve_corrupted_echo(listener: socket.socket, bad_packet: int) -> None:
    """Echo one connection, but with status 3 in reply number `bad_packet` (1-based)."""
    conn, _ = listener.accept()
    with conn:
        buffer, count = b"", 0
        try:
            while data := conn.recv(65536):
                buffer += data
                out = bytearray()
                while len(buffer) >= 4 and len(buffer) >= (size := int.from_bytes(buffer[:4], "little")):
                    packet, buffer = bytearray(buffer[:size]), buffer[size:]
                    count += 1
                    if count == bad_packet:
                        packet[10] = 3
                    out += packet
                conn.sendall(out)
        except OSError:
            pass  # the client closes on a bad reply


@needs_gcc
def test_cload_counts_bad_replies() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve_corrupted_echo, args=(listener, 3), daemon=True)
        thread.start()
        cfg = loadgen.LoadConfig(port=listener.getsockname()[1], connections=1, depth=2, body=8,
                                 duration=0.2, warmup=0.05, drain_timeout=1.0)
        result = cload.run(cfg)
        thread.join(timeout=5)
    assert result["errors"] >= 1
    assert result["error_samples"][0] == "reply #2: status 3 != 0", result["error_samples"]


def test_ring_plan_stays_in_budget() -> None:
    """1,000 connections x 16 x 16 KiB would need 0.5 GB of rings: they shrink, then share."""
    pkt = loadgen.HEADER_SIZE + 16384
    ring_bytes, rings = loadgen.ring_plan(1000, pkt, 16)
    assert ring_bytes == 32 * pkt and rings * ring_bytes <= loadgen.RING_BUDGET
    assert loadgen.ring_plan(50, 64 + loadgen.HEADER_SIZE, 16) == (loadgen.RING_BYTES, 50)


def test_loadgen_two_processes_and_summary(tmp_path: Path) -> None:
    port = bench.free_port()
    with bench.reference_server(port):
        cfg = loadgen.LoadConfig(port=port, connections=4, depth=2, body=100, duration=0.3,
                                 warmup=0.1, processes=2)
        result = loadgen.run(cfg)
    assert result["requests"] > 0
    assert result["errors"] == 0, result["error_samples"]
    assert "req/s" in loadgen.format_result(result)


def test_loadgen_counts_bad_replies() -> None:
    """A reply differing from its request in one field is counted and described."""
    ring, count = loadgen.build_ring(1, 5, 8, 2, loadgen.random.Random(1))
    pkt = loadgen.HEADER_SIZE + 8
    assert count >= 4 and len(ring) == count * pkt
    bad = bytearray(ring[:pkt])
    bad[10] = 3  # status_code 3
    assert "status 3 != 0" in loadgen.describe_mismatch(bytes(bad), ring[:pkt])
    assert loadgen.ring_slice(ring, len(ring) - 2, 4) == ring[-2:] + ring[:2]


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


async def test_load_protocol_verifies_stream() -> None:
    """Good replies (in any split) pipeline new requests; a reordered pair is two errors."""
    ring, _ = loadgen.build_ring(1, 5, 8, 2, loadgen.random.Random(2))
    pkt = loadgen.HEADER_SIZE + 8
    stats = loadgen.Stats()
    proto = loadgen.LoadProtocol(ring, pkt, 2, stats, asyncio.get_running_loop().create_future())
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written == [ring[: 2 * pkt]]
    proto.data_received(ring[:5])
    proto.data_received(ring[5:pkt])
    assert proto.completed == 1 and transport.written[-1] == ring[2 * pkt : 3 * pkt]
    proto.data_received(ring[2 * pkt : 3 * pkt] + ring[pkt : 2 * pkt])  # replies swapped
    assert stats.errors == 2 and transport.closed
    assert "seq_num" in stats.error_samples[0]


@pytest.mark.parametrize("pure_python", ["", "1"])
def test_ringbench_runs_on_either_core(pure_python: str) -> None:
    env = {**os.environ, "ASERVER_PURE_PYTHON": pure_python}
    proc = subprocess.run([sys.executable, str(PERF / "ringbench.py"), "--records", "2000", "--rounds", "1"],
                          capture_output=True, text=True, timeout=60, cwd=PERF.parent, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"(C: .+|pure Python): \d+\.\d\d us per 100-byte record written and read\n", proc.stdout)
    if pure_python:
        assert proc.stdout.startswith("pure Python")


@needs_gcc
def test_abtest_runs_two_variants_of_this_checkout() -> None:
    """perf/abtest.py (how perf/README's A/B figures are measured): this checkout on the C
    and the pure-Python path, every reply verified by the load generator."""
    proc = subprocess.run([sys.executable, str(PERF / "abtest.py"), "c=.", "python=.:ASERVER_PURE_PYTHON=1",
                           "--configs", "5x2", "--rounds", "1", "--duration", "1"],
                          capture_output=True, text=True, timeout=120, cwd=PERF.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    described, rows = proc.stdout.splitlines()[:2], proc.stdout.splitlines()[2:]
    assert described[0].startswith("c: ") and described[1].endswith("(pure Python)"), described
    assert [row.split()[:2] for row in rows] == [["5x2", "c"], ["5x2", "python"]], proc.stdout
    for row in rows:
        numbers = [float(x) for x in re.findall(r"(\d[\d,]*\.?\d*) (?:req/s|ms|us/req)", row.replace(",", ""))]
        assert len(numbers) == 4 and numbers[0] > 0 and numbers[2] > 0 and numbers[3] > 0, row
