"""The core request path, end to end against the real multi-process server."""

import asyncio
import os
import random
import socket
import struct

import pytest

from aserver import Status
from aserver.client import Client
from aserver.protocol import HEADER_SIZE, PacketCodec
from aserver.testing import ServerProcess

from conftest import MAX_PACKET
from probe_service import (
    BAD_RETURN,
    CLOSE_ME,
    ECHO,
    FAIL,
    HIDDEN_ASYNC,
    SLOW_ECHO,
    STATUS,
    TRIPLE,
    WHO,
    ZERO_COPY,
)

codec = PacketCodec()


async def test_echo_round_trip(server) -> None:
    async with await Client.connect(*server.address) as client:
        reply = await client.call(ECHO, b"hello", user_id=42, timeout=5)
    assert (reply.cmd_id, reply.status_code, reply.user_id, reply.body) == (ECHO, 0, 42, b"hello")
    assert reply.seq_num == 1


async def test_thousand_requests_in_one_write(server) -> None:
    async with await Client.connect(*server.address) as client:
        requests = [(ECHO, os.urandom(i % 97), i) for i in range(1000)]
        replies = await client.call_many(requests, timeout=10)
    assert [(r.body, r.user_id) for r in replies] == [(body, user) for _, body, user in requests]


def _raw_connect(server) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _read_packet(sock: socket.socket):
    header = _recv_exact(sock, HEADER_SIZE)
    (length,) = struct.unpack_from("<I", header)
    return codec.decode(header + _recv_exact(sock, length - HEADER_SIZE))


def test_packet_sent_one_byte_at_a_time(server) -> None:
    packet = codec.encode(ECHO, b"trickle" * 5, seq_num=77, user_id=3)
    with _raw_connect(server) as sock:
        for i in range(len(packet)):
            sock.sendall(packet[i : i + 1])
        reply = _read_packet(sock)
    assert (reply.seq_num, reply.user_id, reply.body) == (77, 3, b"trickle" * 5)


def _is_closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("bad_length", [0, 17, MAX_PACKET + 1])
async def test_bad_length_closes_only_that_connection(server, bad_length: int) -> None:
    async with await Client.connect(*server.address) as bystander:
        assert (await bystander.call(ECHO, b"before", timeout=5)).body == b"before"
        with _raw_connect(server) as sock:
            sock.sendall(struct.pack("<I", bad_length) + b"\0" * 14)
            assert await asyncio.to_thread(_is_closed_by_server, sock)
        replies = await bystander.call_many([(ECHO, b"after", 1)] * 50, timeout=5)
        assert all(r.body == b"after" for r in replies)
    server.wait_for_log(rf"protocol error: packet length {bad_length} outside")


async def test_maximum_size_packet_echoes_intact(server) -> None:
    body = os.urandom(MAX_PACKET - HEADER_SIZE)
    async with await Client.connect(*server.address) as client:
        replies = await client.call_many([(ECHO, body, 9)] * 3, timeout=10)
    assert all(r.body == body for r in replies)


async def test_unknown_command_gets_error_status(server) -> None:
    async with await Client.connect(*server.address) as client:
        reply = await client.call(999, b"x", user_id=5, timeout=5)
        assert (reply.cmd_id, reply.status_code, reply.user_id) == (999, Status.UNKNOWN_COMMAND, 5)
        assert (await client.call(ECHO, b"still here", timeout=5)).body == b"still here"


async def test_handler_exception_gets_error_reply_and_worker_lives(server) -> None:
    async with await Client.connect(*server.address) as client:
        for _ in range(3):
            reply = await client.call(FAIL, b"", timeout=5)
            assert reply.status_code == Status.HANDLER_ERROR
        bad = await client.call(BAD_RETURN, b"", timeout=5)
        assert bad.status_code == Status.HANDLER_ERROR
        hidden = await client.call(HIDDEN_ASYNC, b"", timeout=5)
        assert hidden.status_code == Status.HANDLER_ERROR
        # the same when it waits behind an async request (not run inline)
        behind = await client.call_many([(SLOW_ECHO, b"20", 0), (HIDDEN_ASYNC, b"", 0)], timeout=5)
        assert [r.status_code for r in behind] == [0, Status.HANDLER_ERROR]
        assert (await client.call(ECHO, b"alive", timeout=5)).body == b"alive"
    line = server.wait_for_log(r"handler fail failed on cmd_id 3")
    assert "HANDLER_ERROR" in line
    server.wait_for_log(r"RuntimeError: deliberate failure for a test")
    server.wait_for_log(r"handler returned a coroutine: declare it `async def`")


async def test_reply_object_sets_status(server) -> None:
    async with await Client.connect(*server.address) as client:
        reply = await client.call(STATUS, b"", timeout=5)
    assert (reply.status_code, reply.body) == (1234, b"custom")


async def test_handler_can_send_several_replies_and_later(server) -> None:
    async with await Client.connect(*server.address) as client:
        first = await client.call(TRIPLE, b"", timeout=5)
        second = await client.receive(timeout=5)
        third = await client.receive(timeout=5)
    assert [first.body, second.body, third.body] == [b"one", b"two", b"three"]
    assert third.user_id == 7 and third.seq_num == first.seq_num


async def test_handler_can_close_its_client(server) -> None:
    client = await Client.connect(*server.address)
    with pytest.raises(ConnectionError):
        await client.call(CLOSE_ME, b"", timeout=5)
    await client.wait_closed(timeout=5)


async def _ordered_client(server, index: int) -> int:
    rng = random.Random(index)
    async with await Client.connect(*server.address) as client:
        sent = 0
        for _ in range(5):
            batch = [(ECHO, rng.randbytes(rng.randrange(0, 300)), index) for _ in range(rng.randrange(1, 40))]
            first_seq = client._next_seq + 1
            replies = await client.call_many(batch, timeout=20)
            assert [r.seq_num for r in replies] == list(range(first_seq, first_seq + len(batch)))
            assert [(r.body, r.user_id, r.status_code) for r in replies] == [(b, u, 0) for _, b, u in batch]
            sent += len(batch)
        return sent


async def test_two_workers_200_clients_in_order(server) -> None:
    totals = await asyncio.gather(*(_ordered_client(server, i) for i in range(200)))
    assert sum(totals) > 200


async def test_replies_arrive_in_request_order_on_a_connection(server) -> None:
    """Pipelined requests are answered in order even when the first is the slowest:
    ECHO (a sync handler, normally run inline) waits behind SLOW_ECHO (async), whether
    it arrives in the same read or while SLOW_ECHO runs."""
    async with await Client.connect(*server.address) as client:
        client.send_raw(
            codec.encode(SLOW_ECHO, b"0200", seq_num=1)
            + codec.encode(ECHO, b"fast", seq_num=2)
            + codec.encode(SLOW_ECHO, b"0010", seq_num=3)
        )
        await asyncio.sleep(0.05)
        client.send_raw(codec.encode(ECHO, b"later", seq_num=4) + codec.encode(ECHO, b"x", seq_num=5))
        received = [await client.receive(timeout=5) for _ in range(5)]
    assert [p.seq_num for p in received] == [1, 2, 3, 4, 5]
    assert [p.body for p in received] == [b"0200", b"fast", b"0010", b"later", b"x"]


async def test_connections_are_spread_over_both_workers(server) -> None:
    pids = set()
    for _ in range(6):
        async with await Client.connect(*server.address) as client:
            pids.add((await client.call(WHO, b"", timeout=5)).body.split()[0])
    assert len(pids) == 2


async def test_handler_hit_by_a_foreign_cancellation_gets_an_error_reply(server) -> None:
    async with await Client.connect(*server.address) as client:
        for _ in range(300):  # more than the worker's consumer tasks: none may be lost
            reply = await client.call(13, b"", timeout=5)
            assert reply.status_code == Status.HANDLER_ERROR
        assert (await client.call(ECHO, b"still served", timeout=5)).body == b"still served"


async def test_a_zero_copy_handler_gets_the_ring_itself_and_a_kept_body_is_released(server) -> None:
    """Through the real worker (its handler module loaded and merged): the body is a
    memoryview, and the one a handler kept from its last request raises when used. The
    echo first: a connection's first request may wait behind its on_connect hook, and a
    request that waited gets a view of its own copy, which is not released."""
    bodies = [os.urandom(16384), b"x", os.urandom(MAX_PACKET - HEADER_SIZE - 100)]
    async with await Client.connect(*server.address) as client:
        await client.call(ECHO, b"", timeout=5)
        replies = [await client.call(ZERO_COPY, body, timeout=5) for body in bodies]
    assert all(r.body.startswith(b"memoryview ") for r in replies)  # the first: whatever this worker ran before
    assert [r.body for r in replies[1:]] == [b"memoryview released " + body for body in bodies[1:]]
    assert replies[0].body.endswith(b" " + bodies[0])


async def test_the_pure_python_path_serves_the_same() -> None:
    """ASERVER_PURE_PYTHON=1: the server runs without its C modules (as where none could
    be built) and still answers every request, in order, over several connections."""
    with ServerProcess(env={"ASERVER_PURE_PYTHON": "1"}) as server:
        assert "pure Python" in server.wait_for_log("aserver ready")
        clients = [await Client.connect(*server.address) for _ in range(3)]
        try:
            batches = [[(1, os.urandom(i % 300), i) for i in range(400)] for _ in clients]
            replies = await asyncio.gather(*(c.call_many(b, timeout=10) for c, b in zip(clients, batches, strict=True)))
        finally:
            for client in clients:
                await client.close()
    for batch, got in zip(batches, replies, strict=True):
        assert [(r.status_code, r.body, r.user_id) for r in got] == [(0, body, user) for _, body, user in batch]
