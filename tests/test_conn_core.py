"""The conn process's per-request steps: the C ConnCore (aserver/conn/_conn_core.c) does
exactly what the Python one (aserver/conn/conn_core.py) does.

Each example runs the same reads and reply records through two ConnServers in this
process, one whose connections use the C core and one the Python core, each with real
rings (small ones, so runs get split and rings fill up) and fake transports. Everything
observable must match: the records in the request ring and the sender's overflow, what is
in flight, the counters, pauses, and the bytes and closes each transport sees.
"""

from __future__ import annotations

import asyncio
import os
from itertools import count

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aserver.conn import client_protocol, conn_core
from aserver.conn.server import ConnServer
from aserver.ipc import records
from aserver.protocol import ByteOrder, PacketCodec
from aserver.settings import from_dict
from aserver.supervisor.child import open_consumer, open_producer
from aserver.supervisor.rings import RingSet

MAX_PACKET = 4096
RING_SIZE = 64 * 1024  # max_payload 16 KiB: runs of several packets get split; 4 such runs fill it
CONNECTIONS = 3

PythonProtocol = type("PythonClientProtocol", (conn_core.ConnCore, client_protocol.ClientProtocolBase), {})
_names = count()


class FakeTransport:
    def __init__(self, port: int) -> None:
        self.port = port
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", self.port) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.append(b"".join(chunks))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Side:
    """A ConnServer whose connections use one of the two cores, and its request ring's
    far end."""

    def __init__(self, protocol: type, byte_order: ByteOrder) -> None:
        self.loop = asyncio.new_event_loop()
        settings = from_dict({"server": {"max_packet_size": MAX_PACKET, "byte_order": byte_order.value},
                              "ring": {"size": RING_SIZE}})
        self.rings = RingSet(f"aserver-core-{os.getpid()}-{next(_names)}", 1, 1, RING_SIZE)
        ((request_producer, reply_consumer),) = self.rings.for_conn(0)
        ((request_consumer, _reply_producer),) = self.rings.for_worker(0)
        self.server = ConnServer(settings, 0, 1, [(open_producer(request_producer), open_consumer(reply_consumer))],
                                 self.loop)
        self.server.protocol = protocol
        self.far_end = open_consumer(request_consumer)
        self.conns = []
        for i in range(CONNECTIONS):
            conn = protocol(self.server)
            transport = FakeTransport(20_000 + i)
            conn.connection_made(transport)
            self.conns.append((conn, transport))
        self.taken: list[tuple[int, int, bytes]] = []

    def take(self, limit: int = 1_000_000) -> None:
        """Read the request ring as a worker would (what is published so far)."""
        sender = self.server.links[0].sender
        sender.flush()
        batch = self.far_end.read_batch(limit)
        self.far_end.release()
        self.taken += [(kind, conn_id, bytes(payload)) for kind, conn_id, payload in batch]

    def state(self) -> dict:
        link = self.server.links[0]
        return {
            "taken": self.taken,
            "overflow": [(k, c, bytes(p)) for k, c, p in link.sender._overflow],
            "records_sent": link.sender.records_sent,
            "stats": dict(self.server.stats),
            "blocked": sorted(conn.conn_id for conn in link.blocked),
            "conns": [
                {
                    "outstanding": conn.outstanding,
                    "inflight": {worker: [(e.record, e.remaining, bytes(e.run)) for e in queue]
                                 for worker, queue in conn.inflight.items()},
                    "stage": conn.stage,
                    "partial": conn.partial,
                    "buffered": conn._decoder.buffered,
                    "progress": conn.progress,
                    "paused": conn._paused,
                    "close_when_answered": conn.close_when_answered,
                    "replies": list(conn._replies),
                    "written": transport.written,
                    "closed": transport.closed,
                    "reading": transport.reading,
                }
                for conn, transport in self.conns
            ],
        }

    def close(self) -> None:
        link = self.server.links[0]
        link.sender.discard_unread()
        link.sender.close()
        link.receiver.close()
        self.far_end.close()
        self.rings.close()
        self.loop.close()


@pytest.fixture(scope="module")
def c_protocol() -> type:
    if client_protocol.ConnCore is conn_core.ConnCore:
        pytest.skip("the C conn core was not built here (no C compiler at install time)")
    return client_protocol.ClientProtocol


packet_bodies = st.lists(st.integers(0, MAX_PACKET - 18), min_size=1, max_size=12)
# One step: a connection, the packets it sends (body sizes), where the bytes are cut into
# reads, and optionally a bad length put in before a packet.
steps = st.lists(
    st.tuples(st.integers(0, CONNECTIONS - 1), packet_bodies, st.lists(st.integers(1, 40_000), max_size=4),
              st.one_of(st.none(), st.integers(0, 11))),
    min_size=1, max_size=8,
)
# Reply records a worker might send: (connection, requests answered, reply bytes, close).
replies = st.lists(st.tuples(st.integers(0, CONNECTIONS), st.integers(0, 5), st.integers(0, 300), st.booleans()),
                   max_size=12)


def reads_of(codec: PacketCodec, step_index: int, bodies: list[int], cuts: list[int],
             bad_at: int | None) -> list[bytes]:
    packets = [codec.encode(1 + i % 3, bytes([step_index % 256]) * n, seq_num=step_index * 100 + i)
               for i, n in enumerate(bodies)]
    if bad_at is not None and bad_at <= len(packets):
        packets.insert(bad_at, codec.length.pack(MAX_PACKET + 1) + b"x" * 20)
    data = b"".join(packets)
    points = sorted({cut % len(data) for cut in cuts} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(byte_order=st.sampled_from(list(ByteOrder)), script=steps, answers=replies, take_between=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(byte_order=ByteOrder.LITTLE, script=[(0, [10, 20, 30], [], None)], answers=[(0, 3, 60, False)],
         take_between=False)  # the plain case: one read of whole packets, answered
@example(byte_order=ByteOrder.NETWORK, script=[(1, [100], [50], None), (1, [5], [], None)],
         answers=[(1, 1, 10, True)], take_between=False)  # a packet cut short, then a whole one
@example(byte_order=ByteOrder.LITTLE, script=[(0, [4000] * 12, [], None)] * 3, answers=[],
         take_between=False)  # runs split into several records, then a full ring (overflow, pause)
@example(byte_order=ByteOrder.LITTLE, script=[(0, [4000] * 12, [12054, 24108, 36162], None)] * 2, answers=[],
         take_between=False)  # reads of 3 whole packets each until the ring is full
@example(byte_order=ByteOrder.LITTLE, script=[(2, [1, 2], [], 1)], answers=[(2, 1, 0, False)],
         take_between=True)  # a bad length after one good packet
def test_c_and_python_conn_cores_agree(c_protocol, byte_order, script, answers, take_between) -> None:
    codec = PacketCodec(byte_order)
    sides = [Side(c_protocol, byte_order), Side(PythonProtocol, byte_order)]
    try:
        for step_index, (which, bodies, cuts, bad_at) in enumerate(script):
            for data in reads_of(codec, step_index, bodies, cuts, bad_at):
                for side in sides:
                    side.conns[which][0].data_received(data)
            if take_between:
                for side in sides:
                    side.take(limit=2)
        for side in sides:
            side.take()
        assert sides[0].state() == sides[1].state()
        for side in sides:
            batch = []
            for which, acks, size, close in answers:
                conn_id = side.conns[which][0].conn_id if which < CONNECTIONS else 12345  # 12345: gone
                batch.append(((acks << records.ACK_SHIFT) | records.PACKETS, conn_id, b"r" * size))
                if close:
                    batch.append((records.CLOSE, conn_id, b""))
            side.server.on_replies(0, batch)
        assert sides[0].state() == sides[1].state()
    finally:
        for side in sides:
            side.close()


def test_a_read_that_completes_a_cut_packet_is_not_framed_afresh(c_protocol) -> None:
    """A packet's body can look like whole packets: once a read has cut one short, the
    next read must complete it, not be framed from its first byte."""
    codec = PacketCodec()
    inner = codec.encode(7, b"inner", seq_num=2)
    outer = codec.encode(1, inner, seq_num=1)
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conn = side.conns[0][0]
            conn.data_received(outer[:18])  # the header only
            conn.data_received(outer[18:])  # the body: exactly one valid packet
            side.take()
            assert [p for kind, _, p in side.taken if kind == records.PACKETS] == [outer], protocol
            assert conn.outstanding == 1
        finally:
            side.close()


def test_the_c_core_is_what_connections_use_when_built(c_protocol) -> None:
    assert issubclass(c_protocol, client_protocol.ConnCore)
    assert client_protocol.ConnCore.__module__ == "aserver.conn._conn_core"
    assert ConnServer.protocol is c_protocol
