"""A unix socket beside the pid file through which `python -m aserver status` asks the
running supervisor for its process table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

import msgspec


class StatusServer:
    def __init__(self, path: str, collect: Callable[[], Awaitable[dict]]) -> None:
        self.path = path
        self._collect = collect
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a killed instance; the pid file lock is ours
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readline(), 5)
            writer.write(msgspec.json.encode(await self._collect()) + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def query(path: str, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"status\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return msgspec.json.decode(data)


def format_table(status: dict) -> str:
    columns = ["role", "index", "pid", "uptime", "restarts", "connections", "requests", "in_flight"]
    rows = [[("-" if not child["alive"] and col in ("pid", "uptime") else str(child[col])) for col in columns]
            for child in status["children"]]
    header = [c.replace("_", " ") for c in columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"aserver[{status['name']}] supervisor pid {status['pid']}, up {status['uptime']}s", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
