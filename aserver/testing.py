"""Run a real aserver (supervisor, conn process, workers) for tests.

    with ServerProcess(handlers=["myservice.handlers"], workers=2) as server:
        client = await Client.connect(*server.address)

The server listens on a free port chosen by the OS; `address` is what it bound.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

READY = re.compile(r"aserver ready: listening on (\S+):(\d+)")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def settings_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


class ServerProcess:
    """`python -m aserver` in a subprocess, its log captured in `log_lines`."""

    def __init__(
        self,
        handlers: list[str] | None = None,
        workers: int = 1,
        settings: dict[str, dict[str, Any]] | None = None,
        pythonpath: list[str] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        sections: dict[str, dict[str, Any]] = {"server": {"log_level": "INFO"}, "workers": {}}
        for section, values in (settings or {}).items():
            sections.setdefault(section, {}).update(values)
        sections["server"].setdefault("bind", "127.0.0.1:0")
        self._dir = tempfile.TemporaryDirectory(prefix="aserver-test-")
        sections.setdefault("supervisor", {}).setdefault("pid_file", str(Path(self._dir.name) / "aserver.pid"))
        sections["workers"].setdefault("count", workers)
        sections["workers"].setdefault("handlers", handlers or ["handlers.echo"])
        self.settings_text = settings_toml(sections)
        self._pythonpath = pythonpath or []
        self._env = env or {}
        self._start_timeout = start_timeout
        self.settings_path = Path(self._dir.name) / "settings.toml"
        self.process: subprocess.Popen[str] | None = None
        self.log_lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.address: tuple[str, int] = ("", 0)

    def start(self) -> ServerProcess:
        self.settings_path.write_text(self.settings_text)
        env = dict(os.environ, **self._env)
        paths = [*self._pythonpath, os.getcwd(), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aserver", "--settings", str(self.settings_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("aserver did not start:\n" + self.log_text())
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                self.address = (match.group(1), int(match.group(2)))
                self._ready.set()

    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches the regex `pattern`; return that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matched {pattern!r} within {timeout}s:\n{self.log_text()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[int]:
        """Pids of the supervisor's direct children (conn, workers, helpers)."""
        kids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces: the ppid follows the closing paren.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.pid:
                kids.append(int(entry.name))
        return kids

    def child_pids(self, role: str) -> dict[int, int]:
        """{index: pid} of the children with this role ("conn" or "worker"), found by
        their process titles."""
        found = {}
        for pid in self.children():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            match = re.search(rf"\]: {role} (\d+)$", title)
            if match:
                found[int(match.group(1))] = pid
        return found

    def wait_for_children(self, role: str, count: int, exclude: set[int] = frozenset(), timeout: float = 10.0):
        """Wait until `count` children of `role` run, none of them in `exclude`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.child_pids(role)
            if len(pids) == count and not set(pids.values()) & exclude:
                return pids
            time.sleep(0.02)
        raise AssertionError(f"expected {count} {role} processes, have {self.child_pids(role)}:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        self._dir.cleanup()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
