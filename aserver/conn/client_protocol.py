"""One client connection inside a conn process: framing in, replies out, flow control."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import msgspec

from aserver.conn.routing import ConnectionInfo
from aserver.protocol import FrameDecoder, ProtocolError
from aserver.protocol.proxy_header import ProxyHeaderError, ProxyHeaderParser

if TYPE_CHECKING:
    from aserver.conn.server import ConnServer

log = logging.getLogger("aserver.conn")

# Why reading is paused; reading resumes when no reason is left.
PAUSED_FOR_RING = 1  # a worker's request ring is full
PAUSED_FOR_CLIENT = 2  # the client is not reading its replies
PAUSED_FOR_STOP = 4  # the server is stopping: no new requests

# What incoming bytes are (ClientProtocol.stage); FRAMING is 0 so the hot path tests one
# attribute for "anything unusual".
FRAMING = 0  # packets
PROXY_HEADER = 1  # a PROXY protocol header is still expected
DISCARDING = 2  # stopping or after a protocol error: read and thrown away


class InFlight(msgspec.Struct, gc=False):
    """A run of requests sent to a worker and not all answered yet. A Struct: one is made
    per ring record, and that is cheaper than a Python __init__. Not GC-tracked (it
    holds only ints and a buffer, so it can be in no cycle)."""

    record: int  # the ring record's sequence number
    remaining: int  # requests of the run the worker has not finished
    run: bytes | bytearray | memoryview


class ClientProtocol(asyncio.Protocol):
    def __init__(self, server: ConnServer) -> None:
        self._server = server
        self._decoder = FrameDecoder(server.codec, server.max_packet_size)
        self._paused = 0
        self.blocking_links = 0  # bit per worker whose full ring paused our reads
        self._replies: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.worker = 0
        self.closed = False
        self.eof_sent = False  # stopping: write_eof() was called, nothing more may be written
        self.stage = FRAMING
        self.close_when_answered = False  # after a protocol error
        self.peer: tuple[str, int] = ("?", 0)  # the socket's peer (a proxy, with PROXY protocol)
        self.info = ConnectionInfo(0, self.peer)  # id and real client address, once admitted
        self._proxy_parser: ProxyHeaderParser | None = None
        # For the server's periodic sweep (idle and packet timeouts): the hot path only
        # marks that a packet completed; no timer, no clock read per read.
        self.progress = False  # a packet completed since the last sweep
        self.swept_buffered = 0  # bytes of an unfinished packet at the last sweep
        self.quiet_since = 0.0
        self.partial_since = 0.0
        # Per worker: runs not fully answered, oldest first (a worker finishes a
        # connection's requests in order).
        self.inflight: dict[int, deque[InFlight]] = {}
        self.outstanding = 0

    @property
    def discarding(self) -> bool:
        return self.stage == DISCARDING

    @discarding.setter
    def discarding(self, value: bool) -> None:
        self.stage = DISCARDING if value else FRAMING

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = (peer[0], peer[1])
        # Pause a client's reads well before its unread replies reach the hard limit.
        transport.set_write_buffer_limits(high=min(256 * 1024, self._server.max_reply_backlog // 4))  # type: ignore[attr-defined]
        self._server.accept(self)

    def expect_proxy_header(self) -> None:
        self.stage = PROXY_HEADER
        self._proxy_parser = ProxyHeaderParser()

    def data_received(self, data: bytes) -> None:
        if self.stage:
            data = self._before_framing(data)
            if not data:
                return
        try:
            run = self._decoder.feed(data)
        except ProtocolError as exc:
            if exc.run:
                self._server.forward(self, exc.run, exc.count)
            self._server.protocol_error(self, str(exc))
            return
        if run:
            self.progress = True
            self._server.forward(self, run, self._decoder.count)

    def _before_framing(self, data: bytes) -> bytes:
        """Off the hot path: input that is not (yet) packets. Returns what to frame."""
        if self.stage != PROXY_HEADER or self.closed:
            return b""
        assert self._proxy_parser is not None
        try:
            result = self._proxy_parser.feed(data)
        except ProxyHeaderError as exc:
            self._server.proxy_header_failed(self, str(exc))
            return b""
        if result is None:
            return b""
        info, rest = result
        self._proxy_parser = None
        self.stage = FRAMING
        if not self._server.proxy_header_received(self, info):
            return b""
        return rest

    def eof_received(self) -> bool:
        return False  # close our side too; replies already queued are still flushed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._server.closed(self)

    # Requests in flight ----------------------------------------------------------------

    def sent(self, worker: int, record: int, count: int, run: bytes | bytearray | memoryview) -> None:
        queue = self.inflight.get(worker)
        if queue is None:
            queue = self.inflight[worker] = deque()
        queue.append(InFlight(record, count, run))
        self.outstanding += count

    def answered(self, worker: int, count: int) -> None:
        """The worker finished `count` more of our requests."""
        queue = self.inflight.get(worker)
        self.outstanding -= count
        while count and queue:
            head = queue[0]
            if head.remaining > count:
                head.remaining -= count
                return
            count -= head.remaining
            queue.popleft()

    # Replies -----------------------------------------------------------------------

    def queue_reply(self, packets: bytes) -> bool:
        """Buffer replies until `flush_replies`; returns True if this is the first."""
        self._replies.append(packets)
        return len(self._replies) == 1

    def flush_replies(self) -> None:
        replies = self._replies
        if not replies:
            return
        self._replies = []
        transport = self.transport
        if self.closed or self.eof_sent or transport is None or transport.is_closing():
            return  # late replies (a stop that timed out) are dropped; the log says how many
        transport.writelines(replies) if len(replies) > 1 else transport.write(replies[0])
        backlog = transport.get_write_buffer_size()
        if backlog > self._server.max_reply_backlog:
            self._server.slow_reader(self, backlog)

    # Flow control ------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and not self.closed and self.transport is not None:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.pause(PAUSED_FOR_CLIENT)

    def resume_writing(self) -> None:
        self.resume(PAUSED_FOR_CLIENT)

    def finish(self) -> None:
        """Stopping, everything answered and flushed: send EOF, then drop what the
        client still sends until it closes (closing on unread input would send RST,
        which can destroy replies the client has not read yet)."""
        if self.closed or self.transport is None:
            return
        self.discarding = True
        self._paused = 0
        if self.transport.can_write_eof():
            self.eof_sent = True
            self.transport.write_eof()
            self.transport.resume_reading()
        else:
            self.transport.close()

    def close(self) -> None:
        """Close after the replies already queued are written."""
        if self.transport is not None:
            self.flush_replies()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
