"""The Dispatcher on its own (fake ring ends): what a handler's bad result or failure may
do to the batch it came in. Sync handlers run inline inside `on_records`, so nothing may
escape from there: the other requests and connections of the batch must still be run,
answered and acked (the conn process matches acks to requests in order)."""

import array
import asyncio
import dataclasses
import functools
import gc
import struct
import time
import warnings

import msgspec
import pytest

from aserver.app import App, Reply, Request, Status
from aserver.ipc import records
from aserver.metrics import LATENCY_BUCKETS, WorkerMetrics
from aserver.protocol import HEADER_SIZE, ByteOrder, PacketCodec
from aserver.worker import dispatcher as dispatcher_module
from aserver.worker.dispatcher import Dispatcher

codec = PacketCodec()
CONN_A = 1
CONN_B = 2


class FakeSender:  # a reply ring that records what was sent
    max_payload = 1 << 20
    backlogged = False

    def __init__(self):
        self.sent = []

    def send(self, kind, conn_id, payload):  # a list payload is its parts back to back
        self.sent.append((kind, conn_id, b"".join(payload) if isinstance(payload, list) else bytes(payload)))
        return True

    def flush(self):
        pass

    def discard_unread(self):
        pass


class FakeReceiver:
    def start(self): pass
    def stop(self): pass
    def pause(self): pass
    def resume(self): pass
    def skip_unread(self): pass


def run(*packets):
    return b"".join(codec.encode(cmd, body, seq_num=seq) for seq, cmd, body in packets)


INLINE_LOOP = ["c"]  # which inline loop make() sets up: the fixture below picks


@pytest.fixture(autouse=True, params=["c", "python"])
def inline_loop(request):
    """Every test here runs on both inline loops: the C one (_inline.c) and Python's."""
    if request.param == "c" and dispatcher_module._c_inline is None:
        pytest.skip("the C inline loop was not built here (no C compiler at install time)")
    INLINE_LOOP[0] = request.param


def make(app, concurrency=4, packet_codec=codec, metrics=None):
    loop = asyncio.get_running_loop()
    d = Dispatcher(app, packet_codec, loop, concurrency, 1000, metrics=metrics)
    sender = FakeSender()
    d.attach([sender], [FakeReceiver()])
    if INLINE_LOOP[0] == "python":
        d._fast_inline = None
    assert (d._fast_inline is not None) == (INLINE_LOOP[0] == "c")
    d.start()
    return d, sender


def replies_and_acks(sender, conn_id):
    """[(seq, status, body)], total acks, for one connection."""
    out, acks = [], 0
    for kind, cid, payload in sender.sent:
        if cid != conn_id:
            continue
        acks += kind >> records.ACK_SHIFT
        pos = 0
        while pos < len(payload):
            length, seq, _cmd, status, _user = codec.header.unpack_from(payload, pos)
            out.append((seq, status, payload[pos + HEADER_SIZE: pos + length]))
            pos += length
    return out, acks


def reply_bodies(sender, conn_id):
    return [bytes(body) for _, _, body in replies_and_acks(sender, conn_id)[0]]


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


async def serve_two(app: App, a: bytes, b: bytes) -> tuple[list, int, list, int]:
    """One batch: a record for connection A, then one for B. Returns each connection's
    replies and acks once everything ran and was flushed."""
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, a), (records.PACKETS, CONN_B, b)])
    await settle()
    d._flush()
    return (*replies_and_acks(sender, CONN_A), *replies_and_acks(sender, CONN_B))


async def test_a_plain_function_returning_a_coroutine_fails_the_same_on_any_path():
    """Inline (idle connection) or queued behind an async request: HANDLER_ERROR both
    times. Whether the result is awaited is decided per handler, never by the result."""
    app = App()

    @app.handler(4)
    async def slow(request):
        await asyncio.sleep(0.01)
        return request.body

    async def echo_async(request):
        return request.body

    app.handler(14)(lambda request: echo_async(request))
    d, sender = make(app)
    # idle connection A: cmd 14 runs inline
    d.on_records([(records.PACKETS, CONN_A, run((1, 14, b"a")))])
    # busy connection B: an async request first, then cmd 14 in the same record
    d.on_records([(records.PACKETS, CONN_B, run((1, 4, b"x"), (2, 14, b"b")))])
    await asyncio.sleep(0.05)
    d._flush()
    a, _ = replies_and_acks(sender, CONN_A)
    b, _ = replies_and_acks(sender, CONN_B)
    assert a[0][1] == Status.HANDLER_ERROR
    # same handler, same request: only the connection's state differs
    assert b[1][1] == a[0][1], f"busy connection got status {b[1][1]} body {b[1][2]!r}"


@pytest.mark.parametrize("bad", [Reply(b"x", status=-1), Reply(b"x", status=2**32), Reply(None), Reply("text")])
async def test_a_bad_reply_from_a_sync_handler_fails_only_its_request(bad):
    app = App()

    @app.handler(1)
    def echo(request):
        return request.body

    @app.handler(9)
    def broken(request):
        return bad

    a, acks_a, b, acks_b = await serve_two(
        app, run((1, 9, b""), (2, 1, b"after-in-same-record")), run((1, 1, b"other connection")))
    assert acks_a == 2, f"conn A acks {acks_a} (replies {a})"
    assert [(seq, status) for seq, status, _ in a] == [(1, Status.HANDLER_ERROR), (2, 0)]
    assert acks_b == 1 and b and b[0][2] == b"other connection", f"conn B acks {acks_b} replies {b}"


async def test_a_handler_without_a_qualname_that_raises():
    app = App()

    def fail(what, request):
        raise RuntimeError(what)

    app.handler(3)(functools.partial(fail, "boom"))

    @app.handler(1)
    def echo(request):
        return request.body

    a, acks_a, b, acks_b = await serve_two(app, run((1, 3, b"")), run((1, 1, b"b")))
    assert a and a[0][1] == Status.HANDLER_ERROR and acks_a == 1, (a, acks_a)
    assert acks_b == 1, (b, acks_b)


async def test_a_sync_handler_raising_cancelled_error():
    """e.g. fut.result() on a cancelled future: HANDLER_ERROR, as on the consumer path."""
    app = App()
    loop = asyncio.get_running_loop()

    @app.handler(13)
    def result_of_cancelled(request):
        fut = loop.create_future()
        fut.cancel()
        return fut.result()

    @app.handler(1)
    def echo(request):
        return request.body

    a, acks_a, b, acks_b = await serve_two(app, run((1, 13, b"")), run((1, 1, b"b")))
    assert a and a[0][1] == Status.HANDLER_ERROR and acks_a == 1, (a, acks_a)
    assert acks_b == 1, (b, acks_b)


def test_requests_compare_and_hash_by_identity():
    a, b = Request(1, 2, 0, 0, b"", None), Request(1, 2, 0, 0, b"", None)  # type: ignore[arg-type]
    assert a != b and len({a, b}) == 2


async def test_a_bad_reply_from_an_async_handler_leaves_its_consumer_running():
    """With one consumer task: if it died, the connection's next request would never run."""
    app = App()

    @app.handler(1)
    def echo(request):
        return request.body

    @app.handler(9)
    async def broken(request):
        return Reply(None)

    d, sender = make(app, concurrency=1)
    d.on_records([(records.PACKETS, CONN_A, run((1, 9, b"")))])
    await settle()
    d.on_records([(records.PACKETS, CONN_A, run((2, 1, b"later")))])
    await settle()
    d._flush()
    a, acks = replies_and_acks(sender, CONN_A)
    assert acks == 2, (a, acks)
    assert [(seq, status) for seq, status, _ in a] == [(1, Status.HANDLER_ERROR), (2, 0)]


async def test_a_str_reply_body_does_not_cost_other_connections_their_replies():
    app = App()

    @app.handler(1)
    def echo(request):
        return request.body

    @app.handler(9)
    def broken(request):
        return Reply("text")

    a, acks_a, b, acks_b = await serve_two(app, run((1, 9, b"")), run((1, 1, b"b")))
    assert acks_b == 1, (b, acks_b)
    assert acks_a == 1, (a, acks_a)


def echo(request):
    return request.body


@pytest.mark.parametrize("body, sent", [
    (memoryview(bytearray(b"ABCDEFGH")).cast("B", (2, 4)), b"ABCDEFGH"),  # 2-D: len() is 2
    (memoryview(b"abcdef")[::2], b"ace"),  # strided: b"".join refuses it
    (memoryview(bytearray(b"a")).cast("B", ()), b"a"),  # 0-dim
    (memoryview(array.array("H", [0x4241])), b"AB"),  # not bytes
    (Reply(memoryview(bytearray(b"xyz")), 7), b"xyz"),
])
async def test_any_memoryview_body_is_sent_as_its_bytes(body, sent):
    app = App()
    app.handler(1)(echo)
    app.handler(9)(lambda request: body)
    a, acks_a, b, acks_b = await serve_two(app, run((1, 9, b""), (2, 1, b"next")), run((1, 1, b"other")))
    assert [(seq, bytes(got)) for seq, _, got in a] == [(1, sent), (2, b"next")] and acks_a == 2
    assert acks_b == 1 and bytes(b[0][2]) == b"other"


@dataclasses.dataclass
class Prefixer:  # a dataclass with eq: not hashable
    prefix: bytes

    def __call__(self, request: Request) -> bytes:
        return self.prefix + request.body


async def test_an_unhashable_callable_handler_works_inline_and_queued():
    app = App()

    @app.handler(4)
    async def slow(request):
        await asyncio.sleep(0.01)
        return request.body

    app.handler(10)(Prefixer(b"p:"))
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, run((1, 10, b"a")))])  # inline
    d.on_records([(records.PACKETS, CONN_B, run((1, 4, b"x"), (2, 10, b"b")))])  # queued behind slow
    await asyncio.sleep(0.05)
    d._flush()
    a, _ = replies_and_acks(sender, CONN_A)
    b, _ = replies_and_acks(sender, CONN_B)
    assert [(status, bytes(body)) for _, status, body in a] == [(0, b"p:a")]
    assert [(status, bytes(body)) for _, status, body in b] == [(0, b"x"), (0, b"p:b")]


async def test_acks_beyond_one_record_follow_the_replies(monkeypatch):
    """The conn process retires requests as acks arrive: an ack must never come before
    the reply it covers (a worker dying in between would lose that reply silently)."""
    monkeypatch.setattr(records, "MAX_ACKS", 2)
    app = App()
    app.handler(1)(echo)
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, run(*[(i, 1, b"r%d" % i) for i in range(5)]))])
    await settle()
    d._flush()
    acked = replied = 0
    for kind, _, payload in sender.sent:
        replied += len(payload) // (HEADER_SIZE + 2)
        acked += kind >> records.ACK_SHIFT
        assert acked <= replied
    assert (acked, replied) == (5, 5)


async def test_a_typed_sync_handler_returning_a_coroutine(caplog):
    class Out(msgspec.Struct):
        x: int

    async def later() -> Out:
        return Out(1)

    app = App()
    app.handler(20, reply=Out)(lambda request: later())
    d, sender = make(app)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.on_records([(records.PACKETS, CONN_A, run((1, 20, b"")))])
        await settle()
        d._flush()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]  # it was closed
    reasons = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("declare it `async def`" in reason for reason in reasons), reasons
    a, acks = replies_and_acks(sender, CONN_A)
    assert [status for _, status, _ in a] == [Status.HANDLER_ERROR] and acks == 1


async def test_network_byte_order_headers_are_read_and_written_in_it():
    """Every header field, both ways, in network byte order (the C loop packs and unpacks
    headers itself): values chosen so that a byte-order mix-up changes them."""
    network = PacketCodec(ByteOrder.NETWORK)
    app = App()

    @app.handler(0x0102)
    def tagged(request):
        assert request.status_code == 0x01020304
        return request.body + request.user_id.to_bytes(4, "big")

    d, sender = make(app, packet_codec=network)
    packets = [network.encode(0x0102, b"x" * n, seq_num=0x0A0B0C00 + n, status_code=0x01020304,
                              user_id=0x11223344 + n) for n in range(3)]
    d.on_records([(records.PACKETS, CONN_A, b"".join(packets))])
    d._flush()
    (kind, conn_id, payload), = sender.sent
    assert (conn_id, kind >> records.ACK_SHIFT) == (CONN_A, 3)
    pos, got = 0, []
    while pos < len(payload):
        length, seq, cmd, status, user = network.header.unpack_from(payload, pos)
        got.append((seq, cmd, status, user, payload[pos + HEADER_SIZE : pos + length]))
        pos += length
    assert got == [(0x0A0B0C00 + n, 0x0102, 0, 0x11223344 + n, b"x" * n + (0x11223344 + n).to_bytes(4, "big"))
                   for n in range(3)]


async def test_metrics_count_every_inline_request_and_reply():
    """With metrics on, each request is timed once and each reply counted by status,
    whichever way it ended (the C loop times them itself and hands the rest back)."""
    app = App()
    app.handler(1)(lambda request: request.body)
    app.handler(2)(lambda request: Reply(b"r", status=7))
    app.handler(3)(lambda request: None)

    @app.handler(4)
    def broken(request):
        raise RuntimeError("boom")

    metrics = WorkerMetrics()
    d, sender = make(app, metrics=metrics)
    d.on_records([(records.PACKETS, CONN_A, run((1, 1, b"a"), (2, 2, b""), (3, 3, b""), (4, 4, b""), (5, 1, b"b")))])
    d._flush()
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, status) for seq, status, _ in replies] == [(1, 0), (2, 7), (4, Status.HANDLER_ERROR), (5, 0)]
    assert acks == 5
    observed = {cmd: sum(counts[:-1]) for cmd, counts in metrics.latency.items()}
    assert observed == {1: 2, 2: 1, 3: 1, 4: 1}
    assert all(counts[-1] >= 0 for counts in metrics.latency.values())
    assert metrics.replies == {1 << 32: 2, 2 << 32 | 7: 1, 4 << 32 | Status.HANDLER_ERROR: 1}


async def test_a_known_series_is_counted_without_a_python_call_in_c():
    """The C loop counts into the WorkerMetrics' dicts itself once a cmd's series exists;
    only the first request of a cmd goes through WorkerMetrics (which picks its series)."""
    calls = []

    class Counting(WorkerMetrics):
        def observe(self, cmd: int, seconds: float) -> None:
            calls.append(("observe", cmd))
            super().observe(cmd, seconds)

        def reply(self, cmd: int, status: int) -> None:
            calls.append(("reply", cmd))
            super().reply(cmd, status)

    app = App()

    @app.handler(1)
    def slow_echo(request):
        time.sleep(0.002)  # past the 1 ms bound, so the bucket it lands in says something
        return request.body

    metrics = Counting()
    d, sender = make(app, metrics=metrics)
    d.on_records([(records.PACKETS, CONN_A, run((1, 1, b"a")))])
    first_seconds = metrics.latency[1][-1]
    started = time.perf_counter()  # the clock both loops read
    d.on_records([(records.PACKETS, CONN_A, run((2, 1, b"b"), (3, 1, b"c")))])
    elapsed = time.perf_counter() - started
    d._flush()
    assert [seq for seq, _, _ in replies_and_acks(sender, CONN_A)[0]] == [1, 2, 3]
    assert calls == [("observe", 1), ("reply", 1)] * (1 if INLINE_LOOP[0] == "c" else 3)
    counts = metrics.latency[1]
    assert (sum(counts[:-1]), metrics.replies) == (3, {1 << 32: 3})
    assert sum(counts[: LATENCY_BUCKETS.index(0.001) + 1]) == 0 and counts[len(LATENCY_BUCKETS)] == 0
    assert 0.004 <= counts[-1] - first_seconds <= elapsed  # the other two's time, and no more


# zero_copy handlers ----------------------------------------------------------------------


async def test_a_zero_copy_handler_reads_the_record_itself_and_may_echo_it():
    """Its body is a read-only view of the record (C loop: of the ring payload itself, no
    copy; Python loop: of its one copy of the record); other handlers still get bytes."""
    app = App()
    seen = []

    @app.handler(1, zero_copy=True)
    def view_echo(request):
        body = request.body
        seen.append((type(body), body.readonly, body.obj, bytes(body)))
        return body

    @app.handler(2)
    def bytes_echo(request):
        seen.append((type(request.body), None, None, request.body))
        return request.body

    payload = bytearray(run((1, 1, b"first"), (2, 2, b"plain"), (3, 1, b"x" * 20_000)))
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, payload)])
    d._flush()
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, status, bytes(body)) for seq, status, body in replies] == [
        (1, 0, b"first"), (2, 0, b"plain"), (3, 0, b"x" * 20_000)]
    assert acks == 3
    assert [(kind, readonly, data) for kind, readonly, _, data in seen] == [
        (memoryview, True, b"first"), (bytes, None, b"plain"), (memoryview, True, b"x" * 20_000)]
    owner = seen[0][2]
    assert (owner is payload) == (INLINE_LOOP[0] == "c")  # the Python loop copies the record first
    assert seen[2][2] is owner


async def test_a_zero_copy_body_kept_past_its_handler_is_released():
    """A kept view would read ring space that is reused: it raises instead. The reply made
    of the same view was copied out first."""
    app = App()
    kept = []

    @app.handler(1, zero_copy=True)
    def keep(request):
        kept.append(request.body)
        kept.append(request)  # the Request holds it too
        return request.body

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"keep me"))))])
    assert reply_bodies(sender, CONN_A) == [b"keep me"]
    for view in (kept[0], kept[1].body):
        with pytest.raises(ValueError, match="released"):
            bytes(view)
    assert d._kept_views == []
    assert repr(kept[1]) == f"Request(cmd_id=1, seq_num=1, user_id=0, body=released, connection={CONN_A:#x})"


async def test_a_zero_copy_body_with_a_buffer_still_exported_is_counted_and_logged(caplog):
    """Something holding a buffer of the view (an iterator over it, numpy) keeps it from
    being released: the worker says so instead of failing the batch."""
    app = App()
    iterators = []

    @app.handler(1, zero_copy=True)
    def hold(request):
        iterators.append(struct.iter_unpack("B", request.body))  # holds a buffer export
        return b"ok"

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"ab"), (2, 1, b"cd"))))])
    assert reply_bodies(sender, CONN_A) == [b"ok", b"ok"]
    assert d.stats["zero_copy_views_held"] == 2
    assert [r.getMessage() for r in caplog.records if "kept a buffer of request.body" in r.getMessage()] == [
        "a zero_copy handler kept a buffer of request.body after it returned (2); "
        "it now reads reused ring memory: copy with bytes() what must be kept"]
    assert d._kept_views == []


async def test_a_released_zero_copy_body_returned_later_is_a_handler_error():
    app = App()
    kept = []

    @app.handler(1, zero_copy=True)
    def stale(request):
        kept.append(request.body)
        return kept[0]  # the first request's view, released after its batch

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"one"))))])
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((2, 1, b"two"))))])
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, status, bytes(body)) for seq, status, body in replies] == [
        (1, 0, b"one"), (2, Status.HANDLER_ERROR, b"")]
    assert acks == 2 and d.stats["handler_errors"] == 1


async def test_a_queued_zero_copy_request_gets_a_view_of_its_own_copy():
    """Behind an async request of its connection, the body is copied out of the ring; the
    handler still gets a memoryview (one type per handler), and it stays valid."""
    app = App()
    kept = []

    @app.handler(4)
    async def slow(request):
        await asyncio.sleep(0.01)
        return request.body

    @app.handler(1, zero_copy=True)
    def keep(request):
        kept.append(request.body)
        return request.body

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 4, b"slow"), (2, 1, b"queued"))))])
    await asyncio.sleep(0.05)
    d._flush()
    assert reply_bodies(sender, CONN_A) == [b"slow", b"queued"]
    assert type(kept[0]) is memoryview and kept[0].readonly and bytes(kept[0]) == b"queued"


@pytest.mark.parametrize("zero_copy", [False, True])
async def test_a_zero_copy_fallback(zero_copy):
    app = App()
    bodies = []

    def catch_all(request):
        bodies.append(type(request.body))
        return request.body

    if zero_copy:
        app.fallback(zero_copy=True)(catch_all)
    else:
        app.fallback(catch_all)
    app.handler(1)(echo)
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 7, b"any"), (2, 1, b"own"))))])
    assert reply_bodies(sender, CONN_A) == [b"any", b"own"]
    assert bodies == [memoryview if zero_copy else bytes]


def test_zero_copy_is_refused_where_it_cannot_apply():
    app = App()
    with pytest.raises(ValueError, match="in_conn handler for cmd_id 3 takes bytes bodies"):
        app.handler(3, in_conn=True, zero_copy=True)(echo)
    app.fallback(zero_copy=True)(echo)
    with pytest.raises(ValueError, match="a fallback handler is already set"):
        app.fallback(echo)


def test_an_included_app_keeps_its_zero_copy_handlers():
    app = App()
    app.handler(1, zero_copy=True)(echo)
    app.handler(2)(echo)
    app.fallback(zero_copy=True)(echo)
    merged = App()
    merged.include(app)
    assert (merged.zero_copy, merged.fallback_zero_copy) == ({1}, True)


async def test_a_zero_copy_handler_that_raises_after_keeping_its_body():
    app = App()
    kept = []

    @app.handler(1, zero_copy=True)
    def keep_and_fail(request):
        kept.append(request.body)
        raise RuntimeError("after keeping it")

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"kept"), (2, 1, b"too"))))])
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, status) for seq, status, _ in replies] == [(1, Status.HANDLER_ERROR), (2, Status.HANDLER_ERROR)]
    assert acks == 2 and len(kept) == 2
    for view in kept:
        with pytest.raises(ValueError, match="released"):
            bytes(view)


async def test_memoryview_replies_too_big_or_for_a_closed_connection():
    """The C loop packs a memoryview reply itself: the same checks as for bytes."""
    app = App()

    @app.handler(1, zero_copy=True)
    def too_big(request):
        return memoryview(bytearray(FakeSender.max_payload))

    @app.handler(2, zero_copy=True)
    def closes(request):
        request.connection.close()
        return request.body

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"a"), (2, 1, b"b"))))])
    d.on_records([(records.PACKETS, CONN_B, bytearray(run((1, 2, b"late"))))])
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, status, bytes(body)) for seq, status, body in replies] == [
        (1, Status.HANDLER_ERROR, b""), (2, Status.HANDLER_ERROR, b"")]
    assert acks == 2
    assert next(kind for kind, conn_id, _ in sender.sent if conn_id == CONN_B) == records.CLOSE
    assert replies_and_acks(sender, CONN_B) == ([], 1)


async def test_a_queued_request_for_a_zero_copy_fallback_gets_a_memoryview():
    app = App()
    bodies = []

    @app.handler(4)
    async def slow(request):
        await asyncio.sleep(0.01)
        return request.body

    @app.fallback(zero_copy=True)
    def catch_all(request):
        bodies.append(type(request.body))
        return request.body

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 4, b"slow"), (2, 9, b"queued"))))])
    await asyncio.sleep(0.05)
    d._flush()
    assert reply_bodies(sender, CONN_A) == [b"slow", b"queued"]
    assert bodies == [memoryview]


async def test_one_function_as_a_bytes_handler_and_a_zero_copy_fallback():
    """Whether a body is a view goes by the cmd_id's registration, not by the function."""
    app = App()
    bodies = []

    def record(request):
        bodies.append((request.cmd_id, type(request.body)))
        return request.body

    app.handler(1)(record)
    app.fallback(zero_copy=True)(record)
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"own"), (2, 9, b"any"))))])
    assert bodies == [(1, bytes), (9, memoryview)]
    assert reply_bodies(sender, CONN_A) == [b"own", b"any"]


async def test_replies_that_are_ring_views_go_out_before_a_failed_batch_returns():
    """A handler's KeyboardInterrupt after a zero_copy echo ends the batch; the echo's
    reply (a view of the record) is copied out before the record's space can be reused."""
    app = App()
    app.handler(1, zero_copy=True)(echo)

    @app.handler(2)
    def interrupted(request):
        raise KeyboardInterrupt

    payload = bytearray(run((1, 1, b"original"), (2, 2, b"")))
    d, sender = make(app)
    with pytest.raises(KeyboardInterrupt):
        d.on_records([(records.PACKETS, CONN_A, payload)])
    payload[:] = bytes(len(payload))  # the ring space, reused
    await settle()
    replies, acks = replies_and_acks(sender, CONN_A)
    assert [(seq, bytes(body)) for seq, _, body in replies] == [(1, b"original")] and acks == 1
    assert d._kept_views == []


@pytest.mark.parametrize("make_payload", [
    bytes, bytearray,
    lambda data: memoryview(bytearray(data)).toreadonly(),  # a ring record read in place is one
    lambda data: memoryview(bytearray(data)),
    lambda data: array.array("H", data),  # a buffer of another format
    lambda data: memoryview(array.array("H", data)).toreadonly(),  # read-only, yet not flat bytes
    lambda data: memoryview(bytes(data)).cast("B", (2, len(data) // 2)),  # read-only, 2-D
], ids=["bytes", "bytearray", "read-only view", "writable view", "u16 array", "read-only u16 view", "2-D view"])
async def test_zero_copy_bodies_of_any_payload_buffer(make_payload):
    app = App()
    seen = []

    @app.handler(1, zero_copy=True)
    def view_echo(request):
        seen.append((request.body.readonly, request.body.format, len(request.body)))
        return request.body[1:]

    packets = [(1, 1, b"ab"), (2, 1, b"cdef"), (3, 1, b"")]
    payload = make_payload(run(*packets))
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, payload)])
    assert [(seq, bytes(body)) for seq, _, body in replies_and_acks(sender, CONN_A)[0]] == [
        (seq, body[1:]) for seq, _, body in packets]
    assert seen == [(True, "B", len(body)) for _, _, body in packets]


async def test_a_batch_holding_many_zero_copy_views_sends_their_replies_early(monkeypatch):
    """Past KEPT_VIEWS_LIMIT views held in one batch, the replies so far are copied out
    and the views released before the next record runs (the garbage collector would
    otherwise walk them all, every batch)."""
    monkeypatch.setattr(dispatcher_module, "KEPT_VIEWS_LIMIT", 2)
    app = App()
    sent_before = []

    @app.handler(1, zero_copy=True)
    def view_echo(request):
        sent_before.append(len(sender.sent))
        return request.body

    d, sender = make(app)
    batch = [(records.PACKETS, conn_id, bytearray(run((1, 1, b"%d" % conn_id)))) for conn_id in (1, 2, 3, 4, 5)]
    d.on_records(batch)
    assert sent_before == [0, 0, 2, 2, 4]
    for conn_id in (1, 2, 3, 4, 5):
        assert reply_bodies(sender, conn_id) == [b"%d" % conn_id]
    assert d._kept_views == []


async def test_kept_views_are_released_even_when_copying_the_replies_out_fails():
    app = App()
    kept = []

    @app.handler(1, zero_copy=True)
    def keep(request):
        kept.append(request.body)
        return b"ok"

    @app.handler(2)
    def send_then_release(request):
        view = memoryview(b"gone")
        request.connection.send(2, view)
        view.release()  # its reply can no longer be copied out: the flush raises
        return None

    d, sender = make(app)
    with pytest.raises(TypeError):  # what b"".join says of a released view
        d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"kept")))),
                      (records.PACKETS, CONN_B, bytearray(run((1, 2, b""))))])
    with pytest.raises(ValueError, match="released"):
        bytes(kept[0])
    assert d._kept_views == []
    assert reply_bodies(sender, CONN_A) == [b"ok"]


async def test_requests_queued_before_a_failed_record_are_counted():
    """A handler's KeyboardInterrupt ends the batch; the request queued before it still
    counts as pending, so the worker becomes idle once it is answered."""
    app = App()

    @app.handler(4)
    async def slow(request):
        await asyncio.sleep(0.01)
        return request.body

    @app.handler(2)
    def interrupted(request):
        raise KeyboardInterrupt

    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, run((1, 4, b"first")))])
    with pytest.raises(KeyboardInterrupt):
        d.on_records([(records.PACKETS, CONN_A, run((2, 4, b"queued"))), (records.PACKETS, CONN_B, run((1, 2, b"")))])
    assert (d.pending, d.stats["requests"]) == (2, 2)
    assert await d.finish(2)
    assert d.pending == 0
    assert reply_bodies(sender, CONN_A) == [b"first", b"queued"]


async def test_an_early_flush_keeps_reply_order_on_a_connection(monkeypatch):
    monkeypatch.setattr(dispatcher_module, "KEPT_VIEWS_LIMIT", 2)
    app = App()
    app.handler(1, zero_copy=True)(echo)
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, bytearray(run((1, 1, b"a1"), (2, 1, b"a2")))),
                  (records.PACKETS, CONN_B, bytearray(run((1, 1, b"b1")))),
                  (records.PACKETS, CONN_A, bytearray(run((3, 1, b"a3"))))])
    assert [(seq, bytes(body)) for seq, _, body in replies_and_acks(sender, CONN_A)[0]] == [
        (1, b"a1"), (2, b"a2"), (3, b"a3")]
    assert replies_and_acks(sender, CONN_A)[1] == 3


async def test_a_batch_is_released_after_its_replies():
    """The RELEASE record that lets the conn process free the batch's request ring space
    comes after the batch's replies, which may refer to that space."""
    app = App()
    app.handler(1, zero_copy=True)(lambda request: request.body)
    d, sender = make(app)
    d.on_records([(records.PACKETS, CONN_A, run((1, 1, b"a" * 2000), (2, 1, b"b")))])
    d.release_requests(0, 4096)
    assert [kind & records.KIND_MASK for kind, _, _ in sender.sent] == [records.PACKETS, records.RELEASE]
    assert sender.sent[-1] == (records.RELEASE, 4096, b"")
    assert reply_bodies(sender, CONN_A) == [b"a" * 2000, b"b"]
