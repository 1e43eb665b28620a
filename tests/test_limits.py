"""Connection limits and admission, tried from outside against the real server:
max_per_ip, allow/deny, the accept hook, idle and packet (slowloris) timeouts."""

import asyncio
import time

import pytest
from netclient import connect_from, refused

from aserver.protocol import PacketCodec
from aserver.testing import ServerProcess

from conftest import TESTS_DIR
from probe_service import ECHO, PEER, PING, SLOW_ECHO

codec = PacketCodec()


@pytest.fixture(scope="module")
def guarded():
    settings = {
        "limits": {
            "max_per_ip": 2,
            "allow": ["127.0.0.1", "127.0.0.2/32", "127.0.0.4/31"],
            "deny": ["127.0.0.2/32"],
            "accept_hook": "probe_service:admit",
        },
    }
    with ServerProcess(handlers=["probe_service"], settings=settings, pythonpath=[TESTS_DIR]) as running:
        yield running


@pytest.fixture(scope="module")
def timed():
    settings = {"limits": {"idle_timeout": 0.6, "packet_timeout": 0.6}}
    with ServerProcess(handlers=["probe_service"], settings=settings, pythonpath=[TESTS_DIR]) as running:
        yield running


async def test_max_per_ip_counts_open_connections_per_address(guarded) -> None:
    first, second = [await connect_from(guarded.address) for _ in range(2)]
    for client in (first, second):
        assert (await client.call(ECHO, b"in", timeout=5)).body == b"in"
    third = await connect_from(guarded.address)
    assert await refused(third)
    guarded.wait_for_log(r"refused 127\.0\.0\.1:\d+: limits\.max_per_ip \(2\) reached")
    await first.close()
    await asyncio.sleep(0.2)
    again = await connect_from(guarded.address)
    assert (await again.call(PEER, timeout=5)).body.startswith(b"127.0.0.1 ")
    for client in (second, again):
        await client.close()


async def test_deny_wins_over_allow(guarded) -> None:
    client = await connect_from(guarded.address, "127.0.0.2")
    assert await refused(client)
    guarded.wait_for_log(r"refused 127\.0\.0\.2:\d+: address in limits\.deny \(127\.0\.0\.2/32\)")


async def test_address_outside_allow_is_refused(guarded) -> None:
    client = await connect_from(guarded.address, "127.0.0.3")
    assert await refused(client)
    guarded.wait_for_log(r"refused 127\.0\.0\.3:\d+: address not in limits\.allow")


async def test_accept_hook_refuses_and_a_failing_hook_refuses_too(guarded) -> None:
    client = await connect_from(guarded.address, "127.0.0.4")
    assert await refused(client)
    guarded.wait_for_log(r"refused 127\.0\.0\.4:\d+: refused by limits\.accept_hook probe_service:admit")
    client = await connect_from(guarded.address, "127.0.0.5")
    assert await refused(client)
    guarded.wait_for_log(r"refused 127\.0\.0\.5:\d+: limits\.accept_hook probe_service:admit raised")
    assert "deliberate accept hook failure" in guarded.log_text()  # the traceback is logged


async def test_silent_connection_is_closed(timed) -> None:
    client = await connect_from(timed.address)
    assert (await client.call(ECHO, b"hi", timeout=5)).body == b"hi"
    started = time.monotonic()
    await client.wait_closed(timeout=5)
    assert 0.5 < time.monotonic() - started < 2.0
    timed.wait_for_log(r"closing 127\.0\.0\.1:\d+ \(connection \w+\): silent for \d+\.\ds \(limits\.idle_timeout\)")


async def test_talking_client_and_waiting_client_stay(timed) -> None:
    talker = await connect_from(timed.address)
    waiter = await connect_from(timed.address)
    # The waiter's request takes longer than idle_timeout: waiting for us is not idle.
    slow = asyncio.ensure_future(waiter.call(SLOW_ECHO, b"1500", timeout=5))
    for _ in range(10):  # 2 s of a ping every 0.2 s
        assert (await talker.call(PING, timeout=5)).body
        await asyncio.sleep(0.2)
    assert (await slow).body == b"1500"
    assert not talker.closed
    await talker.close()
    await waiter.close()


async def test_slowloris_partial_packet_is_closed(timed) -> None:
    client = await connect_from(timed.address)
    packet = codec.encode(ECHO, b"x" * 100, seq_num=1)
    client.send_raw(packet[:10])  # half a header, then nothing: not idle, but stuck
    started = time.monotonic()
    await client.wait_closed(timeout=5)
    assert 0.5 < time.monotonic() - started < 2.0
    timed.wait_for_log(r"packet incomplete after \d+\.\ds \(limits\.packet_timeout\)")


async def test_packets_trickling_in_but_each_completing_in_time_stay(timed) -> None:
    """Many packets sent in pieces, so a packet is often incomplete when the sweep
    looks: only a single packet taking too long counts."""
    client = await connect_from(timed.address)
    stream = b"".join(codec.encode(ECHO, b"%04d" % i, seq_num=i + 1) for i in range(60))
    for offset in range(0, len(stream), 29):  # 29 does not divide 22-byte packets
        client.send_raw(stream[offset : offset + 29])
        await asyncio.sleep(0.05)
    replies = [await client.receive(timeout=5) for _ in range(60)]
    assert [r.body for r in replies] == [b"%04d" % i for i in range(60)]
    assert not client.closed
    await client.close()
