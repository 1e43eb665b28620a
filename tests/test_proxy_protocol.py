"""PROXY protocol v1/v2 on the listener, against the real server: handlers see the real
client address, admission applies to it, bad or missing headers close the connection."""

import asyncio
import ipaddress
import struct
import time

import pytest
from netclient import connect_from, local_port, refused

from aserver.protocol import PacketCodec
from aserver.protocol.proxy_header import V2_SIGNATURE
from aserver.testing import ServerProcess

from conftest import TESTS_DIR
from probe_service import ECHO, PEER, PING

codec = PacketCodec()


def v1(src: str, sport: int, proto: str = "TCP4", dst: str = "10.0.0.1", dport: int = 7000) -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 7000, *, local: bool = False) -> bytes:
    if local:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    block = a.packed + b.packed + struct.pack("!HH", sport, dport)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # a NOOP TLV, as HAProxy may send
    family = 0x11 if a.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block) + len(tlv)) + block + tlv


@pytest.fixture(scope="module")
def proxied():
    settings = {
        "proxy_protocol": {"enabled": True, "trusted": ["127.0.0.1/32"], "header_timeout": 0.5},
        "limits": {"deny": ["203.0.113.66/32"], "max_per_ip": 1},
    }
    with ServerProcess(handlers=["probe_service"], workers=2, settings=settings, pythonpath=[TESTS_DIR]) as running:
        yield running


async def peer_of(client) -> str:
    return (await client.call(PEER, timeout=5)).body.decode()


async def test_v1_header_gives_handlers_the_real_client(proxied) -> None:
    async with await connect_from(proxied.address, preamble=v1("203.0.113.7", 4242)) as client:
        assert await peer_of(client) == "203.0.113.7 4242"
        # The in-conn path sees it too.
        assert (await client.call(PING, b"z", timeout=5)).body.endswith(b" 203.0.113.7 4242 z")


async def test_v2_ipv4_and_ipv6_with_packets_in_the_same_write(proxied) -> None:
    header = v2("198.51.100.9", 5151)
    client = await connect_from(proxied.address, preamble=header + codec.encode(ECHO, b"same write", seq_num=900))
    assert (await client.receive(timeout=5)).body == b"same write"
    assert await peer_of(client) == "198.51.100.9 5151"
    await client.close()
    async with await connect_from(proxied.address, preamble=v2("2001:db8::5", 6000, "2001:db8::1")) as client:
        assert await peer_of(client) == "2001:db8::5 6000"


async def test_header_split_byte_by_byte(proxied) -> None:
    client = await connect_from(proxied.address)
    for byte in v2("192.0.2.44", 4444):
        client.send_raw(bytes([byte]))
        await asyncio.sleep(0.001)
    assert await peer_of(client) == "192.0.2.44 4444"
    await client.close()


async def test_local_command_keeps_the_socket_peer(proxied) -> None:
    """HAProxy health checks (check-send-proxy) send LOCAL: the proxy itself connects."""
    async with await connect_from(proxied.address, preamble=v2("", 0, local=True)) as client:
        assert await peer_of(client) == f"127.0.0.1 {local_port(client)}"


async def test_untrusted_peer_is_refused(proxied) -> None:
    client = await connect_from(proxied.address, "127.0.0.2", preamble=v1("203.0.113.7", 4242))
    assert await refused(client)
    proxied.wait_for_log(r"refused 127\.0\.0\.2:\d+: PROXY protocol is on and the peer is not in proxy_protocol")


async def test_malformed_header_is_refused(proxied) -> None:
    client = await connect_from(proxied.address, preamble=codec.encode(ECHO, b"no header"))
    assert await refused(client)
    proxied.wait_for_log(r"refused 127\.0\.0\.1:\d+: bad PROXY header: not a PROXY protocol header")
    client = await connect_from(proxied.address, preamble=b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
    assert await refused(client)
    proxied.wait_for_log(r"bad PROXY header: PROXY v1: bad port '99999'")


async def test_missing_header_times_out(proxied) -> None:
    client = await connect_from(proxied.address)
    started = time.monotonic()
    assert await refused(client)
    assert 0.4 < time.monotonic() - started < 2.0
    proxied.wait_for_log(r"no PROXY header within proxy_protocol\.header_timeout \(0\.5s\)")


async def test_admission_uses_the_real_address(proxied) -> None:
    denied = await connect_from(proxied.address, preamble=v1("203.0.113.66", 1000))
    assert await refused(denied)
    proxied.wait_for_log(r"refused 203\.0\.113\.66:1000: address in limits\.deny")
    # max_per_ip = 1, counted per real client, although every socket comes from 127.0.0.1.
    first = await connect_from(proxied.address, preamble=v1("192.0.2.1", 1001))
    other = await connect_from(proxied.address, preamble=v1("192.0.2.2", 1002))
    assert await peer_of(first) == "192.0.2.1 1001"
    assert await peer_of(other) == "192.0.2.2 1002"
    second = await connect_from(proxied.address, preamble=v1("192.0.2.1", 1003))
    assert await refused(second)
    proxied.wait_for_log(r"refused 192\.0\.2\.1:1003: limits\.max_per_ip \(1\) reached")
    await first.close()
    await other.close()
