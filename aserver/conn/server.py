"""The conn process's core: connections on one side, one ring pair per worker on the other."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter

import msgspec

from aserver.app import ConnHandler, Status
from aserver.conn.admission import Admission, Refusal, parse_networks
from aserver.conn.client_protocol import PAUSED_FOR_RING, PAUSED_FOR_STOP, ClientProtocol
from aserver.conn.conn_core import READ_SIZE, InFlight
from aserver.conn.in_conn import InConnAnswerer
from aserver.conn.routing import ConnectionInfo, Router
from aserver.conn.sweeper import Sweeper
from aserver.ipc import records
from aserver.ipc.channel import RingReceiver, RingSender
from aserver.ipc.records import CONN_INDEX_SHIFT
from aserver.ipc.ring import RingReader, RingWriter, record_size
from aserver.protocol import HEADER_SIZE, PacketCodec, count_packets, split_run
from aserver.protocol.proxy_header import ProxyInfo, is_trusted
from aserver.settings import Settings

log = logging.getLogger("aserver.conn")



class WorkerLink:
    """The conn side of one worker: requests out through a sender, replies and acks in."""

    def __init__(self, server: ConnServer, index: int, writer: RingWriter, reader: RingReader) -> None:
        self.index = index
        self._server = server
        self.sender = RingSender(writer, server.loop, self._on_room)
        self.receiver = RingReceiver(reader, server.loop, self._on_replies, in_place=True)
        # The worker's replies may refer to request bytes here (records.PACKETS_BY_REF).
        self.requests = writer.segment.toreadonly()
        # Connections paused because this link's ring was full, oldest first, with the
        # bytes of the run that had to wait: what each is expected to send next.
        self.blocked: dict[ClientProtocol, int] = {}

    def send_event(self, kind: int, conn_id: int, payload: bytes) -> None:
        self.sender.send(kind, conn_id, payload)

    def send_requests(self, conn: ClientProtocol, run: bytes | bytearray | memoryview, count: int) -> None:
        sender = self.sender
        if len(run) > sender.max_payload:
            for piece in split_run(run, sender.max_payload, self._server.codec):
                self.send_requests(conn, piece, count_packets(piece, self._server.codec))
            return
        conn.sent(self.index, sender.records_sent, count, run)
        if not sender.send(records.PACKETS, conn.conn_id, run) and not conn.closed:
            self.ring_full(conn, len(run))

    def ring_full(self, conn: ClientProtocol, size: int) -> None:
        """conn's last run (`size` bytes) had to wait for room in this ring: read no more
        from it until there is room."""
        log.debug("ring to worker %d full: pausing connection %x", self.index, conn.conn_id)
        self._server.stats["ring_full"] += 1  # runs that waited for room (backpressure, not loss)
        conn.blocking_links |= 1 << self.index
        conn.pause(PAUSED_FOR_RING)
        self.blocked.setdefault(conn, size)

    def _on_room(self) -> bool:
        """Room appeared (nothing waits in the sender any more): resume the connections
        this ring blocked, oldest first, as long as the room left holds a record of what
        each sent last; resuming them all at once would have most of them read a run
        with no room for it (copied, queued, paused again). Returns True while some stay
        blocked: the sender then calls again as the worker frees more (or, the ring
        being empty, shortly). A connection another ring still blocks (per-packet
        routing) stays paused."""
        room = self.sender.room()
        bit = 1 << self.index
        while self.blocked:
            conn, size = next(iter(self.blocked.items()))
            if not conn.closed:
                need = record_size(size)
                if need > room:
                    return True
                room -= need
            del self.blocked[conn]
            conn.blocking_links &= ~bit
            if not conn.blocking_links:
                conn.resume(PAUSED_FOR_RING)
        return False

    def _on_replies(self, batch: list[tuple[int, int, bytes | memoryview]]) -> None:
        self._server.on_replies(self.index, batch)


class ConnServer:
    protocol = ClientProtocol  # (tests swap in a class on the other ConnCore)

    def __init__(
        self,
        settings: Settings,
        index: int,
        incarnation: int,
        rings: list[tuple[RingWriter, RingReader]],
        loop: asyncio.AbstractEventLoop,
        conn_handlers: dict[int, ConnHandler] | None = None,
    ) -> None:
        self.loop = loop
        self.index = index
        self.codec = PacketCodec(settings.byte_order)
        self.max_packet_size = settings.server.max_packet_size
        self.max_reply_backlog = settings.server.max_reply_backlog
        # server.max_connections is a total: each conn process takes an equal share.
        self.admission = Admission(settings.limits, settings.server.max_connections, settings.server.conn_processes)
        self.max_connections = self.admission.max_connections
        self.backlog = settings.server.backlog
        # Open connections per client IP, kept only when limits.max_per_ip needs it.
        self.per_ip: Counter[str] | None = Counter() if settings.limits.max_per_ip else None
        proxy = settings.proxy_protocol
        self.proxy_trusted = parse_networks(proxy.trusted) if proxy.enabled else None
        # Connections from a trusted proxy whose PROXY header has not arrived: deadline.
        self.awaiting_header: dict[ClientProtocol, float] = {}
        self.header_timeout = proxy.header_timeout if proxy.enabled else 0.0
        self.sweeper = Sweeper(self, settings.limits.idle_timeout, settings.limits.packet_timeout,
                               self.header_timeout)
        self.router = Router(settings.workers.routing, len(rings), self.codec)
        self.links = [WorkerLink(self, i, writer, reader) for i, (writer, reader) in enumerate(rings)]
        self.connections: dict[int, ClientProtocol] = {}
        # Ids are never reused: conn index in the top byte, then the incarnation, then a
        # counter, so a late reply can never reach a newer connection on a reused fd.
        self._next_id = (index << CONN_INDEX_SHIFT) | ((incarnation & 0xFFFF) << 40)
        # Where reads go that do not go straight into a ring (ConnCore.get_buffer).
        self.read_buffer = memoryview(bytearray(READ_SIZE))
        self._flush_pending: list[ClientProtocol] = []
        self._flush_scheduled = False
        self._server: asyncio.base_events.Server | None = None
        self.stats: Counter[str] = Counter()
        self.in_conn = InConnAnswerer(conn_handlers, self.codec, self.stats) if conn_handlers else None
        if self.in_conn is not None:
            self.forward = self._forward_in_conn  # type: ignore[method-assign]  # default path untouched

    async def start(self, sock: socket.socket) -> None:
        for link in self.links:
            link.receiver.start()
        # create_server listens again on the socket: keep the configured backlog (its
        # default of 100 makes a burst of connects wait for SYN retries).
        self._server = await self.loop.create_server(lambda: self.protocol(self), sock=sock, backlog=self.backlog)
        self.sweeper.start()

    def next_conn_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # Connection events ---------------------------------------------------------------

    def accept(self, conn: ClientProtocol) -> None:
        """A new socket: admit it, refuse it, or (PROXY protocol) wait for its header."""
        peer = conn.peer
        refusal = self.admission.capacity(len(self.connections) + len(self.awaiting_header))
        if refusal is not None:
            self._refuse(conn, peer, refusal)
            return
        if self.proxy_trusted is not None:
            if not is_trusted(peer[0], self.proxy_trusted):
                self._refuse(conn, peer, Refusal(
                    "proxy_untrusted", "PROXY protocol is on and the peer is not in proxy_protocol.trusted"))
                return
            conn.expect_proxy_header()
            self.awaiting_header[conn] = self.loop.time() + self.header_timeout
            return
        self._admit(conn, peer)

    def _admit(self, conn: ClientProtocol, peer: tuple[str, int]) -> bool:
        if self.admission.by_address:
            same_ip = self.per_ip.get(peer[0], 0) if self.per_ip is not None else 0
            refusal = self.admission.address(peer[0], peer[1], same_ip)
            if refusal is not None:
                self._refuse(conn, peer, refusal)
                return False
        self.opened(conn, peer)
        return True

    def _refuse(self, conn: ClientProtocol, peer: tuple[str, int], refusal: Refusal) -> None:
        self.stats["refused_" + refusal.reason] += 1
        log.warning("refused %s:%s: %s", peer[0], peer[1], refusal.detail)
        conn.closed = True
        conn.abort()

    def proxy_header_received(self, conn: ClientProtocol, info: ProxyInfo) -> bool:
        """The header arrived: admit the real client (LOCAL, e.g. a health check: the
        proxy itself). Returns False if the connection was refused."""
        self.awaiting_header.pop(conn, None)
        return self._admit(conn, info.source or conn.peer)

    def proxy_header_failed(self, conn: ClientProtocol, reason: str) -> None:
        self.awaiting_header.pop(conn, None)
        self._refuse(conn, conn.peer, Refusal("proxy_bad_header", f"bad PROXY header: {reason}"))

    def proxy_header_timed_out(self, conn: ClientProtocol) -> None:
        self.awaiting_header.pop(conn, None)
        self._refuse(conn, conn.peer, Refusal(
            "proxy_timeout", f"no PROXY header within proxy_protocol.header_timeout ({self.header_timeout}s)"))

    def close_for(self, conn: ClientProtocol, stat: str, reason: str, abort: bool = False) -> None:
        """Close an admitted connection for a reason: counted under `stat`, logged."""
        self.stats[stat] += 1
        peer = conn.info.peer
        log.warning("closing %s:%s (connection %x): %s", peer[0], peer[1], conn.conn_id, reason)
        conn.abort() if abort else conn.close()

    def close_idle(self, conn: ClientProtocol, silent: float) -> None:
        self.close_for(conn, "closed_idle", f"silent for {silent:.1f}s (limits.idle_timeout)")

    def close_slow_packet(self, conn: ClientProtocol, elapsed: float) -> None:
        self.close_for(conn, "closed_packet_timeout",
                       f"packet incomplete after {elapsed:.1f}s (limits.packet_timeout)", abort=True)

    def opened(self, conn: ClientProtocol, peer: tuple[str, int]) -> None:
        conn.conn_id = self.next_conn_id()
        conn.info = ConnectionInfo(conn.conn_id, peer)
        conn.quiet_since = self.loop.time()
        if self.per_ip is not None:
            self.per_ip[peer[0]] += 1
        self.stats["accepted"] += 1
        self.connections[conn.conn_id] = conn
        conn.worker = self.router.assign()
        if self.router.pinned and self.in_conn is None:
            conn.link = self.links[conn.worker]
        payload = msgspec.msgpack.encode(conn.info.peer)
        for link in self.links:
            link.send_event(records.OPENED, conn.conn_id, payload)

    def closed(self, conn: ClientProtocol) -> None:
        if not conn.conn_id:  # closed before its PROXY header: never opened
            self.awaiting_header.pop(conn, None)
            return
        del self.connections[conn.conn_id]
        if self.per_ip is not None:
            host = conn.info.peer[0]
            left = self.per_ip[host] - 1
            if left > 0:
                self.per_ip[host] = left
            else:
                del self.per_ip[host]
        for link in self.links:
            link.send_event(records.CLOSED, conn.conn_id, b"")

    def forward(self, conn: ClientProtocol, run: bytes | bytearray | memoryview, count: int) -> None:
        self.stats["requests"] += count
        if self.router.pinned:
            self.links[conn.worker].send_requests(conn, run, count)
            return
        try:
            pieces = self.router.split(run, conn.info)
        except Exception:
            log.exception("routing hook failed; closing connection %x", conn.conn_id)
            conn.abort()
            return
        for worker, piece, packets in pieces:
            self.links[worker].send_requests(conn, piece, packets)

    def _forward_in_conn(self, conn: ClientProtocol, run: bytes | bytearray | memoryview, count: int) -> None:
        """forward() when the service has in-conn handlers (see aserver.conn.in_conn)."""
        if not conn.outstanding:
            assert self.in_conn is not None
            replies, pos, answered = self.in_conn.answer_leading(conn, run)
            if answered:
                self.stats["requests"] += answered
                self.stats["answered_in_conn"] += answered
                for reply in replies:
                    if conn.queue_reply(reply):
                        self._flush_pending.append(conn)
                if replies and not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.loop.call_soon(self._flush)
                if pos == len(run):
                    return
                run = memoryview(run)[pos:]
                count -= answered
        ConnServer.forward(self, conn, run, count)

    def protocol_error(self, conn: ClientProtocol, reason: str) -> None:
        """Stop reading; close once the requests before the bad packet are answered."""
        self.stats["protocol_errors"] += 1
        peer = conn.info.peer
        log.warning("closing %s:%s (connection %x): protocol error: %s", peer[0], peer[1], conn.conn_id, reason)
        conn.discarding = True
        conn.pause(PAUSED_FOR_STOP)
        if conn.outstanding:
            conn.close_when_answered = True
        else:
            conn.close()

    def slow_reader(self, conn: ClientProtocol, backlog: int) -> None:
        self.close_for(conn, "slow_readers",
                       f"{backlog} bytes of replies unread, above server.max_reply_backlog", abort=True)

    # Replies from workers --------------------------------------------------------------

    def on_replies(self, worker: int, batch: list[tuple[int, int, bytes | memoryview]]) -> None:
        """A batch from a worker's reply ring. Its payloads are views of the ring, and
        may refer to request ring bytes that a RELEASE record in the batch frees, so
        every connection they went to is flushed here, before that room is freed: what
        its socket does not take now is copied for the transport."""
        link = self.links[worker]
        released = 0
        try:
            released = self.protocol.route_replies(
                self.connections, self._flush_pending, self.stats, worker, batch, link.requests)
        except BaseException:
            # The room is freed all the same: the worker will not send this RELEASE again,
            # and without it a full ring would wait for good.
            released = next((position for kind, position, _ in reversed(batch) if kind == records.RELEASE), 0)
            raise
        finally:
            self._flush()
            if released:
                link.sender.released(released)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._flush_pending = self._flush_pending, []
        for conn in pending:
            try:
                conn.flush_replies()
            except Exception:
                conn.write_failed()

    # A worker was replaced ---------------------------------------------------------------

    def worker_gone(self, index: int) -> int:
        """Worker `index` died or retired and its replacement is about to attach.

        Requests it had taken and not answered get a WORKER_LOST reply; requests it never
        took are sent again, after OPENED for every open connection, so the replacement
        sees a consistent stream. Returns the number of WORKER_LOST replies.
        """
        link = self.links[index]
        link.receiver.drain_now()  # its last replies and acks come first
        taken = link.sender.records_taken()
        unread = link.sender.unread_records()  # copies: the ring is reset below
        lost = 0
        for conn in self.connections.values():
            queue = conn.take_inflight(index)
            conn.outstanding -= sum(entry.remaining for entry in queue)
            for entry in queue:
                if entry.record < taken:
                    lost += self._reply_lost(conn, entry)
        link.sender.discard_unread()
        payloads = {conn_id: msgspec.msgpack.encode(conn.info.peer) for conn_id, conn in self.connections.items()}
        for conn_id, payload in payloads.items():
            link.send_event(records.OPENED, conn_id, payload)
        for kind, conn_id, run in unread:
            conn = self.connections.get(conn_id)
            if kind == records.PACKETS and conn is not None:
                link.send_requests(conn, run, count_packets(run, self.codec))
        if not link.sender.backlogged and link._on_room():
            link.sender.wait_for_room()  # some stay paused: more of them read as room appears
        for conn in list(self.connections.values()):
            if conn.close_when_answered and not conn.outstanding:
                conn.close()
        self._flush()
        if lost:
            self.stats["worker_lost"] += lost
            log.warning("worker %d lost %d requests in flight: answered WORKER_LOST", index, lost)
        return lost

    def _reply_lost(self, conn: ClientProtocol, entry: InFlight) -> int:
        """WORKER_LOST for the requests of `entry` the worker had not answered."""
        header = self.codec.header
        headers = entry.headers
        first = len(headers) - entry.remaining * HEADER_SIZE
        replies = b"".join(
            header.pack(HEADER_SIZE, seq_num, cmd_id, Status.WORKER_LOST, user_id)
            for _length, seq_num, cmd_id, _status, user_id in header.iter_unpack(headers[first:])
        )
        if conn.queue_reply(replies):
            self._flush_pending.append(conn)
        return entry.remaining

    # Stopping ------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Stop accepting and reading; answer what was received; then close every client."""
        if self._server is not None:
            self._server.close()
        self.sweeper.stop()
        for conn in list(self.awaiting_header):
            conn.closed = True
            conn.abort()
        self.awaiting_header.clear()
        for conn in list(self.connections.values()):
            conn.pause(PAUSED_FOR_STOP)
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline and any(
            conn.outstanding or (conn.transport and conn.transport.get_write_buffer_size())
            for conn in self.connections.values()
        ):
            await asyncio.sleep(0.01)
        unanswered = sum(conn.outstanding for conn in self.connections.values())
        if unanswered:
            log.warning("stop timeout: %d requests unanswered", unanswered)
        for conn in list(self.connections.values()):
            conn.finish()
        while self.connections and self.loop.time() < deadline + 1.0:
            await asyncio.sleep(0.01)
        for conn in list(self.connections.values()):
            conn.abort()
        await asyncio.sleep(0)
        for link in self.links:
            link.receiver.close()
            link.requests.release()
            link.sender.close()

    def snapshot(self) -> dict:
        return {
            "connections": len(self.connections),
            "in_flight": sum(conn.outstanding for conn in self.connections.values()),
            **self.stats,
        }
