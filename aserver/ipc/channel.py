"""Event-loop ends of a ring: a sender that never drops, a receiver that batches.

Both the conn process (requests out, replies in) and the workers (the reverse) use these,
so backpressure and wakeups work the same way in both directions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from aserver.ipc.ring import RingReader, RingWriter, SenderCore

log = logging.getLogger(__name__)

# Records are published at the end of the loop iteration that wrote them, or sooner: once
# EARLY_PUBLISH_BYTES are written while the consumer is awake (it goes on with them while
# the rest are written; without it the two processes convoy), and while it sleeps, once
# records of WAKE_WEIGHT (a record weighs 1, a conn process's run of requests their
# number) or a WAKE_SHARE of the ring are: a wakeup costs both processes, and waking the
# worker at 8 KiB, for nearly every 16 KiB request, cost a quarter of the throughput at
# 50 x 4 x 16 KiB (perf/README.md, ninth round).
EARLY_PUBLISH_BYTES = 8192
WAKE_WEIGHT = 64
WAKE_SHARE = 8
# Safety net against a lost wakeup; also retries a sender waiting for room.
POLL_INTERVAL = 0.1
# Sources still wait for room in an empty ring: when to look again (see _retry).
EMPTY_RING_RECHECK = 0.001


class RingSenderBase:
    """Writes records, publishing once per loop iteration. When the ring is full, records
    wait in order in an in-process queue (never dropped) and `send` returns False so the
    caller can stop reading from its sources; `on_room` is called once the queue empties.
    If it returns True (sources still wait), it is called again as the consumer frees
    more room (with the ring empty, after EMPTY_RING_RECHECK), until it returns
    something false.
    `send` comes from SenderCore (ring_core.SenderCore, or the C one in _ring_core.c);
    its slow path is `_wait`."""

    def __init__(
        self,
        writer: RingWriter,
        loop: asyncio.AbstractEventLoop,
        on_room: Callable[[], bool | None],
    ) -> None:
        self._writer = writer
        self._loop = loop
        self._on_room = on_room
        self._overflow: deque[tuple[int, int, bytes | bytearray | memoryview]] = deque()
        self._publish_scheduled = False
        self.early_publish_bytes = EARLY_PUBLISH_BYTES
        self.wake_bytes = writer.capacity // WAKE_SHARE
        self.wake_weight = WAKE_WEIGHT
        self._waiting = False
        self._poll: asyncio.TimerHandle | None = None
        self._retry_soon: asyncio.Handle | None = None  # the one _retry on its way, if any
        self.max_payload = writer.max_payload

    @property
    def backlogged(self) -> bool:
        return bool(self._overflow)

    @property
    def fill(self) -> int:
        return self._writer.fill()

    def records_taken(self) -> int:
        return self._writer.records_taken()

    def unread_records(self) -> list[tuple[int, int, bytes | bytearray | memoryview]]:
        """What the consumer never took, in order: records in the ring (copied), then the
        ones waiting for room. Only while no consumer is attached (it died or retired)."""
        return self._writer.unread_records() + list(self._overflow)

    def room(self) -> int:
        """Bytes free in the ring as the consumer last published (contiguous or not)."""
        return self._writer.room()

    def released(self, position: int) -> None:
        """The consumer is done up to `position` (its RELEASE record): free that room,
        and go on with what waits for it."""
        self._writer.released(position)
        if self._waiting:
            self._retry()

    def wait_for_room(self) -> None:
        """Call on_room when the consumer frees room (it returned True outside _retry)."""
        if not self._waiting:
            self._start_waiting()

    def discard_unread(self) -> None:
        """The consumer is gone: forget the overflow and mark the ring consumed. The
        caller re-sends what the next consumer must see."""
        self._overflow.clear()
        self._stop_waiting()
        self._writer.discard_unread()

    def _wait(self, kind: int, conn_id: int, payload: bytes | bytearray | memoryview | list) -> bool:
        """`send` could not write the record now: queue it behind the others."""
        # A list's parts may be a handler's buffers: queue what they hold now.
        self._overflow.append((kind, conn_id, b"".join(payload) if type(payload) is list else payload))
        if not self._waiting:
            self._start_waiting()
        return False

    def flush(self) -> None:
        """Publish now (the end of a batch, or shutdown)."""
        self._writer.publish()

    def close(self) -> None:
        """Publish what is written and unmap the ring (the last call on this sender)."""
        self._stop_waiting()
        self._writer.publish()
        self._writer.close()

    def _publish(self) -> None:
        self._publish_scheduled = False
        self._writer.publish()

    def _start_waiting(self) -> None:
        self._writer.publish()  # the reader must see what is there to make room
        self._waiting = True
        self._loop.add_reader(self._writer.space_fd, self._on_space)
        self._poll = self._loop.call_later(POLL_INTERVAL, self._on_poll)
        self._await_space()

    def _await_space(self) -> None:
        """Have _retry called when the consumer frees room: by its wakeup, at once if it
        already did, or shortly if the ring is empty (a consumer with nothing to free
        sends no wakeup; sources resumed so far get a chance to write first)."""
        if self._retry_soon is not None:
            return  # a _retry is on its way, and it waits again if it must
        if self._writer.wait_for_space():
            self._retry_soon = self._loop.call_soon(self._retry)
        elif not self._writer.fill():
            self._retry_soon = self._loop.call_later(EMPTY_RING_RECHECK, self._retry)

    def _stop_waiting(self) -> None:
        self._cancel_retry()
        if self._waiting:
            self._waiting = False
            self._loop.remove_reader(self._writer.space_fd)
            if self._poll is not None:
                self._poll.cancel()
                self._poll = None

    def _on_space(self) -> None:
        self._writer.space_woken()
        self._retry()

    def _on_poll(self) -> None:
        self._poll = None
        self._writer.space_woken()
        self._retry()
        if self._waiting:
            self._poll = self._loop.call_later(POLL_INTERVAL, self._on_poll)

    def _cancel_retry(self) -> None:
        if self._retry_soon is not None:
            self._retry_soon.cancel()
            self._retry_soon = None

    def _retry(self) -> None:
        self._cancel_retry()  # (this may be it) one at a time: see _await_space
        writer = self._writer
        overflow = self._overflow
        while overflow:
            kind, conn_id, payload = overflow[0]
            if not writer.try_write(kind, conn_id, payload):
                writer.publish()
                self._await_space()
                return
            overflow.popleft()
        writer.publish()
        if self._on_room():
            self._await_space()  # some sources still wait for room
        else:
            self._stop_waiting()


class RingSender(SenderCore, RingSenderBase):  # type: ignore[valid-type,misc]
    __doc__ = RingSenderBase.__doc__


class RingReceiver:
    """Drains records in batches of up to `batch` and hands each batch to `on_records`.

    Sleeps on the wake pipe only after telling the writer so (see ring.py). `pause` stops
    draining, leaving records in the ring, which in turn pushes back on the writer.

    With `in_place`, payloads are read-only views of the ring instead of copies, and their
    space is freed only once `on_records` returns: it must not keep them (copy what it
    keeps), and a view must not be read after that. That saves a copy of every record
    for a consumer that is done with each batch when it returns: the worker (handlers
    get bytes) and the conn process (replies go to their sockets, and only what a socket
    does not take at once is copied). Either way the batch counts as taken (ring.py's
    records_read) before `on_records` runs, so a consumer that dies in it never gets it
    replayed.

    With `release`, the space is not freed here: after each batch, `release(position)`
    says where we have read to, and the producer frees it (a worker sends that to the
    conn process as a RELEASE record, after the replies of the batch, which may refer
    to bytes of the request ring: see records.PACKETS_BY_REF).
    """

    def __init__(
        self,
        reader: RingReader,
        loop: asyncio.AbstractEventLoop,
        on_records: Callable[[list[tuple[int, int, bytes | memoryview]]], None],
        batch: int = 512,
        in_place: bool = False,
        release: Callable[[int], None] | None = None,
    ) -> None:
        if release is not None and not in_place:
            raise ValueError("release is for records read in place")
        self._reader = reader
        self._in_place = in_place
        self._release = release
        self._loop = loop
        self._on_records = on_records
        self._batch = batch
        self._paused = False
        self._drain_scheduled = False
        self._poll: asyncio.TimerHandle | None = None
        self._started = False

    @property
    def fill(self) -> int:
        return self._reader.fill()

    def start(self) -> None:
        self._started = True
        self._loop.add_reader(self._reader.wake_fd, self._on_wake)
        self._poll = self._loop.call_later(POLL_INTERVAL, self._on_poll)
        self._schedule_drain()

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._loop.remove_reader(self._reader.wake_fd)
            if self._poll is not None:
                self._poll.cancel()

    def close(self) -> None:
        """Stop and unmap the ring (the last call on this receiver)."""
        self.stop()
        self._reader.close()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule_drain()

    def skip_unread(self) -> None:
        """The producer is gone: drop what it left in the ring."""
        self._reader.skip_unread()

    def drain_now(self) -> None:
        """Drain everything available, ignoring pause (used at shutdown)."""
        while self._take_batch():
            pass

    def _on_wake(self) -> None:
        self._reader.woken()
        self._drain()

    def _on_poll(self) -> None:
        self._poll = self._loop.call_later(POLL_INTERVAL, self._on_poll)
        self._drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._scheduled_drain)

    def _scheduled_drain(self) -> None:
        self._drain_scheduled = False
        self._drain()

    def _drain(self) -> None:
        if self._paused or not self._started:
            return
        taken = self._take_batch()
        if taken and (taken == self._batch or self._paused):
            # More may be waiting: come back after other callbacks had their turn.
            if not self._paused:
                self._schedule_drain()
            return
        if not self._reader.prepare_sleep():
            self._schedule_drain()

    def _take_batch(self) -> int:
        """Read a batch and hand it to on_records; returns how many records it held."""
        reader = self._reader
        records = reader.read_batch(self._batch, self._in_place)
        if not records:
            return 0
        taken = len(records)
        if not self._in_place:
            reader.release()  # copies: free the space at once
            self._on_records(records)
            return taken
        reader.mark_taken()
        try:
            self._on_records(records)
        finally:
            del records  # the views go before their space does
            if self._release is None:
                reader.release()
            else:
                self._release(reader.position)
        return taken
