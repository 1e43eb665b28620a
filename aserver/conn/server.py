"""The conn process's core: connections on one side, one ring pair per worker on the other."""

from __future__ import annotations

import asyncio
import logging
import socket

import msgspec

from aserver.conn.client_protocol import PAUSED_FOR_RING, ClientProtocol
from aserver.conn.routing import Router
from aserver.ipc import records
from aserver.ipc.channel import RingReceiver, RingSender
from aserver.ipc.ring import RingReader, RingWriter
from aserver.protocol import PacketCodec, split_run
from aserver.settings import Settings

log = logging.getLogger("aserver.conn")

CONN_INDEX_SHIFT = 56  # a connection id carries its conn process index in its top byte


class WorkerLink:
    """The conn side of one worker: requests out through a sender, replies in."""

    def __init__(self, server: ConnServer, index: int, writer: RingWriter, reader: RingReader) -> None:
        self.index = index
        self._server = server
        self.sender = RingSender(writer, server.loop, self._on_room)
        self.receiver = RingReceiver(reader, server.loop, server.on_replies)
        # Connections paused because this link's ring was full.
        self.blocked: set[ClientProtocol] = set()

    def send(
        self, kind: int, conn_id: int, payload: bytes | bytearray | memoryview, source: ClientProtocol | None
    ) -> None:
        if len(payload) > self.sender.max_payload:
            for piece in split_run(payload, self.sender.max_payload, self._server.codec):
                self.send(kind, conn_id, piece, source)
            return
        if isinstance(payload, memoryview) and not self.sender.backlogged:
            ok = self.sender.send(kind, conn_id, payload)
        else:
            # May wait in the overflow queue: hold an immutable copy.
            ok = self.sender.send(kind, conn_id, bytes(payload) if isinstance(payload, memoryview) else payload)
        if not ok and source is not None and not source.closed:
            log.debug("ring to worker %d full: pausing connection %x", self.index, source.conn_id)
            source.pause(PAUSED_FOR_RING)
            self.blocked.add(source)

    def _on_room(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for conn in blocked:
            conn.resume(PAUSED_FOR_RING)


class ConnServer:
    def __init__(
        self,
        settings: Settings,
        index: int,
        incarnation: int,
        rings: list[tuple[RingWriter, RingReader]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self.index = index
        self.codec = PacketCodec(settings.byte_order)
        self.max_packet_size = settings.server.max_packet_size
        self.max_reply_backlog = settings.server.max_reply_backlog
        self.max_connections = settings.server.max_connections
        self.router = Router(settings.workers.routing, len(rings), self.codec)
        self.links = [WorkerLink(self, i, writer, reader) for i, (writer, reader) in enumerate(rings)]
        self.connections: dict[int, ClientProtocol] = {}
        # Ids are never reused: conn index in the top byte, then the incarnation, then a
        # counter, so a late reply can never reach a newer connection on a reused fd.
        self._next_id = (index << CONN_INDEX_SHIFT) | ((incarnation & 0xFFFF) << 40)
        self._flush_pending: list[ClientProtocol] = []
        self._flush_scheduled = False
        self._server: asyncio.base_events.Server | None = None
        self.stats = {"accepted": 0, "refused_max_connections": 0, "protocol_errors": 0,
                      "replies_to_closed": 0, "slow_readers": 0}

    async def start(self, sock: socket.socket) -> None:
        for link in self.links:
            link.receiver.start()
        self._server = await self.loop.create_server(lambda: ClientProtocol(self), sock=sock)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, close every client (flushing what is queued), stop the rings."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections.values()):
            conn.abort()
        await asyncio.sleep(0)
        for link in self.links:
            link.receiver.close()
            link.sender.close()

    def next_conn_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # Connection events ---------------------------------------------------------------

    def admit(self, peer: tuple) -> bool:
        if len(self.connections) >= self.max_connections:
            self.stats["refused_max_connections"] += 1
            log.warning("refused %s:%s: server.max_connections (%d) reached", peer[0], peer[1], self.max_connections)
            return False
        return True

    def opened(self, conn: ClientProtocol) -> None:
        self.stats["accepted"] += 1
        self.connections[conn.conn_id] = conn
        conn.worker = self.router.assign()
        payload = msgspec.msgpack.encode(conn.info.peer)
        for link in self.links:
            link.send(records.OPENED, conn.conn_id, payload, None)

    def closed(self, conn: ClientProtocol) -> None:
        del self.connections[conn.conn_id]
        for link in self.links:
            link.send(records.CLOSED, conn.conn_id, b"", None)

    def forward(self, conn: ClientProtocol, run: bytes | bytearray | memoryview) -> None:
        if self.router.pinned:
            self.links[conn.worker].send(records.PACKETS, conn.conn_id, run, conn)
            return
        try:
            pieces = self.router.split(run, conn.info)
        except Exception:
            log.exception("routing hook failed; closing connection %x", conn.conn_id)
            conn.abort()
            return
        for worker, piece in pieces:
            self.links[worker].send(records.PACKETS, conn.conn_id, piece, conn)

    def protocol_error(self, conn: ClientProtocol, reason: str) -> None:
        self.stats["protocol_errors"] += 1
        peer = conn.info.peer
        log.warning("closing %s:%s (connection %x): protocol error: %s", peer[0], peer[1], conn.conn_id, reason)
        conn.abort()

    def slow_reader(self, conn: ClientProtocol, backlog: int) -> None:
        self.stats["slow_readers"] += 1
        peer = conn.info.peer
        log.warning(
            "closing %s:%s (connection %x): %d bytes of replies unread, above server.max_reply_backlog",
            peer[0], peer[1], conn.conn_id, backlog,
        )
        conn.abort()

    # Replies from workers --------------------------------------------------------------

    def on_replies(self, batch: list[tuple[int, int, bytes]]) -> None:
        connections = self.connections
        pending = self._flush_pending
        for kind, conn_id, payload in batch:
            conn = connections.get(conn_id)
            if conn is None:
                self.stats["replies_to_closed"] += 1
                continue
            if kind == records.PACKETS:
                if conn.queue_reply(payload):
                    pending.append(conn)
            elif kind == records.CLOSE:
                if conn._replies:
                    conn.flush_replies()
                conn.close()
        if pending and not self._flush_scheduled:
            # Flush after every ring had its turn this iteration: one write per connection.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._flush_pending = self._flush_pending, []
        for conn in pending:
            conn.flush_replies()
