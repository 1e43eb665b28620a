"""Backend links: aserver.backend.Backend and the handlers.proxy service, against real servers."""

import asyncio
import os
import socket
import time

import pytest

from aserver import Status
from aserver.backend import Backend, BackendTimeout, BackendUnavailable
from aserver.client import Client
from aserver.testing import ServerProcess
from handlers.proxy import parse_commands

from conftest import TESTS_DIR
from probe_service import ECHO, FAIL, SLOW_ECHO, STATUS

# In-flight requests are not waited for long when a backend is stopped.
FAST_STOP = {"stop_timeout": 0.5}


def start_backend(port: int = 0) -> ServerProcess:
    """The probe service (echo, slow echo, custom status) as a backend."""
    return ServerProcess(
        handlers=["probe_service"],
        pythonpath=[TESTS_DIR],
        settings={"server": {"bind": f"127.0.0.1:{port}", **FAST_STOP}},
    ).start()


async def stop(server: ServerProcess) -> None:
    # In a thread: the test's event loop keeps running (and sees connections drop).
    await asyncio.to_thread(server.stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_until_served(call, deadline_s: float = 10.0):
    """Retry `call()` until it succeeds (returns a truthy value) or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            result = await asyncio.wait_for(call(), 5)
            if result:
                return result
        except (BackendUnavailable, BackendTimeout, ConnectionError):
            pass
        assert time.monotonic() < deadline, "not served again before the deadline"
        await asyncio.sleep(0.05)


def pending_entries(backend: Backend) -> int:
    return sum(len(slot.client._pending) for slot in backend._slots if slot.client is not None)


@pytest.fixture(scope="module")
def backend_server():
    server = start_backend()
    yield server
    server.stop()


# Backend -------------------------------------------------------------------------------


async def test_calls_are_spread_over_the_pool(backend_server) -> None:
    backend = Backend(*backend_server.address, connections=3, timeout=5)
    try:
        reply = await backend.call(ECHO, b"hello", user_id=42)
        assert (reply.cmd_id, reply.status_code, reply.user_id, reply.body) == (ECHO, 0, 42, b"hello")
        bodies = [os.urandom(i % 50) for i in range(600)]
        replies = await asyncio.gather(*(backend.call(ECHO, b, user_id=i) for i, b in enumerate(bodies)))
        assert [(r.body, r.user_id) for r in replies] == [(b, i) for i, b in enumerate(bodies)]
        assert all(slot.client is not None for slot in backend._slots), "pool did not grow under load"
        assert (await backend.call(STATUS)).status_code == 1234  # statuses come through as they are
        assert pending_entries(backend) == 0
    finally:
        await backend.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        await backend.call(ECHO, b"after close")


async def test_timeout_raises_and_leaves_nothing_pending(backend_server) -> None:
    backend = Backend(*backend_server.address, connections=1, timeout=5)
    try:
        await backend.call(ECHO, b"warm up")
        started = time.monotonic()
        with pytest.raises(BackendTimeout) as caught:
            await backend.call(SLOW_ECHO, b"0300", timeout=0.05)
        assert isinstance(caught.value, TimeoutError)
        assert time.monotonic() - started < 0.25
        assert pending_entries(backend) == 0
        # The late reply to the abandoned call is dropped, not taken for a later call's.
        await asyncio.sleep(0.4)
        reply = await backend.call(ECHO, b"next", user_id=5)
        assert (reply.cmd_id, reply.user_id, reply.body) == (ECHO, 5, b"next")
        assert pending_entries(backend) == 0
        # A caller cancelled from outside leaves nothing behind either.
        task = asyncio.ensure_future(backend.call(SLOW_ECHO, b"0300"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pending_entries(backend) == 0
    finally:
        await backend.close()


async def test_nothing_listening_fails_fast_with_backoff() -> None:
    backend = Backend("127.0.0.1", free_port(), timeout=5, max_backoff=1.0)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.call(ECHO, b"x")
        assert isinstance(caught.value, ConnectionError)
        started = time.monotonic()
        for _ in range(100):  # backing off: no connect attempts, answers at once
            with pytest.raises(BackendUnavailable, match="down"):
                await backend.call(ECHO, b"x")
        assert time.monotonic() - started < 0.1
    finally:
        await backend.close()


async def test_peer_that_drops_every_connection_is_not_hammered() -> None:
    accepted = 0

    def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    backend = Backend(*server.sockets[0].getsockname()[:2], timeout=2, max_backoff=1.0)
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            with pytest.raises(BackendUnavailable):
                await backend.call(ECHO, b"x")
            await asyncio.sleep(0.005)
        assert 1 <= accepted <= 6  # backoff 50, 100, 200, 400 ms: not one connect per call
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()


async def test_pool_reconnects_after_backend_restart() -> None:
    server = start_backend()
    host, port = server.address
    backend = Backend(host, port, connections=2, timeout=5)
    try:
        assert (await backend.call(ECHO, b"one")).body == b"one"
        # A call in flight when the backend goes away fails clearly, and promptly.
        in_flight = asyncio.ensure_future(backend.call(SLOW_ECHO, b"3000"))
        await asyncio.sleep(0.1)
        await stop(server)
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(in_flight, 5)
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(backend.call(ECHO, b"down"), 5)

        server = start_backend(port)
        reply = await wait_until_served(lambda: backend.call(ECHO, b"again", user_id=9))
        assert (reply.body, reply.user_id) == (b"again", 9)
    finally:
        await backend.close()
        await stop(server)


def test_address_and_commands_parsing() -> None:
    backend = Backend.from_address("[::1]:7001", connections=1)
    assert (backend.host, backend.port, backend.address) == ("::1", 7001, "[::1]:7001")
    assert Backend.from_address("db.local:80").host == "db.local"
    for bad in ("7001", "host:", "host:0", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            Backend.from_address(bad)
    assert parse_commands(None) is None
    assert parse_commands([1, "5-7"]) == {1, 5, 6, 7}
    for bad in ("1", [1.5], [70000], [True]):
        with pytest.raises(ValueError):
            parse_commands(bad)


# Proxy ---------------------------------------------------------------------------------


async def test_proxy_forwards_survives_outage_and_recovers() -> None:
    backend = start_backend()
    host, port = backend.address
    proxy = ServerProcess(
        handlers=["handlers.proxy"],
        settings={
            "server": FAST_STOP,
            "service": {
                "backend": f"{host}:{port}",
                "backend_timeout": 0.3,
                "proxy_commands": [ECHO, SLOW_ECHO, STATUS],
            },
        },
    ).start()
    clients: list[Client] = []
    try:
        clients = [await Client.connect(*proxy.address) for _ in range(4)]

        # Many pipelined calls on several connections at once.
        async def batch(client: Client, n: int) -> None:
            requests = [(ECHO, os.urandom((n * 7 + i) % 200), n * 1000 + i) for i in range(250)]
            replies = await client.call_many(requests, timeout=10)
            assert [(r.cmd_id, r.status_code, r.user_id, r.body) for r in replies] == [
                (ECHO, 0, user, body) for _, body, user in requests
            ]

        await asyncio.gather(*(batch(client, n) for n, client in enumerate(clients)))
        client = clients[0]
        reply = await client.call(STATUS, b"", user_id=3, timeout=5)
        assert (reply.cmd_id, reply.status_code, reply.user_id, reply.body) == (STATUS, 1234, 3, b"custom")
        # Not in proxy_commands: refused by the proxy, not forwarded (the backend would fail it).
        reply = await client.call(FAIL, b"", timeout=5)
        assert reply.status_code == Status.UNKNOWN_COMMAND
        # The backend is too slow: the proxy's own timeout answers.
        started = time.monotonic()
        reply = await client.call(SLOW_ECHO, b"2000", user_id=4, timeout=5)
        assert (reply.status_code, reply.user_id) == (Status.BACKEND_TIMEOUT, 4)
        assert time.monotonic() - started < 1.5

        await stop(backend)
        started = time.monotonic()
        for _ in range(20):
            reply = await client.call(ECHO, b"anyone?", user_id=8, timeout=5)
            assert (reply.cmd_id, reply.status_code, reply.user_id) == (ECHO, Status.BACKEND_UNAVAILABLE, 8)
        assert time.monotonic() - started < 2.0, "an outage must be answered quickly"
        proxy.wait_for_log(r"backend .* unavailable", timeout=5)

        backend = start_backend(port)

        async def served() -> bool:
            reply = await client.call(ECHO, b"back", user_id=6, timeout=5)
            return reply.status_code == 0 and (reply.body, reply.user_id) == (b"back", 6)

        await wait_until_served(served)
        await asyncio.gather(*(batch(c, n) for n, c in enumerate(clients)))
        proxy.wait_for_log(r"backend .* reachable again", timeout=5)
        # One line per outage, not one per failed request.
        assert sum("unavailable" in line for line in proxy.log_lines) == 1, proxy.log_text()
    finally:
        for client in clients:
            await client.close()
        await stop(proxy)
        await stop(backend)
