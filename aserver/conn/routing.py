"""Choosing the worker for each packet.

"connection" (default) pins a connection to one worker, so its replies keep request
order. "user_id" routes each packet by its user_id. A "module:function" hook gets
(header, connection info, worker count) and returns a worker index.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from aserver.protocol import Header, PacketCodec


class ConnectionInfo(NamedTuple):
    id: int
    peer: tuple[str, int]


RoutingHook = Callable[[Header, ConnectionInfo, int], int]


class Router:
    """`pinned` is True when whole runs go to the connection's own worker, so the conn
    process need not look inside packets."""

    def __init__(self, mode: str, worker_count: int, codec: PacketCodec) -> None:
        self.worker_count = worker_count
        self._codec = codec
        self._next = 0
        self.pinned = mode == "connection"
        self._hook: RoutingHook | None = None
        if mode == "user_id":
            self._hook = _by_user_id
        elif not self.pinned:
            self._hook = load_hook(mode)

    def assign(self) -> int:
        """Worker for a new connection (round robin)."""
        index = self._next
        self._next = (index + 1) % self.worker_count
        return index

    def split(
        self, run: bytes | bytearray | memoryview, info: ConnectionInfo
    ) -> list[tuple[int, memoryview, int]]:
        """Cut a run into consecutive pieces, each for one worker, keeping packet order:
        (worker, piece, packets in it)."""
        assert self._hook is not None
        unpack = self._codec.header.unpack_from
        view = memoryview(run)
        workers = self.worker_count
        pieces: list[tuple[int, memoryview, int]] = []
        start = pos = packets = 0
        current = -1
        size = len(run)
        while pos < size:
            header = Header._make(unpack(run, pos))
            target = self._hook(header, info, workers)
            if not isinstance(target, int) or not 0 <= target < workers:
                raise ValueError(f"routing hook returned {target!r}, not a worker index below {workers}")
            if target != current and pos > start:
                pieces.append((current, view[start:pos], packets))
                start, packets = pos, 0
            current = target
            pos += header.pkg_len
            packets += 1
        pieces.append((current, view[start:pos], packets))
        return pieces


def _by_user_id(header: Header, info: ConnectionInfo, count: int) -> int:
    return header.user_id % count


def load_hook(spec: str) -> RoutingHook:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    hook = getattr(module, attr, None)
    if not callable(hook):
        raise ImportError(f"routing hook {spec!r}: {module_name} has no callable {attr!r}")
    return hook
