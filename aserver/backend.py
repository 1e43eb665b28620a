"""Calls from a handler to another server speaking this protocol: a small pool of
reconnecting client connections with timeouts (the original's net_connect_ser/proc_pkg_ser).

    backend = Backend.from_address("127.0.0.1:7001", timeout=2.0)
    reply = await backend.call(1, b"hello", user_id=42)    # Packet; reply.status_code, reply.body
    await backend.close()

Every await is bounded: a call raises BackendTimeout (a TimeoutError) after `timeout`
seconds, BackendUnavailable (a ConnectionError) when no connection can be had or the one
it went out on drops (calls are never retried: the backend may have acted on them).
After a failed connect the pool backs off (doubling, up to
`max_backoff` seconds); meanwhile calls fail at once instead of piling up on a dead peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from aserver.client import Client
from aserver.protocol import ByteOrder, Packet

log = logging.getLogger("aserver.backend")

_FIRST_BACKOFF = 0.05


class BackendUnavailable(ConnectionError):
    """The backend could not be reached, or the connection broke before the reply."""


class BackendTimeout(TimeoutError):
    """The backend did not answer within the call's timeout."""


class _PooledClient(Client):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Late replies to calls that timed out answer nothing: drop them.
        self.keep_unsolicited = False
        self.opened_at = time.monotonic()


class _Slot:
    """One pool position: its open connection, or the connect in progress."""

    __slots__ = ("client", "connecting", "load")

    def __init__(self) -> None:
        self.client: _PooledClient | None = None
        self.connecting: asyncio.Future[_PooledClient] | None = None
        self.load = 0  # calls assigned to this slot (connecting or awaiting a reply)


class Backend:
    """A pool of `connections` client connections to one backend, opened lazily."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connections: int = 2,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_backoff: float = 1.0,
        byte_order: ByteOrder = ByteOrder.LITTLE,
        max_packet_size: int = 64 * 1024 * 1024,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        if not (timeout > 0 and connect_timeout > 0 and max_backoff >= 0):
            raise ValueError("timeout and connect_timeout must be positive, max_backoff not negative")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.byte_order = byte_order
        self.max_packet_size = max_packet_size
        self._slots = [_Slot() for _ in range(connections)]
        self._closed = False
        self._up = True  # for logging each outage once, not every failed call
        self._down_since = 0.0
        self._failures = 0  # connects failed in a row
        self._retry_at = 0.0  # no connect attempts before this (monotonic time)
        self._last_error = ""

    @classmethod
    def from_address(cls, address: str, **options: object) -> Backend:
        """'HOST:PORT' or '[v6]:PORT'."""
        host, sep, port_text = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"backend address must be HOST:PORT, got {address!r}")
        return cls(host, int(port_text), **options)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Backend({self.address}, connections={len(self._slots)})"

    async def call(self, cmd_id: int, body: bytes = b"", *, user_id: int = 0, timeout: float | None = None) -> Packet:
        """Send one request and return the backend's reply packet. `timeout` (default: the
        pool's) bounds the whole call, connecting included."""
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                slot = self._pick()
                slot.load += 1
                try:
                    client = slot.client if slot.client is not None else await self._open(slot)
                    try:
                        reply = await client.call(cmd_id, body, user_id=user_id)
                    except ConnectionError as exc:
                        self._lost(client, exc)
                        raise BackendUnavailable(f"backend {self.address}: {exc}") from None
                    if self._failures or not self._up:
                        self._answered()
                    return reply
                finally:
                    slot.load -= 1
        except TimeoutError:
            raise BackendTimeout(f"backend {self.address} did not answer within {limit:g}s") from None

    async def close(self) -> None:
        """Close every connection; calls in flight fail with BackendUnavailable."""
        self._closed = True
        # Connects in progress end within connect_timeout and see the pool closed; not
        # cancelled, so their waiters get BackendUnavailable, never a stray CancelledError.
        connecting = [slot.connecting for slot in self._slots if slot.connecting is not None]
        if connecting:
            await asyncio.wait(connecting, timeout=self.connect_timeout + 1.0)
        for slot in self._slots:
            client, slot.client = slot.client, None
            if client is not None:
                client.abort()
                try:
                    await client.wait_closed(1.0)
                except TimeoutError:
                    pass

    # Pool ------------------------------------------------------------------------------

    def _pick(self) -> _Slot:
        """The least loaded slot, open connections first on a tie: the pool grows only
        when the connections it has are busy."""
        if self._closed:
            raise BackendUnavailable(f"backend {self.address}: pool is closed")
        for slot in self._slots:
            if slot.client is not None and slot.client.closed:
                self._lost(slot.client, None)
        backing_off = time.monotonic() < self._retry_at
        usable = [s for s in self._slots if s.client is not None or s.connecting is not None or not backing_off]
        if not usable:
            # Fail fast rather than hammer (or wait on) a dead backend.
            raise BackendUnavailable(f"backend {self.address} is down: {self._last_error}")
        return min(usable, key=lambda s: (s.load, s.client is None))

    async def _open(self, slot: _Slot) -> _PooledClient:
        if slot.connecting is None:
            slot.connecting = asyncio.ensure_future(self._connect(slot))
            # Retrieved here: when every waiter has timed out, a failed connect must not
            # log "exception was never retrieved".
            slot.connecting.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            # Shielded: a caller that gives up must not cancel the connect others wait on.
            return await asyncio.shield(slot.connecting)
        except BackendUnavailable:
            for other in self._slots:
                if other.client is not None and not other.client.closed:
                    return other.client  # a connection we already have still works
            raise

    async def _connect(self, slot: _Slot) -> _PooledClient:
        try:
            opening = _PooledClient.connect(
                self.host, self.port, byte_order=self.byte_order, max_packet_size=self.max_packet_size
            )
            client = cast(_PooledClient, await asyncio.wait_for(opening, self.connect_timeout))
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"connect timed out after {self.connect_timeout:g}s"
            self._failed(reason)
            raise BackendUnavailable(f"backend {self.address}: {reason}") from None
        finally:
            slot.connecting = None
        if self._closed:
            client.abort()
            raise BackendUnavailable(f"backend {self.address}: pool is closed")
        slot.client = client
        return client

    def _answered(self) -> None:
        """A reply arrived: the backend is up (a mere connect does not prove it)."""
        self._failures = 0
        if not self._up:
            self._up = True
            log.warning("backend %s is reachable again (down %.1fs)", self.address, time.monotonic() - self._down_since)

    def _lost(self, client: _PooledClient, exc: Exception | None) -> None:
        """Forget a dropped connection; the next call on its slot connects again."""
        for slot in self._slots:
            if slot.client is client:
                slot.client = None
                reason = str(exc) if exc else "connection closed"
                if time.monotonic() - client.opened_at < 1.0:
                    # Accepted, then dropped at once (e.g. over its connection limit): back
                    # off as for a refused connect, or every call would reconnect.
                    self._failed(reason)
                else:
                    self._mark_down(reason)

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + min(self.max_backoff, _FIRST_BACKOFF * 2 ** (self._failures - 1))
        self._mark_down(reason)

    def _mark_down(self, reason: str) -> None:
        self._last_error = reason
        if self._up and not self._closed:
            self._up = False
            self._down_since = time.monotonic()
            log.warning("backend %s unavailable: %s (retrying with backoff up to %gs)",
                        self.address, reason, self.max_backoff)
