"""Backpressure: full rings and clients that do not read their replies lose nothing."""

import asyncio
import os
import socket
from pathlib import Path

from aserver.client import Client
from aserver.protocol import PacketCodec
from aserver.testing import ServerProcess

from probe_service import ECHO, SLOW_ECHO

TESTS_DIR = str(Path(__file__).parent)
codec = PacketCodec()


async def test_full_ring_pushes_back_and_loses_nothing() -> None:
    """5 MB of requests through a 64 KiB ring into a worker that holds at most 50."""
    settings = {
        "server": {"max_packet_size": 8192},
        "ring": {"size": 64 * 1024},
        "workers": {"max_pending": 50, "concurrency": 4},
    }
    with ServerProcess(handlers=["probe_service"], settings=settings, pythonpath=[TESTS_DIR]) as server:
        async with await Client.connect(*server.address) as client:
            requests = [(ECHO, os.urandom(1000), i) for i in range(5000)]
            slow = [(SLOW_ECHO, b"0001", 1)] * 20
            replies = await client.call_many(slow + requests, timeout=60)
        assert [(r.body, r.user_id) for r in replies[20:]] == [(b, u) for _, b, u in requests]
        assert all(r.status_code == 0 for r in replies)


async def test_client_that_reads_late_gets_every_reply() -> None:
    """12 MB of replies, far above socket buffers: the client is paused, not dropped.
    Through a 64 KiB ring, so a reply the transport kept as a view of the ring (rather
    than a copy) would be overwritten before it is sent."""
    with ServerProcess(settings={"server": {"max_packet_size": 8192}, "ring": {"size": 64 * 1024}}) as server:
        client = await Client.connect(*server.address)
        client._transport.pause_reading()
        bodies = [os.urandom(4000) for _ in range(3000)]
        calls = asyncio.ensure_future(client.call_many([(ECHO, b, 0) for b in bodies], timeout=60))
        await asyncio.sleep(1.0)
        client._transport.resume_reading()
        replies = await calls
        assert [r.body for r in replies] == bodies
        await client.close()


def _flood_without_reading(address: tuple[str, int]) -> bool:
    """Send echo requests and never read; True once the server closes on us."""
    packet = codec.encode(ECHO, b"x" * 8000)
    with socket.create_connection(address, timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for _ in range(20000):
                sock.sendall(packet)
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            return True
    return False


async def test_client_that_never_reads_is_closed_with_a_log_line() -> None:
    settings = {"server": {"max_packet_size": 16384, "max_reply_backlog": 64 * 1024}}
    with ServerProcess(settings=settings) as server:
        assert await asyncio.to_thread(_flood_without_reading, server.address)
        line = server.wait_for_log(r"replies unread, above server.max_reply_backlog")
        assert "closing 127.0.0.1:" in line
        async with await Client.connect(*server.address) as bystander:
            assert (await bystander.call(ECHO, b"fine", timeout=5)).body == b"fine"


async def test_per_packet_routing_full_rings_lose_nothing() -> None:
    """With user_id routing one connection feeds both workers' rings; room on one ring
    must not lose or reorder what waits for the other."""
    settings = {
        "server": {"max_packet_size": 8192},
        "ring": {"size": 64 * 1024},
        "workers": {"max_pending": 50, "concurrency": 4, "routing": "user_id"},
    }
    with ServerProcess(handlers=["probe_service"], workers=2, settings=settings, pythonpath=[TESTS_DIR]) as server:
        async with await Client.connect(*server.address) as client:
            requests = [(ECHO, os.urandom(1000), i) for i in range(4000)]
            replies = await client.call_many(requests, timeout=60)
        assert sorted((r.user_id, r.body) for r in replies) == sorted((u, b) for _, b, u in requests)
        assert all(r.status_code == 0 for r in replies)
