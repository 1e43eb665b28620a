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
import functools
import gc
import os
import socket
import tracemalloc
from itertools import count

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aserver.app import Status
from aserver.conn import client_protocol, conn_core
from aserver.conn.server import ConnServer
from aserver.ipc import records
from aserver.protocol import HEADER_SIZE, ByteOrder, PacketCodec, iter_packets
from aserver.settings import from_dict
from aserver.supervisor.child import open_consumer, open_producer
from aserver.supervisor.rings import RingSet

MAX_PACKET = 4096
RING_SIZE = 64 * 1024  # max_payload 16 KiB: runs of several packets get split; 4 such runs fill it
CONNECTIONS = 3
WORKERS = 2  # connections 0 and 2 go to worker 0, connection 1 to worker 1
MAX_REPLY_BACKLOG = 64 * 1024

PythonProtocol = type("PythonClientProtocol", (conn_core.ConnCore, client_protocol.ClientProtocolBase), {})
_names = count()


def feed(conn, data: bytes) -> None:
    """What the event loop does with bytes that arrive: read them into the buffer the
    protocol gives (as many reads as that takes), then say how much came. Each read is
    preceded by one that found nothing (uvloop asks for a buffer, reads EAGAIN, and lets
    the buffer go without buffer_updated)."""
    while data:
        conn.get_buffer(-1)
        buffer = conn.get_buffer(-1)
        took = min(len(buffer), len(data))
        buffer[:took] = data[:took]
        del buffer  # the loop lets go of it before buffer_updated
        conn.buffer_updated(took)
        data = data[took:]


class FakeTransport:
    def __init__(self, port: int) -> None:
        self.port = port
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True
        self.eof = False
        self.backlog = 0  # what get_write_buffer_size says: the client reads nothing if large

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", self.port) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.append(b"".join(chunks))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Side:
    """A ConnServer whose connections use one of the two cores, and the far ends of its
    request rings."""

    def __init__(self, protocol: type, byte_order: ByteOrder, ring_size: int = RING_SIZE) -> None:
        self.loop = asyncio.new_event_loop()
        settings = from_dict({"server": {"max_packet_size": MAX_PACKET, "byte_order": byte_order.value,
                                         "max_reply_backlog": MAX_REPLY_BACKLOG},
                              "ring": {"size": ring_size}})
        self.rings = RingSet(f"aserver-core-{os.getpid()}-{next(_names)}", 1, WORKERS, ring_size)
        links = [(open_producer(p), open_consumer(c)) for p, c in self.rings.for_conn(0)]
        self.server = ConnServer(settings, 0, 1, links, self.loop)
        self.server.protocol = protocol
        self.far_ends = [open_consumer(self.rings.for_worker(w)[0][0]) for w in range(WORKERS)]
        self.conns = []
        for i in range(CONNECTIONS):
            conn = protocol(self.server)
            transport = FakeTransport(20_000 + i)
            conn.connection_made(transport)
            self.conns.append((conn, transport))
        self.taken: list[list[tuple[int, int, bytes]]] = [[] for _ in range(WORKERS)]

    def take(self, limit: int = 1_000_000) -> None:
        """Read the request rings as the workers would (what is published so far)."""
        for link, far_end, taken in zip(self.server.links, self.far_ends, self.taken, strict=True):
            link.sender.flush()
            taken += [(kind, conn_id, bytes(payload)) for kind, conn_id, payload in far_end.read_batch(limit)]
            far_end.release()

    def check_record_numbers(self) -> None:
        """Every run in flight names the ring record that carries it (taken or waiting)."""
        for conn, _ in self.conns:
            for worker, record, _remaining, headers in conn.in_flight():
                sender = self.server.links[worker].sender
                sent = self.taken[worker] + list(sender._overflow)
                assert len(sent) == sender.records_sent
                kind, conn_id, payload = sent[record]
                assert (kind, conn_id) == (records.PACKETS, conn.conn_id)
                assert conn_core.packet_headers(payload, len(headers) // HEADER_SIZE, conn.big_endian) == headers

    def state(self) -> dict:
        return {
            "taken": self.taken,
            "links": [{"overflow": [(k, c, bytes(p)) for k, c, p in link.sender._overflow],
                       "records_sent": link.sender.records_sent,
                       "blocked": sorted(conn.conn_id for conn in link.blocked)} for link in self.server.links],
            "stats": dict(self.server.stats),
            "conns": [
                {
                    "outstanding": conn.outstanding,
                    "inflight": conn.in_flight(),
                    "stage": conn.stage,
                    "partial": conn.partial,
                    "buffered": conn._decoder.buffered,
                    "progress": conn.progress,
                    "paused": conn._paused,
                    "close_when_answered": conn.close_when_answered,
                    "replies": list(conn._replies),
                    "written": transport.written,
                    "closed": transport.closed,
                    "eof": transport.eof,
                    "reading": transport.reading,
                }
                for conn, transport in self.conns
            ],
        }

    def close(self) -> None:
        for link in self.server.links:
            link.sender.discard_unread()
            link.requests.release()
            link.sender.close()
            link.receiver.close()
        for far_end in self.far_ends:
            far_end.close()
        self.rings.close()
        self.loop.close()


@pytest.fixture(scope="module")
def c_protocol() -> type:
    if client_protocol.ConnCore is conn_core.ConnCore:
        pytest.skip("the C conn core was not built here (no C compiler at install time)")
    return client_protocol.ClientProtocol


packet_bodies = st.lists(st.integers(0, MAX_PACKET - 18), min_size=1, max_size=12)
# A length no packet may have: below the header, or above max_packet_size.
bad_lengths = st.sampled_from([0, 4, 10, 17, MAX_PACKET + 1, 0xFFFFFFFF])
# One step: a connection, the packets it sends (body sizes), where the bytes are cut into
# reads, and optionally a bad length put in before one of the packets.
steps = st.lists(
    st.tuples(st.integers(0, CONNECTIONS - 1), packet_bodies, st.lists(st.integers(1, 40_000), max_size=4),
              st.one_of(st.none(), st.tuples(st.integers(0, 11), bad_lengths))),
    min_size=1, max_size=8,
)
# Reply records a worker might send: (connection, requests answered, reply bytes, close).
replies = st.lists(st.tuples(st.integers(0, CONNECTIONS), st.integers(0, 5), st.integers(0, 300), st.booleans()),
                   max_size=12)
# Per connection before the replies arrive: its client reads nothing (a backlog past the
# limit), the server is stopping for it (finish: EOF sent), or neither.
conditions = st.lists(st.sampled_from(["", "backlogged", "finished"]), min_size=CONNECTIONS, max_size=CONNECTIONS)


def reads_of(codec: PacketCodec, step_index: int, bodies: list[int], cuts: list[int],
             bad: tuple[int, int] | None) -> list[bytes]:
    packets = [codec.encode(1 + i % 3, bytes([step_index % 256]) * n, seq_num=step_index * 100 + i)
               for i, n in enumerate(bodies)]
    if bad is not None and bad[0] <= len(packets):
        packets.insert(bad[0], codec.length.pack(bad[1]) + b"x" * 20)
    data = b"".join(packets)
    points = sorted({cut % len(data) for cut in cuts} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(byte_order=st.sampled_from(list(ByteOrder)), script=steps, answers=replies, take_between=st.booleans(),
       before_replies=conditions)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(byte_order=ByteOrder.LITTLE, script=[(0, [10, 20, 30], [], None)], answers=[(0, 3, 60, False)],
         take_between=False, before_replies=["", "", ""])  # the plain case: one read of whole packets, answered
@example(byte_order=ByteOrder.NETWORK, script=[(1, [100], [50], None), (1, [5], [], None)],
         answers=[(1, 1, 10, True)], take_between=False,
         before_replies=["", "", ""])  # a packet cut short, then a whole one
@example(byte_order=ByteOrder.LITTLE, script=[(0, [4000] * 12, [], None)] * 3, answers=[],
         take_between=False, before_replies=["", "", ""])  # runs split into several records, then a full ring
@example(byte_order=ByteOrder.LITTLE, script=[(0, [4000] * 12, [12054, 24108, 36162], None)] * 2, answers=[],
         take_between=False, before_replies=["", "", ""])  # reads of 3 whole packets each until the ring is full
@example(byte_order=ByteOrder.LITTLE, script=[(2, [1, 2], [], (1, 10))], answers=[(2, 1, 0, False)],
         take_between=True, before_replies=["", "", ""])  # a length below the header after one good packet
@example(byte_order=ByteOrder.NETWORK, script=[(0, [1], [], None), (1, [1], [], None)],
         answers=[(0, 1, 10, False), (1, 1, 10, False)], take_between=False,
         before_replies=["backlogged", "finished", ""])  # one client reads nothing, one is being stopped
def test_c_and_python_conn_cores_agree(c_protocol, byte_order, script, answers, take_between,
                                       before_replies) -> None:
    codec = PacketCodec(byte_order)
    sides = [Side(c_protocol, byte_order), Side(PythonProtocol, byte_order)]
    try:
        for step_index, (which, bodies, cuts, bad) in enumerate(script):
            for data in reads_of(codec, step_index, bodies, cuts, bad):
                for side in sides:
                    feed(side.conns[which][0], data)
            if take_between:
                for side in sides:
                    side.take(limit=2)
        for side in sides:
            side.take()
            side.check_record_numbers()
        assert sides[0].state() == sides[1].state()
        for side in sides:
            for (conn, transport), condition in zip(side.conns, before_replies, strict=True):
                if condition == "backlogged":
                    transport.backlog = MAX_REPLY_BACKLOG + 1
                elif condition == "finished":
                    conn.finish()
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


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("sent"), st.integers(0, 2), st.integers(0, 5)),  # worker, requests in the run
            st.tuples(st.just("answered"), st.integers(0, 2), st.integers(0, 8)),  # worker, requests
            st.tuples(st.just("take_inflight"), st.integers(0, 2)),  # that worker died
        ),
        max_size=40,
    ),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(ops=[("sent", 0, 2), ("sent", 1, 1), ("sent", 0, 1), ("answered", 0, 3), ("answered", 1, 1)])
@example(ops=[("sent", 0, 2), ("sent", 1, 3), ("answered", 1, 1), ("take_inflight", 0), ("answered", 1, 2)])
@example(ops=[("sent", 1, 1), ("sent", 0, 1), ("answered", 0, 1), ("take_inflight", 0), ("answered", 1, 1)])
def test_c_and_python_cores_count_runs_in_flight_alike(c_protocol, ops) -> None:
    """Runs in flight per worker, interleaved as per-packet routing sends them: each
    worker's answers finish its own oldest runs; a dead worker's unanswered runs are
    handed over (and forgotten) without disturbing the others'."""
    codec = PacketCodec()
    cores = [client_protocol.ConnCore(), conn_core.ConnCore()]
    for core in cores:
        core.outstanding = 0
        core.big_endian = False
    for serial, op in enumerate(ops):
        answers = []
        for core in cores:
            if op[0] == "sent":
                run = b"".join(codec.encode(1, b"x" * i, seq_num=serial * 10 + i) for i in range(op[2]))
                core.sent(op[1], serial, op[2], run)
            elif op[0] == "answered":
                core.answered(op[1], op[2])
            else:
                answers.append([tuple(entry) for entry in core.take_inflight(op[1])])
            answers.append((core.in_flight(), core.outstanding))
        assert answers[: len(answers) // 2] == answers[len(answers) // 2 :], op


RUN_OF_5 = b"".join(PacketCodec().encode(1, b"x", seq_num=i) for i in range(5))  # headers past an entry's 40 bytes


def new_c_core():
    core = client_protocol.ConnCore()
    core.outstanding, core.big_endian = 0, False
    return core


def churn_runs_in_flight() -> None:
    core = new_c_core()
    for record in range(8):  # past the two runs kept in the object, two workers interleaved
        core.sent(record % 2, record, 5, RUN_OF_5)
    core.answered(0, 5)  # the front run answered: dropped
    core.take_inflight(1)  # worker 1 died: its runs are handed over and dropped here
    with pytest.raises(ValueError):
        core.sent(0, 99, 5, RUN_OF_5[:-1])  # the fifth packet cut short
    core.answered(0, 10)
    del core  # what is left, and the grown array, go with the object


def test_the_c_core_frees_what_its_runs_in_flight_held(c_protocol) -> None:
    churn_runs_in_flight()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            churn_runs_in_flight()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 8000, grown  # one leaked run's headers (90 bytes) per churn would be 27 kB


def test_a_run_the_c_core_cannot_allocate_for_changes_nothing(c_protocol) -> None:
    _testcapi = pytest.importorskip("_testcapi")
    core = new_c_core()
    core.sent(0, 0, 5, RUN_OF_5)
    core.sent(0, 1, 1, RUN_OF_5)  # the two runs kept in the object are taken
    state = (core.in_flight(), core.outstanding)
    failures = 0
    for nth in range(10):  # fail the nth allocation: the array's growth, then the headers'
        error = None
        _testcapi.set_nomemory(nth, nth + 1)
        try:
            core.sent(1, 2, 5, RUN_OF_5)
        except MemoryError as exc:
            error = exc
        finally:
            _testcapi.remove_mem_hooks()
        if error is None:
            break
        failures += 1
        assert (core.in_flight(), core.outstanding) == state
    assert failures == 2
    core.answered(0, 6)
    assert [run[:3] for run in core.in_flight()] == [(1, 2, 5)]


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_run_is_committed_weighing_its_requests(c_protocol, core) -> None:
    """A read of 3 requests is one record that counts 3 towards waking a sleeping worker."""
    codec = PacketCodec(ByteOrder.NETWORK)
    side = Side(c_protocol if core == "c" else PythonProtocol, ByteOrder.NETWORK)
    try:
        conn = side.conns[0][0]
        writer = side.server.links[conn.worker].sender._writer
        writer.publish()
        records_before = writer.records_written
        feed(conn, b"".join(codec.encode(1, b"a" * 10, seq_num=i) for i in range(3)))
        assert (writer.unpublished_weight, writer.records_written - records_before) == (3, 1)
    finally:
        side.close()


def test_runs_that_wait_for_a_full_ring_pause_their_connection_and_are_counted(c_protocol) -> None:
    codec = PacketCodec()
    run = b"".join(codec.encode(1, b"x" * 4000, seq_num=i) for i in range(4))  # 16 KiB: a quarter of the ring
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conn, transport = side.conns[0]
            for _ in range(6):  # four fill the ring, two wait
                feed(conn, run)
            assert (transport.reading, side.server.stats["ring_full"]) == (False, 2), protocol
            side.take()
            side.server.links[0].sender._on_space()  # the worker made room: the waiting runs go in
            assert (transport.reading, side.server.stats["ring_full"]) == (True, 2), protocol
        finally:
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
            feed(conn, outer[:18])  # the header only
            feed(conn, outer[18:])  # the body: exactly one valid packet
            side.take()
            assert [p for kind, _, p in side.taken[0] if kind == records.PACKETS] == [outer], protocol
            assert conn.outstanding == 1
        finally:
            side.close()


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_clean_read_goes_straight_into_the_ring(c_protocol, core) -> None:
    """A read of whole packets lands in the pinned worker's ring and is committed there
    (else every read would go through the general path, and the comparison above could
    not tell); a read after a cut packet, or with no room in the ring, goes to the scratch
    buffer and the general path."""
    general = []

    class Counting(c_protocol if core == "c" else PythonProtocol):
        def receive(self, data: bytes) -> None:
            general.append(bytes(data))
            super().receive(data)

    codec = PacketCodec(ByteOrder.NETWORK)
    side = Side(Counting, ByteOrder.NETWORK)
    try:
        first, second = side.conns[0][0], side.conns[1][0]
        room = first.get_buffer(-1)
        assert room.obj is side.server.links[0].sender._writer._buf.obj and not room.readonly  # the ring itself
        del room
        clean = codec.encode(1, b"a" * 100, seq_num=1) + codec.encode(2, b"", seq_num=2)
        feed(first, clean)
        feed(second, clean)
        third = side.conns[2][0]
        feed(third, clean)  # a third connection: worker 0 again
        assert general == []
        assert (first.outstanding, second.outstanding, side.server.stats["requests"]) == (2, 2, 6)
        assert [{run[0] for run in conn.in_flight()} for conn in (first, second, third)] == [{0}, {1}, {0}]
        cut = codec.encode(3, b"b" * 50, seq_num=3)
        feed(first, cut[:30])  # cut short: the general path keeps the start
        assert first.get_buffer(-1) is first.scratch
        feed(first, cut[30:])  # completes it: still the general path
        short = codec.length.pack(10) + b"x" * 6
        feed(second, short)  # a length below the header: the general path says why
        assert general == [cut[:30], cut[30:], short]
        assert side.server.stats["protocol_errors"] == 1
        side.take()
        packets = [[(conn_id, p) for k, conn_id, p in taken if k == records.PACKETS] for taken in side.taken]
        assert packets == [[(first.conn_id, clean), (third.conn_id, clean), (first.conn_id, cut)],
                           [(second.conn_id, clean)]]
        big = b"".join(codec.encode(1, b"x" * 4000, seq_num=i) for i in range(4))
        while not side.server.links[0].sender.backlogged:
            feed(third, big)
        assert third.get_buffer(-1) is third.scratch  # runs wait for room: this one goes behind them
    finally:
        side.close()


def test_replies_go_straight_to_the_socket_and_the_rest_through_the_transport(c_protocol) -> None:
    """While the transport holds nothing, replies are written to the socket directly
    (reply views never reach the transport); what the socket does not take goes to the
    transport as one copy, and so does everything after it until the transport is empty.
    A closing transport gets nothing, a failed socket leaves the error to the transport.
    No reply's buffer stays pinned after its flush."""
    seen = []
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            conn, transport = side.conns[0]
            conn.fd = ours.fileno()
            steps = []

            def flush(*replies: bytes | bytearray | memoryview, conn=conn, transport=transport, steps=steps,
                      peer=peer) -> tuple[bytes, list[bytes], bool]:
                before = len(transport.written)
                for reply in replies:
                    conn.queue_reply(reply)
                conn.flush_replies()
                for reply in replies:
                    if isinstance(reply, bytearray):
                        reply.extend(b"!")  # BufferError if a buffer of it was not released
                steps.append((drain(peer), transport.written[before:], conn.handed_over))
                return steps[-1]

            flush(b"a" * 100, memoryview(b"b" * 50), bytearray(b"h" * 10))  # all to the socket
            many = [bytes([i]) * 10 for i in range(100)]  # more than one system call's worth
            assert flush(*many) == (b"".join(many), [], False)
            big = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
            took, (rest,), _ = flush(b"c" * 10, memoryview(big))
            assert 10 < len(took) < len(big) and took + rest == b"c" * 10 + big
            transport.backlog = 5  # the transport still holds some: after it, in order
            flush(b"d" * 10, bytearray(b"h" * 10))
            transport.backlog = 0  # it wrote everything: straight to the socket again
            flush(b"e" * 10)
            parts = [bytes([i]) * 2048 for i in range(100)]  # the socket takes some of the first 64
            took_parts, (rest_parts,), _ = flush(*parts[:50], bytearray(b"h" * 10), *parts[50:])
            assert took_parts + rest_parts == b"".join(parts[:50]) + b"h" * 10 + b"".join(parts[50:])
            assert 0 < len(took_parts) < 64 * 2048
            transport.backlog = 0
            transport.closed = True  # closing: the socket may be gone already
            flush(b"f" * 10)
            transport.closed = False
            peer.close()  # the client is gone: the transport meets the error and closes
            flush(b"g" * 10)
            assert [(len(took), [len(w) for w in written], handed) for took, written, handed in steps] == [
                (160, [], False), (1000, [], False), (len(took), [len(rest)], True), (0, [20], True),
                (10, [], False), (len(took_parts), [len(rest_parts)], True), (0, [], True), (0, [10], True)]
            seen.append(steps)
        finally:
            ours.close()
            peer.close()
            side.close()
    assert seen[0][0] == seen[1][0] and seen[0][3:5] == seen[1][3:5] and seen[0][6:] == seen[1][6:]


def test_a_failed_flush_keeps_no_reply_queued(c_protocol) -> None:
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conn, transport = side.conns[0]

            def fail() -> bool:
                raise RuntimeError("transport broke")

            transport.is_closing = fail
            conn.queue_reply(memoryview(b"x" * 10))
            with pytest.raises(RuntimeError, match="transport broke"):
                conn.flush_replies()
            assert conn._replies == []
        finally:
            side.close()


def test_replies_reach_a_real_socket_past_the_transport(c_protocol) -> None:
    """On the production loop (uvloop) a connection knows its socket, and a reply batch
    goes there without passing through the transport."""
    import uvloop

    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        loop = uvloop.new_event_loop()
        ours, peer = socket.socketpair()
        try:
            transport, conn = loop.run_until_complete(
                loop.connect_accepted_socket(functools.partial(protocol, side.server), sock=ours))
            assert conn.fd == transport.get_extra_info("socket").fileno() >= 0
            side.server.on_replies(0, [(records.PACKETS, conn.conn_id, memoryview(b"reply"))])
            assert (transport.get_write_buffer_size(), conn.handed_over) == (0, False)
            peer.settimeout(5)
            assert peer.recv(100) == b"reply"
            transport.close()
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            peer.close()
            loop.close()
            side.close()


def drain(sock: socket.socket) -> bytes:
    """Everything waiting on `sock` (non-blocking reads until none is left)."""
    if sock.fileno() < 0:
        return b""
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_connection_whose_replies_cannot_be_written_is_closed_and_the_rest_still_get_theirs(
        c_protocol, caplog) -> None:
    """Reply payloads are views of the reply ring, valid only during on_replies: a
    connection whose flush fails must not keep them (nor stop the others' flush)."""
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            (first, broken), (second, working) = side.conns[0], side.conns[1]

            def fail() -> bool:
                raise RuntimeError("transport broke")

            broken.is_closing = fail
            side.server.on_replies(0, [(records.PACKETS, first.conn_id, memoryview(b"one")),
                                       (records.CLOSE, first.conn_id, b""),  # close() flushes: it fails there
                                       (records.PACKETS, second.conn_id, memoryview(b"two"))])
            assert (broken.written, broken.closed, first._replies) == ([], True, [])
            assert working.written == [b"two"]
            assert f"connection {first.conn_id:x}: replies could not be written" in caplog.text
            caplog.clear()
        finally:
            side.close()


def test_a_lost_worker_answers_what_it_took_and_its_replacement_gets_the_rest(c_protocol) -> None:
    """Requests a dead worker had taken get WORKER_LOST (from the headers kept in flight:
    the ring space may be reused already); the ones it never took, read straight into the
    ring, through the general path, or waiting for room, go to its replacement, in order."""
    codec = PacketCodec()
    run = b"".join(codec.encode(1, b"x" * 4000, seq_num=100 + i) for i in range(4))  # a quarter of the ring
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            (first, first_t), _, (third, third_t) = side.conns  # both on worker 0
            taken = b"".join(codec.encode(1, b"t", seq_num=i, user_id=7) for i in (1, 2, 3))
            feed(first, taken)
            sender = side.server.links[0].sender
            sender.flush()
            held = side.far_ends[0].read_batch(100, True)  # the worker takes them,
            side.far_ends[0].mark_taken()
            del held
            side.server.on_replies(0, [((1 << records.ACK_SHIFT) | records.PACKETS, first.conn_id, b"")])
            late = protocol(side.server)  # (its OPENED record is never taken)
            late.connection_made(FakeTransport(20_100))
            second = codec.encode(2, b"b", seq_num=3)
            feed(third, second)
            cut = codec.encode(1, b"c", seq_num=4) + codec.encode(1, b"d" * 30, seq_num=5)
            feed(first, cut[:30])  # one whole packet into the ring, the start of the next kept
            feed(first, cut[30:])  # the rest: through the general path
            for _ in range(5):
                feed(third, run)  # the last ones wait for room
            assert sender.backlogged and not third_t.reading
            assert side.server.worker_gone(0) == 2  # answers one, dies with two
            replies = list(iter_packets(b"".join(first_t.written), codec))
            assert [(p.seq_num, p.cmd_id, p.status_code, p.user_id, p.body) for p in replies] == [
                (2, 1, Status.WORKER_LOST, 7, b""), (3, 1, Status.WORKER_LOST, 7, b"")]
            side.far_ends[0].close()
            side.far_ends[0] = replacement = open_consumer(side.rings.for_worker(0)[0][0])
            got = []
            while True:
                sender.flush()
                batch = [(kind, conn_id, bytes(p)) for kind, conn_id, p in replacement.read_batch(1000)]
                replacement.release()
                if not batch and not sender.backlogged:
                    break
                got += batch
                sender._on_space()
            everyone = [conn for conn, _ in side.conns] + [late]
            assert sorted(conn_id for kind, conn_id, _ in got if kind == records.OPENED) == sorted(
                conn.conn_id for conn in everyone)  # once each, before any request
            assert {kind for kind, _, _ in got[: len(everyone)]} == {records.OPENED}
            packets = {conn.conn_id: b"".join(p for kind, conn_id, p in got if conn_id == conn.conn_id
                                              and kind == records.PACKETS) for conn in everyone}
            assert packets == {first.conn_id: cut, side.conns[1][0].conn_id: b"", third.conn_id: second + run * 5,
                               late.conn_id: b""}
            assert (first.outstanding, third.outstanding, third_t.reading) == (2, 21, True)
        finally:
            side.close()


def test_blocked_connections_resume_oldest_first_as_room_allows(c_protocol) -> None:
    """Once the runs that waited are in the ring, connections a full ring paused are
    resumed oldest first, each only if the room left holds what it sent last; the rest
    follow as the worker frees more (resuming all at once had most of them read a run
    with no room for it, copy it, queue it and pause again)."""
    codec = PacketCodec()
    run = b"".join(codec.encode(1, b"x" * 4000, seq_num=i) for i in range(4))  # a quarter of the ring
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            extra = [protocol(side.server) for _ in range(2)]
            for i, conn in enumerate(extra):
                conn.connection_made(FakeTransport(20_200 + i))
            (a, a_t), (b, b_t), (c, c_t) = side.conns[0], side.conns[2], (extra[1], extra[1].transport)
            assert {conn.worker for conn in (a, b, c)} == {0}
            for _ in range(5):
                feed(a, run)  # four fit, the fifth waits
            feed(b, run)
            feed(c, run)
            link = side.server.links[0]
            assert list(link.blocked) == [a, b, c] and not (a_t.reading or b_t.reading or c_t.reading)
            side.take()  # the worker takes everything: the three waiting runs go in, a quarter is left
            link.sender._on_space()
            assert (a_t.reading, b_t.reading, c_t.reading) == (True, False, False), protocol
            assert link.sender._waiting  # for the worker to free more
            side.far_ends[0].read_batch(1)
            side.far_ends[0].release()
            link.sender._on_space()
            assert (a_t.reading, b_t.reading, c_t.reading, link.blocked) == (True, True, True, {}), protocol
            assert not link.sender._waiting
        finally:
            side.close()


def test_a_read_goes_into_the_ring_while_a_small_read_still_fits(c_protocol) -> None:
    """Reads ask the ring for READ_SIZE, and for SMALL_READ when that is not there; only
    with less room than that do they go to the scratch buffer."""
    codec = PacketCodec()
    run = b"".join(codec.encode(1, b"x" * 4000, seq_num=i) for i in range(16))  # ~64 KiB
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE, ring_size=1024 * 1024)  # max_payload 256 KiB
        try:
            conn = side.conns[0][0]
            sizes = []
            while not side.server.links[0].sender.backlogged:
                room = conn.get_buffer(-1)
                sizes.append(len(room) if room.obj is not conn.scratch.obj else "scratch")
                del room
                feed(conn, run)
            assert sizes[0] == conn_core.READ_SIZE - 16  # max_payload: a quarter of the ring
            assert conn_core.SMALL_READ in sizes and sizes[-1] == "scratch", sizes
            assert sizes.index(conn_core.SMALL_READ) < sizes.index("scratch")
        finally:
            side.close()


def test_a_read_into_the_scratch_buffer_needs_no_get_buffer_first(c_protocol) -> None:
    """A connection that never handed out ring room reads from the scratch buffer (the C
    core takes the None that ClientProtocolBase starts `reading` with as no room)."""
    codec = PacketCodec()
    packet = codec.encode(1, b"hello", seq_num=9)
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conn = side.conns[0][0]
            assert conn.reading is None
            conn.scratch[: len(packet)] = packet
            conn.buffer_updated(len(packet))
            side.take()
            assert [p for kind, _, p in side.taken[0] if kind == records.PACKETS] == [packet], protocol
        finally:
            side.close()


def blocked_on_worker_0(side: Side, protocol: type, count: int) -> list:
    """`count` connections of worker 0, each with a quarter-ring run waiting for room (the
    first has filled the ring before)."""
    conns = [side.conns[0], side.conns[2]]
    while len(conns) < count:
        conn = protocol(side.server)
        conn.connection_made(FakeTransport(21_000 + len(conns)))
        if conn.worker == 0:
            conns.append((conn, conn.transport))
    run = b"".join(PacketCodec().encode(1, b"x" * 4000, seq_num=i) for i in range(4))
    for _ in range(4):
        feed(conns[0][0], run)
    for conn, _ in conns:
        feed(conn, run)
    assert list(side.server.links[0].blocked) == [conn for conn, _ in conns]
    return conns


def test_an_empty_ring_holds_no_blocked_connection_back(c_protocol) -> None:
    """Connections resumed earlier may send nothing more: once the ring is empty, the
    worker frees nothing and no space wakeup comes, so everyone left is resumed then."""
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conns = blocked_on_worker_0(side, protocol, 7)
            link = side.server.links[0]
            for _ in range(5):  # the worker takes everything, again and again; the loop runs
                side.take()  # (the sender's wakeups: its space pipe; 50 ms, before its poll)
                side.loop.run_until_complete(asyncio.sleep(0.01))
            assert link.sender.fill == 0
            assert ([t.reading for _, t in conns], link.blocked, link.sender._waiting) == ([True] * 7, {}, False)
        finally:
            side.close()


def test_a_closed_connection_holds_no_room(c_protocol) -> None:
    codec = PacketCodec()
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            (a, _), (b, _) = side.conns[0], side.conns[2]
            extra = protocol(side.server)
            extra.connection_made(FakeTransport(20_300))
            extra = protocol(side.server)  # worker 0 again
            extra.connection_made(FakeTransport(20_301))
            c, c_t = extra, extra.transport
            run = b"".join(codec.encode(1, b"x" * 4000, seq_num=i) for i in range(4))
            for _ in range(5):
                feed(a, run)
            feed(b, run)
            b.connection_lost(None)  # gone while it waits
            feed(c, codec.encode(1, b"z" * 4000))
            link = side.server.links[0]
            assert list(link.blocked) == [a, b, c]
            side.take()
            link.sender._on_space()  # the waiting runs go in: room for a's next run and c's, not b's too
            assert (c_t.reading, link.blocked) == (True, {}), protocol
        finally:
            side.close()


def test_a_lost_worker_leaves_the_sender_waiting_for_room_for_the_blocked(c_protocol) -> None:
    """The worker dies with no run waiting in the sender and more connections blocked than
    its replacement's ring takes at once: they are resumed as it frees room."""
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conns = blocked_on_worker_0(side, protocol, 7)
            link = side.server.links[0]
            sender = link.sender
            for _ in range(2):
                side.take()
                sender._on_space()
            far_end = side.far_ends[0]
            far_end.read_batch(1)  # the worker takes one record and dies
            far_end.mark_taken()
            assert not sender.backlogged and len(link.blocked) >= 4
            side.server.worker_gone(0)
            assert link.blocked and sender._waiting
            far_end.close()
            side.far_ends[0] = replacement = open_consumer(side.rings.for_worker(0)[0][0])
            for _ in range(3):  # the loop runs: publishes, space wakeups
                side.loop.run_until_complete(asyncio.sleep(0.01))
                replacement.read_batch(1000)
                replacement.release()
            side.loop.run_until_complete(asyncio.sleep(0.01))
            assert ([t.reading for _, t in conns], link.blocked) == ([True] * 7, {})
        finally:
            side.close()


def test_replies_by_reference_are_the_request_bytes_and_their_room_is_freed_after_the_flush(
        c_protocol) -> None:
    """A PACKETS_BY_REF record stands for its inline bytes and the request ring bytes it
    names; a RELEASE record frees the request ring up to its position, but only once
    the batch's replies are flushed (until then they may be those very bytes)."""
    codec = PacketCodec()
    body = bytes(range(256)) * 12
    request = codec.encode(1, body, seq_num=5)
    for protocol in (c_protocol, PythonProtocol):
        side = Side(protocol, ByteOrder.LITTLE)
        try:
            conn, transport = side.conns[0]  # worker 0's
            feed(conn, request)
            link = side.server.links[0]
            link.sender.flush()
            taken = side.far_ends[0].read_batch(10, True)  # the connections' OPENED, then the request
            assert [kind for kind, _, _ in taken][-1] == records.PACKETS
            del taken  # the worker read them in place and does not free them: it sends RELEASE
            position = side.far_ends[0].position
            at = bytes(link.requests).index(request) + HEADER_SIZE
            reply_header = codec.header.pack(HEADER_SIZE + len(body), 5, 1, 0, 0)
            by_ref = (records.REF_ENTRY.pack(HEADER_SIZE, len(body), at) + reply_header
                      + records.REF_ENTRY.pack(4, 0, 0) + b"tail")
            room = link.sender.room()
            written_when_released = []

            def released(upto: int, released=link.sender.released, seen=written_when_released,
                         transport=transport) -> None:
                seen.append(b"".join(transport.written))
                released(upto)

            link.sender.released = released
            side.server.on_replies(0, [(records.PACKETS_BY_REF | 1 << records.ACK_SHIFT, conn.conn_id,
                                        memoryview(by_ref)), (records.RELEASE, position, b"")])
            assert written_when_released == [reply_header + body + b"tail"], protocol
            assert room < RING_SIZE and (conn.outstanding, link.sender.room()) == (0, RING_SIZE), protocol
            assert link.sender._writer._words[16] == position  # the ring's read position
            assert side.server.stats["reply_bytes_by_reference"] == len(body)
            # A bad record queues none of its parts (they would outlive the batch), and the
            # batch's RELEASE still frees its room (the worker does not send it again).
            feed(conn, request)
            link.sender.flush()
            side.far_ends[0].read_batch(10, True)
            position = side.far_ends[0].position
            bad = (records.REF_ENTRY.pack(HEADER_SIZE, len(body), at) + reply_header
                   + records.REF_ENTRY.pack(0, 16, len(link.requests) - 8))
            written = list(transport.written)
            with pytest.raises(ValueError, match="past its request ring"):
                side.server.on_replies(0, [(records.PACKETS_BY_REF, conn.conn_id, memoryview(bad)),
                                           (records.RELEASE, position, b"")])
            assert (conn._replies, transport.written) == ([], written), protocol
            assert link.sender._writer._words[16] == position
        finally:
            side.close()
