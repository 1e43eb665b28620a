"""Connection events and connection identity across close and fd reuse."""

import asyncio
import time
from pathlib import Path

from aserver.client import Client
from aserver.protocol import PacketCodec

from probe_service import ECHO, SLOW_ECHO

codec = PacketCodec()


def _events(events_dir: Path) -> dict[str, list[str]]:
    """Events per worker pid file."""
    return {f.stem: f.read_text().splitlines() for f in events_dir.glob("*.log")}


async def test_connect_and_disconnect_hooks_run_in_every_worker(server, events_dir: Path) -> None:
    async with await Client.connect(*server.address) as client:
        await client.call(ECHO, b"x", timeout=5)
        local_port = client._transport.get_extra_info("sockname")[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        per_worker = _events(events_dir)
        mine = {
            pid: [line.split()[0] for line in lines if line.endswith(f" {local_port}")]
            for pid, lines in per_worker.items()
        }
        if len(mine) == 2 and all(v == ["connect", "disconnect"] for v in mine.values()):
            break
        await asyncio.sleep(0.05)
    assert len(mine) == 2, per_worker
    assert all(v == ["connect", "disconnect"] for v in mine.values()), mine


async def test_replies_in_flight_never_reach_a_later_connection(server) -> None:
    """A client leaves with slow replies pending; new clients (which may get the same fd
    in the conn process) must see only their own replies."""
    for round_ in range(5):
        leaver = await Client.connect(*server.address)
        leaver.send_raw(b"".join(codec.encode(SLOW_ECHO, b"0150-leaver", seq_num=s) for s in range(1, 21)))
        await asyncio.sleep(0.01)
        await leaver.close()
        newcomers = [await Client.connect(*server.address) for _ in range(3)]
        for i, client in enumerate(newcomers):
            replies = await client.call_many([(ECHO, f"mine-{round_}-{i}".encode(), i)] * 5, timeout=5)
            assert all(r.body == f"mine-{round_}-{i}".encode() for r in replies)
        await asyncio.sleep(0.3)  # the leaver's slow replies are all produced by now
        for client in newcomers:
            assert client.unsolicited.empty(), await client.receive()
            await client.close()
