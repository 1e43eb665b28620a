"""systemd without systemd: sd_notify to a socket the test binds, socket activation
through a launcher that passes fd 3 the way systemd does."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aserver.client import Client
from aserver.supervisor import systemd
from aserver.testing import ServerProcess, settings_toml

TESTS_DIR = Path(__file__).parent


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(30)

    def next_states(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def wait_for(self, key: str) -> dict[str, str]:
        while True:
            states = self.next_states()
            if key in states:
                return states


def test_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    notify = NotifySocket(path)
    server = ServerProcess(env={"NOTIFY_SOCKET": path}).start()
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.pid)
        assert ready["STATUS"] == f"listening on {server.address[0]}:{server.address[1]}"
        server.process.send_signal(signal.SIGHUP)
        reloading = notify.next_states()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.next_states()["READY"] == "1"
        server.process.send_signal(signal.SIGTERM)
        assert notify.next_states()["STOPPING"] == "1"
    finally:
        assert server.stop() == 0, server.log_text()
        notify.sock.close()


def test_notify_abstract_socket_and_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"aserver-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=hi")
        assert receiver.recv(100) == b"READY=1\nSTATUS=hi"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_listen_fds_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd.activated_listener() is None
    assert "LISTEN_FDS" not in os.environ  # not passed on to children


async def test_socket_activation_serves_on_fd_3(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    host, port = listener.getsockname()
    settings = tmp_path / "settings.toml"
    # server.bind names the very port we hold: binding it would fail, so serving proves fd 3 was used.
    settings.write_text(settings_toml({
        "server": {"bind": f"127.0.0.1:{port}", "log_level": "INFO"},
        "supervisor": {"pid_file": str(tmp_path / "aserver.pid")},
    }))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    process = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "socket_activation_launcher.py"), str(listener.fileno()),
         sys.executable, "-m", "aserver", "--settings", str(settings)],
        pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )
    listener.close()  # only the server holds it now
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if "aserver ready" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert await asyncio.to_thread(ready.wait, 60), "".join(lines)
        assert re.search(rf"aserver ready: listening on {host}:{port} ", "".join(lines))
        assert "socket activation: using the listening socket passed as fd 3" in "".join(lines)
        async with await Client.connect(host, port) as client:
            assert (await client.call(1, b"activated", timeout=5)).body == b"activated"
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        reader.join(5)
    assert code == 0, "".join(lines)
    assert "Traceback" not in "".join(lines)
