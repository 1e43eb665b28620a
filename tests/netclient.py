"""Clients for tests that need a chosen source address (127.0.0.0/8 is all loopback on
Linux, so 127.0.0.2, 127.0.0.3, ... are distinct client IPs) or raw bytes before packets."""

from __future__ import annotations

import asyncio

from aserver.client import Client, ClientProtocol
from aserver.protocol import PacketCodec


async def connect_from(address: tuple[str, int], source: str = "127.0.0.1", preamble: bytes = b"") -> Client:
    """A Client bound to `source`, which first sends `preamble` (e.g. a PROXY header)."""
    client = Client(PacketCodec(), 64 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: ClientProtocol(client), *address, local_addr=(source, 0))
    if preamble:
        client.send_raw(preamble)
    return client


async def refused(client: Client, timeout: float = 5.0) -> bool:
    """True once the server closed the connection (without answering anything)."""
    try:
        await client.wait_closed(timeout=timeout)
    except TimeoutError:
        return False
    return True


def local_port(client: Client) -> int:
    assert client._transport is not None
    return client._transport.get_extra_info("sockname")[1]
