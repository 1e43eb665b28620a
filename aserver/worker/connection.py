"""A worker's handle on one client connection."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aserver.worker.dispatcher import Dispatcher


class Connection:
    """Lets a handler reply later, send unsolicited packets, or close the client.

    `state` is free for the service's per-connection data (kept in this worker).
    """

    __slots__ = ("_disconnect_queued", "_dispatcher", "_jobs", "_scheduled", "closed", "id", "peer", "state")

    def __init__(self, conn_id: int, peer: tuple[str, int], dispatcher: Dispatcher) -> None:
        self.id = conn_id
        self.peer = peer
        self.state: dict[str, Any] = {}
        self.closed = False
        self._dispatcher = dispatcher
        self._jobs: deque = deque()
        self._scheduled = False
        self._disconnect_queued = False  # its on_disconnect job is queued (exactly once)

    def send(
        self,
        cmd_id: int,
        body: bytes | bytearray | memoryview = b"",
        *,
        seq_num: int = 0,
        status: int = 0,
        user_id: int = 0,
    ) -> bool:
        """Queue a packet to the client. Returns False if the connection is closed."""
        if self.closed:
            return False
        self._dispatcher.send_packet(self.id, seq_num, cmd_id, status, user_id, body)
        return True

    def close(self) -> None:
        """Close the client after the packets already sent to it."""
        if not self.closed:
            self._dispatcher.close_connection(self.id)

    def __repr__(self) -> str:
        return f"Connection({self.id:#x}, peer={self.peer[0]}:{self.peer[1]}, closed={self.closed})"
