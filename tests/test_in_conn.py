"""Conn-side fast replies (in_conn=True handlers) against the real server (2 workers)."""

import asyncio

from aserver import Status
from aserver.client import Client
from aserver.protocol import PacketCodec

from probe_service import ECHO, PING, PING_FAIL, PING_STARTED, SLOW_ECHO

codec = PacketCodec()


def pid_of(body: bytes) -> int:
    return int(body.split()[0])


async def test_ping_is_answered_by_the_conn_process(server) -> None:
    conn_pids = set(server.child_pids("conn").values())
    worker_pids = set(server.child_pids("worker").values())
    async with await Client.connect(*server.address) as client:
        replies = await client.call_many([(PING, b"%d" % i, 5) for i in range(100)], timeout=5)
        assert [r.body.split()[-1] for r in replies] == [b"%d" % i for i in range(100)]
        assert {pid_of(r.body) for r in replies} <= conn_pids
        assert all(r.user_id == 5 and r.status_code == 0 for r in replies)
        assert not {pid_of(r.body) for r in replies} & worker_pids


async def test_order_kept_behind_requests_in_flight_at_a_worker(server) -> None:
    """A ping behind a slow request goes to the worker (it would overtake otherwise);
    a ping ahead of a request is answered in conn, the request by the worker."""
    conn_pids = set(server.child_pids("conn").values())
    worker_pids = set(server.child_pids("worker").values())
    async with await Client.connect(*server.address) as client:
        replies = await client.call_many([(SLOW_ECHO, b"0200", 0), (PING, b"behind", 0), (ECHO, b"e", 0)], timeout=5)
        assert [r.cmd_id for r in replies] == [SLOW_ECHO, PING, ECHO]
        assert pid_of(replies[1].body) in worker_pids
        replies = await client.call_many([(PING, b"ahead", 0), (ECHO, b"e", 0), (PING, b"after", 0)], timeout=5)
        assert [r.cmd_id for r in replies] == [PING, ECHO, PING]
        assert pid_of(replies[0].body) in conn_pids
        assert pid_of(replies[2].body) in worker_pids  # same read as the ECHO before it
        # A separate later read, while the slow request is still at the worker.
        client.send_raw(codec.encode(SLOW_ECHO, b"0200", seq_num=2000))
        await asyncio.sleep(0.05)
        client.send_raw(codec.encode(PING, b"later", seq_num=2001))
        raw = [await client.receive(timeout=5) for _ in range(2)]
        assert [p.seq_num for p in raw] == [2000, 2001]
        assert pid_of(raw[1].body) in worker_pids
        # Nothing outstanding any more: back to the conn process.
        assert pid_of((await client.call(PING, timeout=5)).body) in conn_pids
        # Every reply came back in request order (the client matches by seq_num;
        # check the raw order too).
        client.send_raw(b"".join(codec.encode(cmd, b"0050", seq_num=n) for n, cmd in
                                 enumerate([SLOW_ECHO, PING, PING, ECHO, PING], start=1000)))
        raw = [await client.receive(timeout=5) for _ in range(5)]
        assert [p.seq_num for p in raw] == list(range(1000, 1005))


async def test_in_conn_failure_replies_handler_error(server) -> None:
    async with await Client.connect(*server.address) as client:
        reply = await client.call(PING_FAIL, timeout=5)
        assert reply.status_code == Status.HANDLER_ERROR
        assert (await client.call(ECHO, b"still here", timeout=5)).body == b"still here"
    server.wait_for_log(r"\[conn 0\].*in-conn handler ping_fail failed on cmd_id 32")


async def test_startup_hooks_run_only_in_workers(server) -> None:
    conn_pids = set(server.child_pids("conn").values())
    async with await Client.connect(*server.address) as client:
        in_conn = (await client.call(PING_STARTED, timeout=5)).body.split()
        assert int(in_conn[0]) in conn_pids and in_conn[1] == b"no"
        # Behind a request in flight, the worker runs it: there the hook has run.
        replies = await client.call_many([(SLOW_ECHO, b"0050", 0), (PING_STARTED, b"", 0)], timeout=5)
        assert replies[1].body.split()[1] == b"yes"


def test_a_bad_in_conn_result_is_a_handler_error_not_a_crash() -> None:
    """The reply checks are the worker's (aserver.app.reply_parts): an out-of-range status
    or an odd memoryview must not raise in the conn process's data path."""
    from collections import Counter
    from types import SimpleNamespace

    from aserver.app import Reply
    from aserver.conn.in_conn import InConnAnswerer

    results = {1: Reply(b"x", status=-1), 2: memoryview(bytearray(b"ABCD")).cast("B", (2, 2)), 3: b"ok"}
    stats: Counter[str] = Counter()
    answerer = InConnAnswerer({cmd: (lambda request, r=r: r) for cmd, r in results.items()}, codec, stats)
    conn = SimpleNamespace(info=SimpleNamespace(id=1, peer=("10.0.0.1", 5)))
    run = b"".join(codec.encode(cmd, b"", seq_num=cmd) for cmd in results)
    replies, pos, count = answerer.answer_leading(conn, run)  # type: ignore[arg-type]
    got = [codec.decode(reply) for reply in replies]
    assert (pos, count) == (len(run), 3)
    assert [(p.seq_num, p.status_code, p.body) for p in got] == [
        (1, Status.HANDLER_ERROR, b""), (2, 0, b"ABCD"), (3, 0, b"ok")]
    assert stats["in_conn_handler_errors"] == 1
