"""Starting, refusing to start, and stopping without leftovers."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aserver.client import Client
from aserver.testing import ServerProcess

TESTS_DIR = str(Path(__file__).parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped; the supervisor reaps.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _segments(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"aserver-{pid}-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stop_leaves_no_process_and_no_segment(sig: int) -> None:
    server = ServerProcess(workers=2).start()
    children = server.children()
    assert len(children) >= 3  # conn, two workers (and aiomultiprocess's manager)
    assert len(_segments(server.pid)) == 4  # request + reply ring per worker
    async with await Client.connect(*server.address) as client:
        assert (await client.call(1, b"x", timeout=5)).body == b"x"
    code = server.stop(sig)
    assert code == 0, server.log_text()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not [pid for pid in children if _alive(pid)]
    assert _segments(server.pid) == []
    assert "Traceback" not in server.log_text(), server.log_text()


def _run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.getcwd()]))
    return subprocess.run(
        [sys.executable, "-m", "aserver", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_check_accepts_the_shipped_settings() -> None:
    result = _run_cli("check", "--settings", "settings.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nbind = "nowhere"\nmax_conections = 5\n[workers]\ncount = 0\n')
    result = _run_cli("check", "--settings", str(bad))
    assert result.returncode != 0
    for expected in ("server.max_conections: unknown key", "workers.count", "server.bind"):
        assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_stops_startup_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_packet_size = 3\n')
    result = _run_cli("--settings", str(bad))
    assert result.returncode != 0
    assert "server.max_packet_size" in result.stderr and "Traceback" not in result.stderr


def test_command_line_overrides_are_validated() -> None:
    result = _run_cli("--settings", "settings.toml", "--workers", "0")
    assert result.returncode != 0 and "workers.count" in result.stderr


def test_missing_settings_file_is_named(tmp_path: Path) -> None:
    result = _run_cli("--settings", str(tmp_path / "absent.toml"))
    assert result.returncode != 0 and "absent.toml: cannot read" in result.stderr


def test_handler_module_that_does_not_import_stops_startup() -> None:
    server = ServerProcess(handlers=["no_such_module_anywhere"])
    with pytest.raises(RuntimeError, match="did not start"):
        server.start()
    log = server.log_text()
    assert "No module named 'no_such_module_anywhere'" in log
    assert server.process.returncode not in (0, None)
    assert _segments(server.pid) == []


def test_port_in_use_is_reported() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli("--settings", "settings.toml", "--bind", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
