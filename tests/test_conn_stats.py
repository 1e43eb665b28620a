"""ConnServer in this process (real rings, real sockets, no worker): every refusal and
limit close is counted in ConnServer.stats by reason."""

import asyncio
import os
import socket

from netclient import connect_from, refused

from aserver.conn.server import ConnServer
from aserver.protocol import PacketCodec
from aserver.settings import from_dict
from aserver.supervisor.child import open_consumer, open_producer
from aserver.supervisor.rings import RingSet


async def test_refusals_and_closes_are_counted_by_reason() -> None:
    settings = from_dict({
        "server": {"max_connections": 3},
        "ring": {"size": 8 * 1024 * 1024},
        "limits": {"max_per_ip": 1, "deny": ["127.0.0.2/32"], "idle_timeout": 0.3, "packet_timeout": 0.3},
    })
    rings = RingSet(f"aserver-stats-{os.getpid()}", 1, 1, settings.ring.size)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    server = ConnServer(settings, 0, 0, [(open_producer(p), open_consumer(c)) for p, c in rings.for_conn(0)],
                        asyncio.get_running_loop())
    try:
        await server.start(listener)
        address = listener.getsockname()
        idle = await connect_from(address, "127.0.0.1")
        assert await refused(await connect_from(address, "127.0.0.1"))  # max_per_ip
        assert await refused(await connect_from(address, "127.0.0.2"))  # deny
        slow = await connect_from(address, "127.0.0.3", preamble=PacketCodec().encode(1, b"abc")[:7])
        third = await connect_from(address, "127.0.0.4")
        assert await refused(await connect_from(address, "127.0.0.5"))  # max_connections
        for client in (idle, slow, third):
            assert await refused(client)  # idle, packet timeout, idle
        stats = server.stats
        assert stats["accepted"] == 3
        assert (stats["refused_max_per_ip"], stats["refused_deny"], stats["refused_max_connections"]) == (1, 1, 1)
        assert (stats["closed_idle"], stats["closed_packet_timeout"]) == (2, 1)
        assert server.per_ip == {}  # every open connection was closed and uncounted
    finally:
        await server.stop(1.0)
        listener.close()
        rings.close()
