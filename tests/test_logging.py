"""[logging]: one file per process, size-based rotation, JSON lines."""

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from aserver.client import Client
from aserver.logs import JsonFormatter
from aserver.testing import ServerProcess

TESTS_DIR = str(Path(__file__).parent)
FAIL, UNKNOWN = 3, 999
ROLES = {"supervisor": "supervisor", "conn-0": "conn 0", "worker-0": "worker 0", "worker-1": "worker 1"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_one_json_file_per_process(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    with ServerProcess(handlers=["probe_service"], workers=2, pythonpath=[TESTS_DIR],
                       settings={"logging": {"dir": str(log_dir), "format": "json"}}) as server:
        # Started: the readiness line still reached stderr, though the log goes to files.
        assert any("aserver ready: listening on" in line for line in server.log_lines)
        async with await Client.connect(*server.address) as client:
            await client.call(FAIL, b"boom", timeout=5)
        workers = [log_dir / f"aserver-worker-{i}.log" for i in range(2)]
        await _wait_for(lambda: any("deliberate failure" in p.read_text() for p in workers if p.exists()))
        stderr = server.log_text()
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(f"aserver-{slug}.log" for slug in ROLES)
    for slug, role in ROLES.items():
        records = _records(log_dir / f"aserver-{slug}.log")
        assert records or slug.startswith("worker"), slug  # an idle worker may have nothing to say
        for record in records:
            assert {"time", "level", "role", "pid", "logger", "message"} <= record.keys()
            assert record["role"] == role
    supervisor = _records(log_dir / "aserver-supervisor.log")
    assert any(r["message"].startswith("aserver ready") for r in supervisor)
    failure = next(r for p in workers for r in _records(p) if "exc_info" in r)
    assert failure["level"] == "ERROR" and failure["logger"] == "aserver.worker"
    assert "RuntimeError: deliberate failure for a test" in failure["exc_info"]
    # Only the readiness line and errors go to stderr; INFO and warnings go to the files.
    assert "deliberate failure" not in stderr and "HANDLER_ERROR" not in stderr


async def test_files_rotate_by_size_and_count(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    with ServerProcess(workers=1, settings={"logging": {"dir": str(log_dir), "max_bytes": 4096, "max_files": 3}}
                       ) as server:
        async with await Client.connect(*server.address) as client:
            # Each unknown cmd_id logs a warning of ~110 bytes in the worker: ~4 rotations.
            await client.call_many([(UNKNOWN, b"", 0)] * 150, timeout=10)
        worker = log_dir / "aserver-worker-0.log"
        await _wait_for(lambda: (log_dir / "aserver-worker-0.log.2").exists())
        await asyncio.sleep(0.2)
    names = sorted(p.name for p in log_dir.iterdir() if p.name.startswith("aserver-worker-0"))
    assert names == ["aserver-worker-0.log", "aserver-worker-0.log.1", "aserver-worker-0.log.2"]
    for name in names:
        size = (log_dir / name).stat().st_size
        assert 0 < size <= 4096, (name, size)
    assert " WARNING [worker 0] aserver.worker: unknown cmd_id 999" in worker.read_text()


def test_json_formatter_one_line_with_traceback() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = JsonFormatter("worker 3").format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["role"] == "worker 3" and entry["logger"] == "x.y"
    assert entry["level"] == "ERROR" and entry["time"].endswith("+00:00")
    assert "ValueError: bad" in entry["exc_info"]
