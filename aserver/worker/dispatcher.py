"""Runs requests through handlers: per-connection order, concurrency across connections.

Sync (`def`) handlers run inline, as their ring record is read, when their connection
has nothing queued or running: no task switch, the replies go out at the end of the
batch. Everything else goes to the connection's job queue (its connect hook, its
requests, its disconnect hook, in arrival order). A fixed pool of long-lived consumer
tasks takes connections that have work and runs their jobs one after another, so replies
on a connection keep request order while a slow handler holds up only its own
connection. No task is created per request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Callable
from time import perf_counter
from typing import Any

import msgspec

from aserver.app import App, BadRequest, Request, Status, callable_name, reply_parts
from aserver.ipc import records
from aserver.ipc.channel import RingReceiver, RingSender
from aserver.ipc.records import CONN_INDEX_SHIFT
from aserver.metrics import WorkerMetrics
from aserver.native import native
from aserver.protocol import HEADER_SIZE, ByteOrder, PacketCodec
from aserver.typed import BodyFormat, typed_handler
from aserver.worker.connection import Connection
from aserver.worker.ready_queue import ReadyQueue

log = logging.getLogger("aserver.worker")

# The inline loop in C when it was built (see _inline.c; its Python twin is _run_inline):
# on_records calls it directly, _run_after_unusual after each request it hands back.
_c_inline = native("aserver.worker._inline")


# zero_copy body views held until their replies are copied out: past this many in a batch
# the replies go out early. With 800 views alive per batch (50 x 16) the garbage collector
# ran every batch (its first threshold is 700 objects): 11.5 % of the path in perf record.
KEPT_VIEWS_LIMIT = 256

_CONNECT = object()
_DISCONNECT = object()


def release_views(views: list[memoryview]) -> int:
    """Release each view and empty the list; returns how many had a buffer exported
    (those stay as they are). The twin of the C InlineRunner.release_kept."""
    held = 0
    for view in views:
        try:
            view.release()
        except BufferError:
            held += 1
    views.clear()
    return held


class Dispatcher:
    def __init__(
        self,
        app: App,
        codec: PacketCodec,
        loop: asyncio.AbstractEventLoop,
        concurrency: int,
        max_pending: int,
        body_format: BodyFormat = "msgpack",
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.app = app
        self.handlers = {
            cmd: typed_handler(fn, *app.message_types[cmd], body_format) if cmd in app.message_types else fn
            for cmd, fn in app.handlers.items()
        }
        # cmd -> the handler if it may run inline (sync), None if it is async. The consumers
        # use it too: a result is awaited when the handler is async, never because of
        # what the result is.
        self.inline_handlers = {
            cmd: None if inspect.iscoroutinefunction(fn) else fn for cmd, fn in self.handlers.items()
        }
        fallback = app.fallback_handler
        self.inline_fallback = None if fallback is None or inspect.iscoroutinefunction(fallback) else fallback
        # cmd_ids whose handlers take memoryview bodies (App.handler's zero_copy); None
        # stands for the fallback. Views of the ring a handler kept are released after
        # the batch's replies are copied out (_release_kept_views).
        self.zero_copy = frozenset(app.zero_copy) | ({None} if app.fallback_zero_copy else set())
        self._kept_views: list[memoryview] = []
        self.codec = codec
        self._pack = codec.header.pack
        self.loop = loop
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.connections: dict[int, Connection] = {}
        self.senders: list[RingSender] = []
        self.receivers: list[RingReceiver] = []
        self._ready: ReadyQueue[Connection] = ReadyQueue(loop)
        self._consumers: list[asyncio.Task] = []
        self._outbox: dict[int, list] = {}
        self._flush_scheduled = False
        self._intake_paused = False
        self.pending = 0  # requests received and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats: Counter[str] = Counter()
        self.max_reply = 0  # largest reply packet a ring record holds (set by attach)
        # Latency and replies by cmd_id for the Prometheus endpoint; None when metrics are
        # off, and then the request path reads no clock.
        self.metrics = metrics
        self._fast_inline: Any = None  # the C InlineRunner, set by attach when it was built

    def attach(self, senders: list[RingSender], receivers: list[RingReceiver]) -> None:
        self.senders = senders
        self.receivers = receivers
        self.max_reply = min(sender.max_payload for sender in senders)
        if _c_inline is not None:
            self._fast_inline = _c_inline.InlineRunner(
                handlers=self.inline_handlers, fallback=self.inline_fallback, outbox=self._outbox,
                new_box=self._new_box, request_type=Request, cancelled=asyncio.CancelledError,
                big_endian=self.codec.byte_order is ByteOrder.NETWORK, max_body=self.max_reply - HEADER_SIZE,
                metrics=self.metrics, zero_copy=frozenset(self.zero_copy - {None}),
                fallback_zero_copy=None in self.zero_copy, kept=self._kept_views,
            )

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
        # Replies (and their acks) still queued for a full ring are the answers to
        # requests that ran: wait for room rather than let them count as lost.
        deadline = self.loop.time() + timeout
        while any(sender.backlogged for sender in self.senders) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for sender in self.senders:
            sender.flush()
        return done and not any(sender.backlogged for sender in self.senders)

    # Intake ---------------------------------------------------------------------------

    def on_records(self, batch: list[tuple[int, int, bytes | memoryview]]) -> None:
        taken = [0, 0]  # requests run inline, requests queued: current even if a record fails
        # The boxes this batch fills are written at its end (below), so _new_box need not
        # schedule a _flush for them (a callback and an empty pass over the senders).
        flush_scheduled, self._flush_scheduled = self._flush_scheduled, True
        try:
            self._take_records(batch, taken)
        finally:
            # The end of the batch: the inline replies go into the reply rings now, and
            # must, even after an exception: they may be views of the request ring, which
            # its receiver releases next (release_requests publishes them all).
            try:
                if self._outbox:
                    self._write_boxes()
            finally:
                self._flush_scheduled = flush_scheduled
                if self._kept_views:
                    self._release_kept_views()
                self._count_taken(*taken)

    def release_requests(self, index: int, position: int) -> None:
        """The batch from conn process `index`'s request ring is done with, up to
        `position`: tell its conn process, after the batch's replies (which may refer to
        those requests' bytes), and publish."""
        if not self.senders[index].send(records.RELEASE, position, b""):
            self._pause_intake()
        for sender in self.senders:
            sender.flush()

    def _count_taken(self, ran: int, queued: int) -> None:
        if ran or queued:
            self.stats["requests"] += ran + queued
        if queued:
            self.pending += queued
            self._idle.clear()
            if self.pending >= self.max_pending:
                self._pause_intake()

    def _take_records(self, batch: list[tuple[int, int, bytes | memoryview]], taken: list[int]) -> None:
        """Run what may run inline and queue the rest, counting both in `taken`."""
        connections = self.connections
        unpack = self.codec.header.unpack_from
        ready = self._ready
        fast = self._fast_inline
        zero_copy = self.zero_copy
        handlers = self.handlers
        kept = self._kept_views
        for kind, conn_id, payload in batch:
            conn = connections.get(conn_id)
            if kind == records.PACKETS:
                if conn is None:
                    conn = self._adopt(conn_id, ("?", 0))
                pos = 0
                if not (conn._scheduled or conn._jobs):
                    if fast is not None:  # the C loop, called here: a Python call less per record
                        pos, count, unusual = fast.run(conn, payload, 0)
                        if unusual is not None:
                            pos, count = self._run_after_unusual(conn, payload, pos, count, unusual)
                    else:
                        pos, count = self._run_inline(conn, payload)
                    taken[0] += count
                    if len(kept) >= KEPT_VIEWS_LIMIT:
                        self._write_and_publish()
                        self._release_kept_views()
                size = len(payload)
                if pos == size:
                    continue
                # Requests become plain tuples: cheaper than an object per packet. The
                # body is copied out (bytes() of a bytes slice is that slice): the payload
                # may be a view of the ring, valid only until this batch returns.
                append = conn._jobs.append
                while pos < size:
                    length, seq, cmd, status, user = unpack(payload, pos)
                    body = bytes(payload[pos + HEADER_SIZE : pos + length])
                    if zero_copy and (cmd if cmd in handlers else None) in zero_copy:
                        body = memoryview(body)
                    append((seq, cmd, status, user, body))
                    pos += length
                    taken[1] += 1
            elif kind == records.OPENED:
                host, port = msgspec.msgpack.decode(payload)
                conn = self._adopt(conn_id, (host, port))
                conn._jobs.append(_CONNECT)
            elif kind == records.CLOSED:
                if conn is None or conn._disconnect_queued:
                    continue
                conn._disconnect_queued = True
                conn._jobs.append(_DISCONNECT)
            else:
                log.error("unknown record kind %d on request ring; ignored", kind)
                continue
            if not conn._scheduled:
                conn._scheduled = True
                ready.put_nowait(conn)

    def _run_after_unusual(self, conn: Connection, payload: bytes | memoryview, pos: int, count: int,
                           unusual: tuple) -> tuple[int, int]:
        """The C loop stopped at a request it hands back (see _inline.c): answer it in
        Python and go on. Returns where the record's inline run ended and how many ran."""
        fast = self._fast_inline
        while unusual is not None:
            self._answer_unusual(conn, *unusual)
            pos, ran, unusual = fast.run(conn, payload, pos)
            count += 1 + ran
        return pos, count

    def _run_inline(self, conn: Connection, payload: bytes | memoryview) -> tuple[int, int]:
        """Run the record's requests with sync handlers, in order, until one needs a
        consumer task (async handler, or none at all). Returns where that one starts and
        how many ran. (The Python loop; the C one does the same, see on_records.)"""
        if type(payload) is not bytes:
            payload = bytes(payload)  # a view of the ring: handlers get bytes bodies
        unpack = self.codec.header.unpack_from
        inline = self.inline_handlers
        fallback = self.inline_fallback
        zero_copy = self.zero_copy
        kept = self._kept_views
        whole = memoryview(payload) if zero_copy else None  # zero_copy bodies: released as the C loop's
        metrics = self.metrics
        answer = self._answer
        pos = 0
        size = len(payload)
        count = 0
        started = perf_counter() if metrics is not None else 0.0
        while pos < size:
            length, seq, cmd, status, user = unpack(payload, pos)
            handler = inline.get(cmd, fallback)
            if handler is None:
                break
            error = None
            if zero_copy and (cmd if cmd in inline else None) in zero_copy:
                body = whole[pos + HEADER_SIZE : pos + length]
                kept.append(body)
            else:
                body = payload[pos + HEADER_SIZE : pos + length]
            try:
                result = handler(Request(seq, cmd, status, user, body, conn))
            except (Exception, asyncio.CancelledError) as exc:  # nothing of ours to cancel here
                result, error = None, exc
            if metrics is not None:
                now = perf_counter()
                metrics.observe(cmd, now - started)
                started = now
            if error is None and (type(result) is bytes or result is None):
                answer(conn, seq, cmd, user, result)
            else:  # what the C loop hands back, answered the same way
                self._answer_unusual(conn, seq, cmd, user, handler, result, error)
            pos += length
            count += 1
        return pos, count

    def _release_kept_views(self) -> None:
        """Release the zero_copy bodies a handler still held after it returned, now that
        the replies (which may be those views) are copied out: a later use raises
        rather than reads ring space that is being reused."""
        fast = self._fast_inline
        held = fast.release_kept() if fast is not None else release_views(self._kept_views)
        if held:  # something holds a buffer of them (numpy, say): they cannot be released
            self.stats["zero_copy_views_held"] += held
            log.warning("a zero_copy handler kept a buffer of request.body after it returned (%d); "
                        "it now reads reused ring memory: copy with bytes() what must be kept", held)

    def _answer_unusual(self, conn: Connection, seq: int, cmd: int, user: int, handler: Callable,
                        result: object, exc: BaseException | None) -> None:
        """A request that failed or whose result is not plain bytes/None (from either inline
        loop; the C one also hands back bytes too big or for a closed connection)."""
        if exc is None and type(result) is not bytes and result is not None:
            try:
                result = reply_parts(result)
            except (Exception, asyncio.CancelledError) as error:
                exc = error
        if exc is not None:
            result = self._failed(conn, seq, cmd, handler, exc)
        self._answer(conn, seq, cmd, user, result)

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
        """The request path, kept flat: no coroutine or object besides the handler's own
        per request; the unusual cases are in the methods it calls."""
        ready = self._ready
        handlers = self.handlers
        fallback = self.app.fallback_handler
        metrics = self.metrics
        answer = self._answer
        inline = self.inline_handlers
        inline_fallback = self.inline_fallback
        while True:
            conn = await ready.get()
            jobs = conn._jobs
            # One clock read per request: each request's time runs from the end of the
            # previous one (the bookkeeping between them is included, and tiny).
            started = perf_counter() if metrics is not None else 0.0
            while jobs:
                job = jobs.popleft()
                if type(job) is not tuple:
                    await self._connection_event(conn, job)
                    started = perf_counter() if metrics is not None else 0.0
                    continue
                seq, cmd, status, user, body = job
                handler = handlers.get(cmd) or fallback
                if handler is None:
                    result = self._unknown_command(conn, seq, cmd)
                else:
                    try:
                        result = handler(Request(seq, cmd, status, user, body, conn))
                        if inline.get(cmd, inline_fallback) is None:  # an async handler
                            result = await result
                        if type(result) is not bytes and result is not None:
                            result = reply_parts(result)
                    except Exception as exc:
                        result = self._failed(conn, seq, cmd, handler, exc)
                    except asyncio.CancelledError as exc:
                        # A future the handler awaited was cancelled by someone else: that
                        # is the handler's failure. Only our own cancellation stops us.
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            raise
                        result = self._failed(conn, seq, cmd, handler, exc)
                if metrics is not None:
                    now = perf_counter()
                    metrics.observe(cmd, now - started)
                    started = now
                answer(conn, seq, cmd, user, result)
                self.pending -= 1
                if self._intake_paused:
                    self._maybe_resume_intake()
            conn._scheduled = False
            if not self.pending and ready.empty():
                self._idle.set()

    def _answer(self, conn: Connection, seq: int, cmd: int, user: int, result: bytes | tuple | None) -> None:
        """Queue the reply (if any) and count the request as finished: acked with the
        connection's next ring record."""
        conn_id = conn.id
        box = self._outbox.get(conn_id)
        if box is None:
            box = self._new_box(conn_id)
        if result is not None and not conn.closed:
            if type(result) is bytes:
                status = 0
            else:
                result, status = result
            size = HEADER_SIZE + len(result)
            if size > self.max_reply:
                result, status = self._too_big(conn, seq, cmd, size)
                size = HEADER_SIZE
            box.append(self._pack(size, seq, cmd, status, user))
            box.append(result)
            box[0] += size
            if self.metrics is not None:
                self.metrics.reply(cmd, status)
        box[1] += 1

    async def _connection_event(self, conn: Connection, job: object) -> None:
        if job is _CONNECT:
            await self._run_hooks(self.app.connect_hooks, conn, "on_connect")
        else:
            conn.closed = True
            await self._run_hooks(self.app.disconnect_hooks, conn, "on_disconnect")
            self.connections.pop(conn.id, None)
            self._outbox.pop(conn.id, None)

    async def _run_hooks(self, hooks: list, conn: Connection, what: str) -> None:
        for hook in hooks:
            try:
                await hook(conn)
            except Exception:
                log.exception("%s hook %s failed for %r", what, callable_name(hook), conn)

    def _unknown_command(self, conn: Connection, seq: int, cmd: int) -> tuple[bytes, int]:
        self.stats["unknown_command"] += 1
        log.warning("unknown cmd_id %d from %s:%s (seq %d); replied UNKNOWN_COMMAND",
                    cmd, conn.peer[0], conn.peer[1], seq)
        return b"", Status.UNKNOWN_COMMAND

    def _failed(self, conn: Connection, seq: int, cmd: int, handler, exc: BaseException) -> tuple[bytes, int]:
        if isinstance(exc, BadRequest):
            self.stats["bad_requests"] += 1
            log.warning("bad request cmd_id %d seq %d from %s:%s: %s; replied BAD_REQUEST",
                        cmd, seq, conn.peer[0], conn.peer[1], exc)
            return b"", Status.BAD_REQUEST
        self.stats["handler_errors"] += 1
        log.error("handler %s failed on cmd_id %d seq %d from %s:%s; replied HANDLER_ERROR",
                  callable_name(handler), cmd, seq, conn.peer[0], conn.peer[1], exc_info=exc)
        return b"", Status.HANDLER_ERROR

    def _too_big(self, conn: Connection, seq: int, cmd: int, size: int) -> tuple[bytes, int]:
        self.stats["handler_errors"] += 1
        log.error("reply to cmd_id %d seq %d from %s:%s is %d bytes, more than a ring record holds (%d); "
                  "replied HANDLER_ERROR", cmd, seq, conn.peer[0], conn.peer[1], size, self.max_reply)
        return b"", Status.HANDLER_ERROR

    # Replies --------------------------------------------------------------------------

    def send_packet(self, conn_id: int, seq: int, cmd: int, status: int, user: int,
                    body: bytes | bytearray | memoryview) -> None:
        size = HEADER_SIZE + len(body)
        sender = self.senders[conn_id >> CONN_INDEX_SHIFT]
        if size > sender.max_payload:
            raise ValueError(f"reply of {size} bytes is larger than a ring record ({sender.max_payload})")
        header = self.codec.header.pack(size, seq, cmd, status, user)
        if self.metrics is not None:
            self.metrics.reply(cmd, status)
        box = self._outbox.get(conn_id)
        if box is None:
            box = self._new_box(conn_id)
        box[0] += size
        box.append(header)
        box.append(body)

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
        self._send(conn_id, records.CLOSE, b"")

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_and_publish()

    def _write_and_publish(self) -> None:
        self._write_boxes()
        # This already is the end of a batch: publish now rather than one loop
        # iteration later.
        for sender in self.senders:
            sender.flush()

    def _write_boxes(self) -> None:
        # The same dict stays in place: the consumers hold a reference to it.
        boxes = list(self._outbox.items())
        self._outbox.clear()
        for conn_id, box in boxes:
            self._write_box(conn_id, box)

    def _flush_one(self, conn_id: int) -> None:
        box = self._outbox.pop(conn_id, None)
        if box is not None:
            self._write_box(conn_id, box)

    def _write_box(self, conn_id: int, box: list) -> None:
        """One ring record per connection per loop iteration, split only when too big.
        The finished-request count goes on the last record, after the replies."""
        sender = self.senders[conn_id >> CONN_INDEX_SHIFT]
        # The ack count rides on the last record, after the replies it covers; past what
        # one record's field holds, the rest follow in records of their own.
        acks = box[1]
        extra = 0
        if acks > records.MAX_ACKS:
            acks, extra = records.MAX_ACKS, acks - records.MAX_ACKS
        answered = records.PACKETS | acks << records.ACK_SHIFT
        if box[0] <= sender.max_payload:
            # One record; its parts are copied straight into the ring (no join first).
            if not sender.send(answered, conn_id, box[2:]):
                self._pause_intake()
        else:
            limit = sender.max_payload
            start = 2
            size = 0
            for i in range(2, len(box), 2):
                packet_size = len(box[i]) + len(box[i + 1])
                if size and size + packet_size > limit:
                    self._send(conn_id, records.PACKETS, b"".join(box[start:i]))
                    start, size = i, 0
                size += packet_size
            self._send(conn_id, answered, b"".join(box[start:]))
        while extra > 0:
            acks = min(extra, records.MAX_ACKS)
            self._send(conn_id, records.PACKETS | acks << records.ACK_SHIFT, b"")
            extra -= acks

    def _send(self, conn_id: int, kind: int, payload: bytes | bytearray | memoryview) -> None:
        if not self.senders[conn_id >> CONN_INDEX_SHIFT].send(kind, conn_id, payload):
            self._pause_intake()

    # A conn process was replaced ------------------------------------------------------

    def conn_gone(self, index: int) -> int:
        """Conn process `index` died: its clients are gone. Run on_disconnect for each,
        drop what it left in our ring and the replies we had for it."""
        gone = [conn for conn_id, conn in self.connections.items() if conn_id >> CONN_INDEX_SHIFT == index]
        for conn in gone:
            self._outbox.pop(conn.id, None)
            conn.closed = True
            if not conn._disconnect_queued:  # exactly one on_disconnect per connection
                conn._disconnect_queued = True
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
