"""Messages between the supervisor and a child over a socketpair, both ways.

Each message is one JSON object per line. Requests carry "cmd", answers and reports
carry "event". Small and rare (start-up, restarts, heartbeats, status), so clarity wins
over speed here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger("aserver.control")

Message = dict[str, Any]


class ControlChannel:
    def __init__(self, sock: socket.socket, on_message: Callable[[Message], None], on_closed: Callable[[], None]):
        self.sock = sock
        self._on_message = on_message
        self._on_closed = on_closed
        self._buffer = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def send(self, message: Message) -> None:
        if self.closed:
            return
        data = msgspec.json.encode(message) + b"\n"
        try:
            # Messages are tiny and the peer reads promptly; a full buffer means it hangs.
            sent = self.sock.send(data)
            if sent != len(data):
                log.warning("control channel full; message truncated: %s", message)
        except (BlockingIOError, OSError) as exc:
            log.debug("control message %s not sent: %s", message, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_closed()
            return
        self._feed(data)

    def drain(self) -> None:
        """Deliver whatever the peer sent and we have not read yet (it may have exited)."""
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = msgspec.json.decode(line)
            except msgspec.DecodeError:
                log.error("bad control message %r", line[:200])
                continue
            self._on_message(message)
