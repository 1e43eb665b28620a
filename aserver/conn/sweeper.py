"""Connection timeouts without a timer per connection or per packet.

One periodic sweep over the connections reads the one mark the hot path leaves
(`ClientProtocol.progress`: a packet completed) and the size of the unfinished packet
the decoder holds: bytes arrived since the last sweep iff a packet completed or that size
changed. A timeout is therefore honoured within one sweep interval: at most 1 s, less for
short timeouts. Costs nothing when every timeout is off (no sweep runs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aserver.conn.client_protocol import FRAMING

if TYPE_CHECKING:
    from aserver.conn.client_protocol import ClientProtocol
    from aserver.conn.server import ConnServer

log = logging.getLogger("aserver.conn")

MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.05


def sweep_interval(*timeouts: float) -> float:
    """A quarter of the shortest timeout that is on, within [MIN_INTERVAL, MAX_INTERVAL]."""
    enabled = [t for t in timeouts if t > 0]
    if not enabled:
        return 0.0
    return max(MIN_INTERVAL, min(MAX_INTERVAL, min(enabled) / 4))


class Sweeper:
    def __init__(self, server: ConnServer, idle_timeout: float, packet_timeout: float, header_timeout: float) -> None:
        self._server = server
        self.idle_timeout = idle_timeout
        self.packet_timeout = packet_timeout
        self.header_timeout = header_timeout  # 0 when PROXY protocol is off
        self.interval = sweep_interval(idle_timeout, packet_timeout, header_timeout)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.interval:
            self._handle = self._server.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        server = self._server
        try:
            self.sweep(server.loop.time())
        except Exception:  # a bug here must not end the sweeps
            log.exception("connection sweep failed")
        self._handle = server.loop.call_later(self.interval, self._tick)

    def sweep(self, now: float) -> None:
        server = self._server
        if self.header_timeout:
            late = [conn for conn, deadline in server.awaiting_header.items() if deadline <= now]
            for conn in late:
                server.proxy_header_timed_out(conn)
        idle_timeout = self.idle_timeout
        packet_timeout = self.packet_timeout
        if not (idle_timeout or packet_timeout):
            return
        idle = []
        slow = []
        # ~0.5 us per connection: plain attribute reads only (10,000 connections: ~5 ms/s).
        for conn in server.connections.values():
            if conn.stage != FRAMING:
                continue
            # A connection we are not reading from, or that waits for our replies, is
            # not the client's fault.
            waiting_for_us = conn.outstanding or conn._paused
            progress = conn.progress
            buffered = len(conn._decoder._buffer)
            heard = progress or buffered != conn.swept_buffered
            if progress:
                conn.progress = False
            conn.swept_buffered = buffered
            if heard or waiting_for_us:
                conn.quiet_since = now
            elif (
                idle_timeout
                and now - conn.quiet_since >= idle_timeout
                and not (packet_timeout and buffered)  # stuck mid-packet: the sharper reason
            ):
                idle.append(conn)
                continue
            if packet_timeout:
                if progress or waiting_for_us or not buffered:
                    # A new packet may have started since the last sweep: its clock
                    # starts now (so the limit is honoured to within one interval).
                    conn.partial_since = now if buffered and not waiting_for_us else 0.0
                elif not conn.partial_since:
                    conn.partial_since = now
                elif now - conn.partial_since >= packet_timeout:
                    slow.append(conn)
        for conn in idle:
            if not _closing(conn):
                server.close_idle(conn, now - conn.quiet_since)
        for conn in slow:
            if not _closing(conn):
                server.close_slow_packet(conn, now - conn.partial_since)


def _closing(conn: ClientProtocol) -> bool:
    return conn.closed or conn.transport is None or conn.transport.is_closing()
