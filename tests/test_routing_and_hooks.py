"""Routing modes, connection limits, and the worker's lifecycle hooks."""

import asyncio
from pathlib import Path

import pytest

from aserver.client import Client
from aserver.testing import ServerProcess

from probe_service import ECHO, STARTED, TICKS, WHO

TESTS_DIR = str(Path(__file__).parent)


async def _worker_pid(client: Client, user_id: int) -> bytes:
    return (await client.call(WHO, b"", user_id=user_id, timeout=5)).body.split()[0]


@pytest.mark.parametrize(
    ("routing", "same", "different"),
    [("user_id", (2, 4), (2, 3)), ("probe_service:route", (1, 999), (999, 1000))],
)
async def test_per_packet_routing(routing: str, same: tuple, different: tuple) -> None:
    settings = {"workers": {"routing": routing}}
    with ServerProcess(handlers=["probe_service"], workers=2, settings=settings, pythonpath=[TESTS_DIR]) as server:
        async with await Client.connect(*server.address) as client:
            for _ in range(3):
                assert await _worker_pid(client, same[0]) == await _worker_pid(client, same[1])
                assert await _worker_pid(client, different[0]) != await _worker_pid(client, different[1])


async def test_max_connections_refuses_and_logs() -> None:
    with ServerProcess(settings={"server": {"max_connections": 3}}) as server:
        clients = [await Client.connect(*server.address) for _ in range(3)]
        for client in clients:
            assert (await client.call(ECHO, b"in", timeout=5)).body == b"in"
        extra = await Client.connect(*server.address)
        await extra.wait_closed(timeout=5)
        server.wait_for_log(r"server.max_connections \(3\) reached")
        await clients[0].close()
        await asyncio.sleep(0.2)
        async with await Client.connect(*server.address) as late:
            assert (await late.call(ECHO, b"room again", timeout=5)).body == b"room again"
        for client in clients[1:]:
            await client.close()


async def test_startup_periodic_and_shutdown_hooks(tmp_path: Path) -> None:
    server = ServerProcess(
        handlers=["probe_service"], pythonpath=[TESTS_DIR], env={"PROBE_EVENTS_DIR": str(tmp_path)}
    ).start()
    try:
        async with await Client.connect(*server.address) as client:
            assert (await client.call(STARTED, b"", timeout=5)).body == b"yes"
            first = int((await client.call(TICKS, b"", timeout=5)).body)
            await asyncio.sleep(0.5)
            later = int((await client.call(TICKS, b"", timeout=5)).body)
        assert later >= first + 4
    finally:
        assert server.stop() == 0
    shutdown_files = list(tmp_path.glob("shutdown-*"))
    assert len(shutdown_files) == 1 and shutdown_files[0].read_text() == "clean"
