"""A connection's per-request steps in the conn process: what each read and each reply
costs there.

`ConnCore` is the base class of `ClientProtocol`: it counts the requests a worker has
not answered yet (`sent`, `answered`) and queues and writes replies (`queue_reply`,
`flush_replies`). `route_replies` hands a batch from a worker's reply ring to its
connections; its payloads are views of the ring, so `flush_replies` writes them to the
socket itself (`fd`) and copies only what the socket does not take for the transport.

`_conn_core.c` has the same steps in C and one more: its `data_received` frames a read
and writes it into the worker's ring itself when nothing about it is unusual, and hands
everything else to `ClientProtocol.receive`, the general path that this class's
`data_received` always takes. This module is the C one's fallback and reference; the
tests run both.

The state these steps use lives in ClientProtocol's instance (set in
ClientProtocolBase.__init__); in C it is the C type's fields, with the same names.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from aserver.ipc import records

if TYPE_CHECKING:
    import asyncio


# Up to this many replies go out in one system call.
IOV_BATCH = 64


class InFlight(msgspec.Struct, gc=False):
    """A run of requests sent to a worker and not all answered yet. A Struct: one is made
    per ring record, and that is cheaper than a Python __init__. Not GC-tracked (it
    holds only ints and a buffer, so it can be in no cycle)."""

    record: int  # the ring record's sequence number
    remaining: int  # requests of the run the worker has not finished
    run: bytes | bytearray | memoryview


class ConnCore:
    inflight: dict[int, deque[InFlight]]
    outstanding: int
    closed: bool
    eof_sent: bool
    close_when_answered: bool
    transport: asyncio.Transport | None
    fd: int
    handed_over: bool
    max_reply_backlog: int
    _replies: list[bytes | memoryview]

    def data_received(self, data: bytes) -> None:
        self.receive(data)  # type: ignore[attr-defined]

    def sent(self, worker: int, record: int, count: int, run: bytes | bytearray | memoryview) -> None:
        """`count` requests in `run` went to `worker` as ring record number `record`."""
        queue = self.inflight.get(worker)
        if queue is None:
            queue = self.inflight[worker] = deque()
        queue.append(InFlight(record, count, run))
        self.outstanding += count

    def answered(self, worker: int, count: int) -> None:
        """The worker finished `count` more of our requests (in order)."""
        queue = self.inflight.get(worker)
        self.outstanding -= count
        while count and queue:
            head = queue[0]
            if head.remaining > count:
                head.remaining -= count
                return
            count -= head.remaining
            queue.popleft()

    def queue_reply(self, packets: bytes) -> bool:
        """Buffer replies until `flush_replies`; returns True if this is the first."""
        self._replies.append(packets)
        return len(self._replies) == 1

    def flush_replies(self) -> None:
        """Write the queued replies: straight to the socket while the transport holds
        nothing (no copy, no transport bookkeeping), the rest through the transport as
        one bytes object (it keeps what it is given; a reply may be a view into a ring)."""
        replies = self._replies
        if not replies:
            return
        self._replies = []
        transport = self.transport
        # A closing transport's socket may be closed already, and its number reused.
        if self.closed or self.eof_sent or transport is None or transport.is_closing():
            return  # late replies (a stop that timed out) are dropped; the log says how many
        if self.fd >= 0 and self.handed_over:
            self.handed_over = transport.get_write_buffer_size() > 0
        sent = 0
        if self.fd >= 0 and not self.handed_over:
            sent, total = send_directly(self.fd, replies)
            if sent == total:
                return
        transport.write(memoryview(b"".join(replies))[sent:])  # a view of our own copy
        self.handed_over = True
        backlog = transport.get_write_buffer_size()
        if backlog > self.max_reply_backlog:
            self.too_much_unread(backlog)  # type: ignore[attr-defined]

    @staticmethod
    def route_replies(connections: dict[int, Any], pending: list, stats: dict[str, int], worker: int,
                      batch: list[tuple[int, int, bytes]]) -> None:
        """Queue each reply record's packets on its connection (adding connections to
        `pending` as they get their first) and count its acks."""
        for kind, conn_id, payload in batch:
            conn = connections.get(conn_id)
            if conn is None:
                if payload:
                    stats["replies_to_closed"] += 1
                continue
            answered = kind >> records.ACK_SHIFT
            kind &= records.KIND_MASK
            if kind == records.PACKETS:
                if payload and conn.queue_reply(payload):
                    pending.append(conn)
            elif kind == records.CLOSE:
                conn.close()
            if answered:
                conn.answered(worker, answered)
                if conn.close_when_answered and not conn.outstanding:
                    conn.close()


def send_directly(fd: int, replies: list[bytes | memoryview]) -> tuple[int, int]:
    """Write what the socket takes now (it is non-blocking: the event loop made it so).
    Returns the bytes written (0 on an error: the transport then meets it itself) and
    the bytes of all replies."""
    sent = total = 0
    writing = True  # until the socket stops taking everything it is given
    for first in range(0, len(replies), IOV_BATCH):
        chunk = replies[first : first + IOV_BATCH]
        wanted = sum(memoryview(reply).nbytes for reply in chunk)
        if writing:
            try:
                written = os.writev(fd, chunk)
            except OSError:
                written = 0
            writing = written == wanted
            sent += written
        total += wanted
    return sent, total
