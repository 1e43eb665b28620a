"""The C load generator (perf/cload.c) from Python: same LoadConfig, same result dict as loadgen.

    python perf/cload.py --target 127.0.0.1:7000 -c 50 -d 16 -b 64 -t 5 [--processes 2] [--json]

or `run(LoadConfig(...))`. `build()` compiles perf/cload.c into perf/build/cload with gcc when
the source is newer than the binary. The C client does what loadgen.py does (rings of
precomputed requests, D in flight, every reply byte compared with the request stream,
sampled latency, drain after the window) in a single-threaded epoll loop, so nearly all of
its CPU time is the kernel's socket work and little is left in user space.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import loadgen

PERF_DIR = Path(__file__).resolve().parent
SOURCE = PERF_DIR / "cload.c"
BINARY = PERF_DIR / "build" / "cload"
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]


def _up_to_date() -> bool:
    return BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime


def available() -> bool:
    """True if the C client can be used: gcc is installed, or the binary is already built."""
    return shutil.which("gcc") is not None or _up_to_date()


def build() -> Path:
    """Compile perf/cload.c unless perf/build/cload is newer; returns the binary's path."""
    if _up_to_date():
        return BINARY
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("the C load generator needs gcc to build perf/cload.c (not found on PATH): "
                           "install gcc, or use the Python one (bench.py --client python)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent builds never see half a binary.
    tmp = f"{BINARY}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run([gcc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, BINARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BINARY


def argv_for(cfg: loadgen.LoadConfig) -> list[str]:
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    argv = [str(build()), "--target", f"{host}:{cfg.port}", "-c", str(cfg.connections), "-d", str(cfg.depth),
            "-b", str(cfg.body), "-t", repr(float(cfg.duration)), "--warmup", repr(float(cfg.warmup)),
            "--cmd", str(cfg.cmd_id), "-p", str(cfg.processes), "--drain-timeout", repr(float(cfg.drain_timeout))]
    if cfg.start_at is not None:  # time.monotonic() is CLOCK_MONOTONIC, which cload reads too
        argv += ["--start-at", repr(float(cfg.start_at))]
    return argv


def run(cfg: loadgen.LoadConfig) -> dict:
    """Run the load with the C client (blocking); returns the result like loadgen.run."""
    if cfg.connections < 1 or cfg.depth < 1 or cfg.processes < 1:
        raise ValueError("connections, depth and processes must be >= 1")
    argv = argv_for(cfg)
    start = cfg.start_at if cfg.start_at is not None else time.monotonic() + 0.2 * cfg.processes
    timeout = max(0.0, start - time.monotonic()) + cfg.warmup + cfg.duration + cfg.drain_timeout + 60
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"cload did not finish within {timeout:.0f} s") from None
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"cload failed (exit {proc.returncode}): {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    result["config"] = asdict(cfg)
    return result


def main(argv: list[str] | None = None) -> int:
    """loadgen.py's command line, driving the C client."""
    return loadgen.main(argv, client=run, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
