"""One client connection inside a conn process: framing in, replies out, flow control."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aserver.conn import conn_core
from aserver.conn.routing import ConnectionInfo
from aserver.native import native
from aserver.protocol import ByteOrder, FrameDecoder, ProtocolError
from aserver.protocol.proxy_header import ProxyHeaderError, ProxyHeaderParser

if TYPE_CHECKING:
    from aserver.conn.server import ConnServer, WorkerLink

# The per-request steps in C when they were built (see conn_core.py).
# (The C type is conn_core.ConnCore structurally, not a subclass of it.)
ConnCore: type = (native("aserver.conn._conn_core") or conn_core).ConnCore

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


class ClientProtocolBase(asyncio.BufferedProtocol):
    """Everything about a connection but its per-request steps, which ClientProtocol
    takes from ConnCore (the C core when built)."""

    def __init__(self, server: ConnServer) -> None:
        self._server = server
        self._decoder = FrameDecoder(server.codec, server.max_packet_size)
        # What the C core frames by without the decoder (while nothing is buffered).
        self.max_packet_size = server.max_packet_size
        self.big_endian = server.codec.byte_order is ByteOrder.NETWORK
        self.max_reply_backlog = server.max_reply_backlog
        self.stats = server.stats
        self.scratch = server.read_buffer  # shared: a read is framed before the next one starts
        self.reading: memoryview | None = None  # ring room the current read goes to (ConnCore)
        self.partial = False  # the decoder holds the start of a packet
        # The worker link all requests go to (pinned routing, no in-conn handlers), once
        # admitted: the C core then sends a run itself. None: always through the server.
        self.link: WorkerLink | None = None
        self._paused = 0
        self.blocking_links = 0  # bit per worker whose full ring paused our reads
        self._replies: list[bytes | memoryview] = []
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket, for replies written past the transport (see ConnCore)
        self.handed_over = False  # replies went to the transport and may still be in its buffer
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
        self.outstanding = 0  # requests sent to workers and not answered (ConnCore.sent)

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
        # Replies are written to the socket directly while the transport holds nothing
        # (ConnCore.flush_replies). Plain TCP only: a TLS transport would need fd = -1.
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        # Pause a client's reads well before its unread replies reach the hard limit.
        transport.set_write_buffer_limits(high=min(256 * 1024, self._server.max_reply_backlog // 4))  # type: ignore[attr-defined]
        self._server.accept(self)

    def expect_proxy_header(self) -> None:
        self.stage = PROXY_HEADER
        self._proxy_parser = ProxyHeaderParser()

    def receive(self, data: bytes) -> None:
        """Bytes that did not go straight into a ring (see ConnCore.buffer_updated):
        frame them and forward their complete packets."""
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
        finally:
            self.partial = self._decoder.buffered > 0
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
        self.reading = None  # a view of a ring: let it go before the ring is closed
        if self.closed:
            return
        self.closed = True
        self._server.closed(self)

    def too_much_unread(self, backlog: int) -> None:
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

    def write_failed(self) -> None:
        """flush_replies raised: say why and abort. Queued replies may be views of a reply
        ring that is reused once the batch is done, so none may stay queued."""
        log.exception("connection %x: replies could not be written: closing it", self.conn_id)
        self._replies = []
        self.abort()

    def close(self) -> None:
        """Close after the replies already queued are written."""
        if self.transport is not None:
            try:
                self.flush_replies()  # type: ignore[attr-defined]
            except Exception:
                self.write_failed()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ClientProtocol(ConnCore, ClientProtocolBase):  # type: ignore[valid-type,misc]
    """A client connection in a conn process."""
