"""A connection's per-request steps in the conn process: what each read and each reply
costs there.

`ConnCore` is the base class of `ClientProtocol` (an asyncio BufferedProtocol). A read
goes straight into the worker's request ring when it can: `get_buffer` hands the event
loop room reserved in the ring of the connection's pinned worker link, and
`buffer_updated` frames what arrived there and commits its complete packets as one record,
so a request is never copied in this process. Every other read (no pinned link, a PROXY
header, the rest of a cut packet, no room in the ring) lands in the server's scratch buffer
and goes, as bytes, to `ClientProtocol.receive`, the general path; so does whatever
follows a read's last complete packet.

It also counts the requests a worker has not answered yet (`sent`, `answered`), keeping
only their packet headers (for WORKER_LOST replies if the worker dies, which
`take_inflight` hands over: the requests themselves are in the ring, and re-sent from
there if it never took them), and queues
and writes replies (`queue_reply`, `flush_replies`). `route_replies` hands a batch from
a worker's reply ring to its connections; its payloads are views of the ring, so
`flush_replies` writes them to the socket itself (`fd`) and copies only what the socket
does not take for the transport.

`_conn_core.c` has the same steps in C. This module is the C one's fallback and
reference; the tests run both.

The state these steps use lives in ClientProtocol's instance (set in
ClientProtocolBase.__init__); in C it is the C type's fields, with the same names.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

from aserver.ipc import records
from aserver.protocol import HEADER_SIZE

if TYPE_CHECKING:
    import asyncio


# Up to this many replies go out in one system call.
IOV_BATCH = 64
# The most one socket read takes (the room asked of the ring, or the scratch buffer's size).
READ_SIZE = 256 * 1024
# With less room than that left in the ring, a read of up to this much still goes straight
# in (most reads are smaller): the room asked for second.
SMALL_READ = 64 * 1024
# A packet's length field, by ConnCore.big_endian.
_LENGTH = {False: struct.Struct("<I"), True: struct.Struct(">I")}


class InFlight(NamedTuple):
    """A run of requests sent to a worker and not all answered yet, as take_inflight
    returns it."""

    record: int  # the ring record's sequence number
    remaining: int  # requests of the run the worker has not finished
    headers: bytes  # each request's packet header, back to back


class ConnCore:
    # The runs in flight, oldest first, each [worker, record, remaining, headers]: one
    # queue for all workers (a connection's runs go to one worker unless routing is per
    # packet). Made at the first run; C keeps a plain array in the object.
    _inflight: deque[list] | None = None
    outstanding: int
    closed: bool
    eof_sent: bool
    close_when_answered: bool
    transport: asyncio.Transport | None
    fd: int
    handed_over: bool
    max_reply_backlog: int
    _replies: list[bytes | memoryview]
    stage: int
    partial: bool
    progress: bool
    big_endian: bool
    max_packet_size: int
    link: Any
    conn_id: int
    worker: int
    stats: dict[str, int]
    scratch: memoryview  # the server's read buffer, for reads that do not go into a ring
    reading: memoryview | None  # the ring room the current read goes to, if it does

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the next read goes: room in the pinned worker's ring while we frame
        packets and hold no cut packet, else the scratch buffer."""
        link = self.link
        if not (self.stage or self.partial or link is None):
            sender = link.sender
            room = sender.reserve(min(sender.max_payload, READ_SIZE))
            if room is None and sender.max_payload > SMALL_READ:
                room = sender.reserve(SMALL_READ)
            if room is not None:
                self.reading = room
                return room
        self.reading = None
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` arrived where get_buffer said: commit the complete packets read into
        the ring as one record; anything else goes to receive() as bytes."""
        room = self.reading
        if room is None:
            self.receive(bytes(self.scratch[:nbytes]))  # type: ignore[attr-defined]
            return
        self.reading = None
        end = count = 0
        unpack_length = _LENGTH[self.big_endian].unpack_from
        while nbytes - end >= 4:
            (length,) = unpack_length(room, end)
            if length < HEADER_SIZE or length > self.max_packet_size or nbytes - end < length:
                break  # cut short or a bad length: receive() keeps the start or says why
            end += length
            count += 1
        if count:
            sender = self.link.sender
            self.progress = True
            self.sent(self.worker, sender.records_sent, count, room[:end])
            try:
                sender.commit(records.PACKETS, self.conn_id, end, count)
            except BaseException:
                self._unsend_last()  # no record: nothing in flight either
                raise
            self.stats["requests"] += count
        if end < nbytes:
            self.receive(bytes(room[end:nbytes]))  # type: ignore[attr-defined]

    def sent(self, worker: int, record: int, count: int, run: bytes | bytearray | memoryview) -> None:
        """`count` requests in `run` went to `worker` as ring record number `record`."""
        headers = packet_headers(run, count, self.big_endian)
        if self._inflight is None:
            self._inflight = deque()
        self._inflight.append([worker, record, count, headers])
        self.outstanding += count

    def answered(self, worker: int, count: int) -> None:
        """`worker` finished `count` more of our requests: its oldest (a worker finishes
        a connection's requests in order)."""
        self.outstanding -= count
        queue = self._inflight
        if not queue:
            return
        for run in queue:
            if not count:
                break
            if run[0] == worker:
                done = min(run[2], count)
                run[2] -= done
                count -= done
        # Answered runs leave from the front (one behind another worker's stays until that one is).
        while queue and not queue[0][2]:
            queue.popleft()

    def _unsend_last(self) -> None:
        """Forget the run sent last (its record was not written after all)."""
        run = self._inflight.pop()  # type: ignore[union-attr]
        self.outstanding -= run[2]

    def take_inflight(self, worker: int) -> list[InFlight]:
        """`worker`'s runs not fully answered, oldest first; all its runs are forgotten
        here (it died: the caller answers or re-sends them)."""
        queue = self._inflight
        if not queue:
            return []
        taken = [InFlight(record, remaining, headers) for w, record, remaining, headers in queue
                 if w == worker and remaining]
        self._inflight = deque(run for run in queue if run[0] != worker)
        while self._inflight and not self._inflight[0][2]:
            self._inflight.popleft()
        return taken

    def in_flight(self) -> list[tuple[int, int, int, bytes]]:
        """Every run in flight, oldest first, as (worker, record, remaining, headers)."""
        return [tuple(run) for run in self._inflight or ()]

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
                      batch: list[tuple[int, int, bytes]], requests: memoryview) -> int:
        """Queue each reply record's packets on its connection (adding connections to
        `pending` as they get their first) and count its acks. `requests` is the
        worker's request ring segment, which PACKETS_BY_REF records refer to. Returns
        the last position the worker released its request ring to (0: none): free it
        once the replies queued here are flushed."""
        released = 0
        for kind, conn_id, payload in batch:
            if kind == records.RELEASE:
                released = conn_id
                continue
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
            elif kind == records.PACKETS_BY_REF:
                parts, referred = referred_parts(payload, requests)
                for part in parts:
                    if conn.queue_reply(part):
                        pending.append(conn)
                stats["reply_bytes_by_reference"] += referred
            elif kind == records.CLOSE:
                conn.close()
            if answered:
                conn.answered(worker, answered)
                if conn.close_when_answered and not conn.outstanding:
                    conn.close()
        return released


def referred_parts(payload: bytes | memoryview, requests: memoryview) -> tuple[list[memoryview], int]:
    """A PACKETS_BY_REF record's bytes in order (views of its inline parts and of the
    request ring bytes it refers to), and how many bytes it refers to."""
    view = memoryview(payload)
    parts = []
    referred = 0
    pos = 0
    entry = records.REF_ENTRY
    while pos < len(view):
        if len(view) - pos < entry.size:
            raise ValueError("PACKETS_BY_REF record cut short")
        inline, length, offset = entry.unpack_from(view, pos)
        pos += entry.size
        if inline:
            if pos + inline > len(view):
                raise ValueError("PACKETS_BY_REF record cut short")
            parts.append(view[pos : pos + inline])
            pos += inline
        if length:
            if offset + length > len(requests):
                raise ValueError(f"PACKETS_BY_REF refers past its request ring ({offset} + {length})")
            parts.append(requests[offset : offset + length])
            referred += length
    return parts, referred


def packet_headers(run: bytes | bytearray | memoryview, count: int, big_endian: bool) -> bytes:
    """The headers of the first `count` packets of `run`, back to back."""
    unpack_length = _LENGTH[big_endian].unpack_from
    view = memoryview(run)
    headers = bytearray()
    pos = 0
    for _ in range(count):
        (length,) = unpack_length(view, pos) if len(view) - pos >= 4 else (0,)
        if length < HEADER_SIZE or pos + length > len(view):
            raise ValueError(f"run holds fewer than {count} packets")
        headers += view[pos : pos + HEADER_SIZE]
        pos += length
    return bytes(headers)


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
