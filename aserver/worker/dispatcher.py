"""Runs requests through handlers: per-connection order, concurrency across connections.

Each connection has a job queue (its connect hook, its requests, its disconnect hook, in
arrival order). A fixed pool of long-lived consumer tasks takes connections that have
work and runs their jobs one after another, so replies on a connection keep request order
while a slow handler holds up only its own connection. No task is created per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import msgspec

from aserver.app import App, BadRequest, Reply, Request, Status
from aserver.ipc import records
from aserver.ipc.channel import RingReceiver, RingSender
from aserver.protocol import HEADER_SIZE, PacketCodec, iter_packets
from aserver.typed import BodyFormat, typed_handler
from aserver.worker.connection import Connection

log = logging.getLogger("aserver.worker")

CONN_INDEX_SHIFT = 56

_CONNECT = object()
_DISCONNECT = object()


class Dispatcher:
    def __init__(
        self,
        app: App,
        codec: PacketCodec,
        loop: asyncio.AbstractEventLoop,
        concurrency: int,
        max_pending: int,
        body_format: BodyFormat = "msgpack",
    ) -> None:
        self.app = app
        self.handlers = {
            cmd: typed_handler(fn, *app.message_types[cmd], body_format) if cmd in app.message_types else fn
            for cmd, fn in app.handlers.items()
        }
        self.codec = codec
        self.loop = loop
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.connections: dict[int, Connection] = {}
        self.senders: list[RingSender] = []
        self.receivers: list[RingReceiver] = []
        self._ready: asyncio.Queue[Connection] = asyncio.Queue()
        self._consumers: list[asyncio.Task] = []
        self._outbox: dict[int, list] = {}
        self._flush_scheduled = False
        self._intake_paused = False
        self.pending = 0  # requests received and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats: Counter[str] = Counter()

    def attach(self, senders: list[RingSender], receivers: list[RingReceiver]) -> None:
        self.senders = senders
        self.receivers = receivers

    def start(self) -> None:
        self._consumers = [asyncio.ensure_future(self._consume()) for _ in range(self.concurrency)]
        for receiver in self.receivers:
            receiver.start()

    def stop_intake(self) -> None:
        for receiver in self.receivers:
            receiver.stop()

    async def finish(self, timeout: float) -> bool:
        """Wait until every received job ran (True), or the timeout passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            done = True
        except TimeoutError:
            done = False
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._flush()
        for sender in self.senders:
            sender.flush()
        return done

    # Intake ---------------------------------------------------------------------------

    def on_records(self, batch: list[tuple[int, int, bytes]]) -> None:
        connections = self.connections
        codec = self.codec
        ready = self._ready
        added = 0
        for kind, conn_id, payload in batch:
            conn = connections.get(conn_id)
            if kind == records.PACKETS:
                if conn is None:
                    conn = self._adopt(conn_id, ("?", 0))
                jobs = conn._jobs
                before = len(jobs)
                jobs.extend(iter_packets(payload, codec))
                added += len(jobs) - before
            elif kind == records.OPENED:
                host, port = msgspec.msgpack.decode(payload)
                conn = self._adopt(conn_id, (host, port))
                conn._jobs.append(_CONNECT)
            elif kind == records.CLOSED:
                if conn is None:
                    continue
                conn._jobs.append(_DISCONNECT)
            else:
                log.error("unknown record kind %d on request ring; ignored", kind)
                continue
            if not conn._scheduled:
                conn._scheduled = True
                ready.put_nowait(conn)
        if added:
            self.pending += added
            self.stats["requests"] += added
            self._idle.clear()
            if self.pending >= self.max_pending:
                self._pause_intake()

    def _adopt(self, conn_id: int, peer: tuple[str, int]) -> Connection:
        conn = self.connections.get(conn_id)
        if conn is None:
            conn = Connection(conn_id, peer, self)
            self.connections[conn_id] = conn
        return conn

    def _pause_intake(self) -> None:
        if not self._intake_paused:
            self._intake_paused = True
            for receiver in self.receivers:
                receiver.pause()

    def _maybe_resume_intake(self) -> None:
        if (
            self._intake_paused
            and self.pending < self.max_pending // 2 + 1
            and not any(sender.backlogged for sender in self.senders)
        ):
            self._intake_paused = False
            for receiver in self.receivers:
                receiver.resume()

    # Running jobs -----------------------------------------------------------------------

    async def _consume(self) -> None:
        ready = self._ready
        while True:
            conn = await ready.get()
            jobs = conn._jobs
            while jobs:
                job = jobs.popleft()
                if job is _CONNECT:
                    await self._run_hooks(self.app.connect_hooks, conn, "on_connect")
                elif job is _DISCONNECT:
                    conn.closed = True
                    await self._run_hooks(self.app.disconnect_hooks, conn, "on_disconnect")
                    self.connections.pop(conn.id, None)
                    self._outbox.pop(conn.id, None)
                else:
                    try:
                        await self._handle(conn, job)
                    except Exception:  # a bug of ours: never let it kill this consumer
                        log.exception("internal error on cmd_id %s from %r", job[1], conn)
                    self._answered(conn.id)
                    self.pending -= 1
                    if self._intake_paused:
                        self._maybe_resume_intake()
            conn._scheduled = False
            if not self.pending and ready.empty():
                self._idle.set()

    async def _run_hooks(self, hooks: list, conn: Connection, what: str) -> None:
        for hook in hooks:
            try:
                await hook(conn)
            except Exception:
                log.exception("%s hook %s failed for %r", what, hook.__qualname__, conn)

    async def _handle(self, conn: Connection, packet: tuple) -> None:
        seq, cmd, status, user, body = packet
        handler = self.handlers.get(cmd) or self.app.fallback_handler
        if handler is None:
            self.stats["unknown_command"] += 1
            log.warning("unknown cmd_id %d from %s:%s (seq %d); replied UNKNOWN_COMMAND",
                        cmd, conn.peer[0], conn.peer[1], seq)
            self.send_packet(conn.id, seq, cmd, Status.UNKNOWN_COMMAND, user, b"")
            return
        try:
            result = await handler(Request(seq, cmd, status, user, body, conn))
            if result is None:
                return
            if isinstance(result, Reply):
                body, status = result.body, result.status
            elif isinstance(result, (bytes, bytearray, memoryview)):
                body, status = result, 0
            else:
                raise TypeError(
                    f"handler returned {type(result).__name__}; expected bytes, Reply or None"
                )
            if not conn.closed:
                self.send_packet(conn.id, seq, cmd, status, user, body)
        except BadRequest as exc:
            self.stats["bad_requests"] += 1
            log.warning("bad request cmd_id %d seq %d from %s:%s: %s; replied BAD_REQUEST",
                        cmd, seq, conn.peer[0], conn.peer[1], exc)
            if not conn.closed:
                self.send_packet(conn.id, seq, cmd, Status.BAD_REQUEST, user, b"")
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("handler %s failed on cmd_id %d seq %d from %s:%s; replied HANDLER_ERROR",
                          handler.__qualname__, cmd, seq, conn.peer[0], conn.peer[1])
            if not conn.closed:
                self.send_packet(conn.id, seq, cmd, Status.HANDLER_ERROR, user, b"")

    # Replies --------------------------------------------------------------------------

    def send_packet(self, conn_id: int, seq: int, cmd: int, status: int, user: int,
                    body: bytes | bytearray | memoryview) -> None:
        size = HEADER_SIZE + len(body)
        sender = self.senders[conn_id >> CONN_INDEX_SHIFT]
        if size > sender.max_payload:
            raise ValueError(f"reply of {size} bytes is larger than a ring record ({sender.max_payload})")
        header = self.codec.header.pack(size, seq, cmd, status, user)
        box = self._outbox.get(conn_id)
        if box is None:
            box = self._new_box(conn_id)
        box[0] += size
        box.append(header)
        box.append(body)

    def _answered(self, conn_id: int) -> None:
        """Count a finished request; the count rides on the connection's next record."""
        box = self._outbox.get(conn_id)
        if box is None:
            box = self._new_box(conn_id)
        box[1] += 1

    def _new_box(self, conn_id: int) -> list:
        """[payload size, finished requests, header, body, header, body, ...]"""
        box = self._outbox[conn_id] = [0, 0]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return box

    def close_connection(self, conn_id: int) -> None:
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.closed = True
        self._flush_one(conn_id)
        self._send(conn_id, records.CLOSE, ())

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        for conn_id, box in outbox.items():
            self._write_box(conn_id, box)

    def _flush_one(self, conn_id: int) -> None:
        box = self._outbox.pop(conn_id, None)
        if box is not None:
            self._write_box(conn_id, box)

    def _write_box(self, conn_id: int, box: list) -> None:
        """One ring record per connection per loop iteration, split only when too big.
        The finished-request count goes on the last record, after the replies."""
        sender = self.senders[conn_id >> CONN_INDEX_SHIFT]
        answered = box[1] << records.ACK_SHIFT
        if box[0] <= sender.max_payload:
            self._send(conn_id, records.PACKETS | answered, box[2:])
            return
        limit = sender.max_payload
        chunks: list = []
        size = 0
        for i in range(2, len(box), 2):
            header, body = box[i], box[i + 1]
            packet_size = len(header) + len(body)
            if size + packet_size > limit:
                self._send(conn_id, records.PACKETS, chunks)
                chunks, size = [], 0
            chunks += (header, body)
            size += packet_size
        self._send(conn_id, records.PACKETS | answered, chunks)

    def _send(self, conn_id: int, kind: int, chunks) -> None:
        if not self.senders[conn_id >> CONN_INDEX_SHIFT].send(kind, conn_id, *chunks):
            self._pause_intake()

    # A conn process was replaced ------------------------------------------------------

    def conn_gone(self, index: int) -> int:
        """Conn process `index` died: its clients are gone. Run on_disconnect for each,
        drop what it left in our ring and the replies we had for it."""
        gone = [conn for conn_id, conn in self.connections.items() if conn_id >> CONN_INDEX_SHIFT == index]
        for conn in gone:
            self._outbox.pop(conn.id, None)
            if not conn.closed:
                conn.closed = True
                conn._jobs.append(_DISCONNECT)
                if not conn._scheduled:
                    conn._scheduled = True
                    self._ready.put_nowait(conn)
        self.receivers[index].skip_unread()
        self.senders[index].discard_unread()
        self._maybe_resume_intake()
        return len(gone)

    def snapshot(self) -> dict:
        return {"connections": len(self.connections), "in_flight": self.pending, **self.stats}

    def on_room(self) -> None:
        self._maybe_resume_intake()
