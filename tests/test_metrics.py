"""The Prometheus endpoint, scraped from the real multi-process server and checked against
what the test's own clients sent."""

import asyncio
import bisect
import math
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aserver import Status
from aserver.client import Client
from aserver.ipc import ring as ring_module
from aserver.metrics import LATENCY_BUCKETS, MAX_CMD_SERIES, OTHER_CMD, ChildCounters, WorkerMetrics
from aserver.protocol import HEADER_SIZE
from aserver.settings import Settings
from aserver.testing import ServerProcess, settings_toml

TESTS_DIR = str(Path(__file__).parent)
ECHO, FAIL, UNKNOWN = 1, 3, 999
MAX_CONNECTIONS = 12


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        handlers=["probe_service"],
        workers=2,
        settings={"metrics": {"enabled": True, "bind": "127.0.0.1:0"},
                  "server": {"max_connections": MAX_CONNECTIONS}},
        pythonpath=[TESTS_DIR],
    ) as running:
        line = running.wait_for_log(r"metrics: serving http://\S+/metrics")
        running.metrics_url = re.search(r"(http://\S+/metrics)", line).group(1)
        yield running


async def _scrape(server) -> Scrape:
    return await asyncio.to_thread(scrape, server.metrics_url)


async def _wait_connections(server, count: int) -> Scrape:
    for _ in range(200):
        now = await _scrape(server)
        if now("aserver_connections") == count:
            return now
        await asyncio.sleep(0.05)
    raise AssertionError(f"aserver_connections never became {count}:\n{now.text}")


async def test_counts_under_load_match_what_was_sent(server) -> None:
    await _wait_connections(server, 0)
    before = await _scrape(server)
    clients = [await Client.connect(*server.address) for _ in range(8)]
    during = await _wait_connections(server, 8)
    assert during("aserver_connections_accepted_total") == before("aserver_connections_accepted_total") + 8

    sent = 0
    stop = asyncio.Event()

    async def drive(client: Client) -> None:
        nonlocal sent
        while not stop.is_set():
            replies = await client.call_many([(ECHO, b"m" * 64, 7)] * 16, timeout=10)
            assert all(r.status_code == 0 for r in replies)
            sent += len(replies)

    load = [asyncio.ensure_future(drive(c)) for c in clients]
    seen = []
    for _ in range(5):  # scrapes while the load runs: every child answers, counters only go up
        await asyncio.sleep(0.2)
        now = await _scrape(server)
        assert now("aserver_connections") == 8
        assert all(v == 1 for (name, _), v in now.samples.items() if name == "aserver_child_up"), now.text
        seen.append(now("aserver_requests_total", cmd_id="1"))
    stop.set()
    await asyncio.gather(*load)
    assert seen == sorted(seen) and seen[-1] > seen[0]

    failed = await clients[0].call(FAIL, b"boom", timeout=5)
    unknown = await clients[1].call(UNKNOWN, b"?", timeout=5)
    assert failed.status_code == Status.HANDLER_ERROR and unknown.status_code == Status.UNKNOWN_COMMAND

    after = await _scrape(server)
    delta = lambda name, **labels: after(name, **labels) - before(name, **labels)  # noqa: E731
    assert sent > 100
    assert delta("aserver_requests_total", cmd_id="1") == sent
    assert delta("aserver_replies_total", cmd_id="1", status="OK") == sent
    assert delta("aserver_handler_latency_seconds_count", cmd_id="1") == sent
    assert delta("aserver_handler_latency_seconds_bucket", cmd_id="1", le="+Inf") == sent
    assert delta("aserver_handler_latency_seconds_sum", cmd_id="1") > 0
    assert delta("aserver_replies_total", cmd_id="3", status="HANDLER_ERROR") == 1
    assert delta("aserver_replies_total", cmd_id="999", status="UNKNOWN_COMMAND") == 1
    assert delta("aserver_conn_requests_total") == sent + 2
    # Both workers served some of the 8 connections and both counted them: the sums add up.
    assert after("aserver_ring_capacity_bytes") > 0
    assert {labels for (name, labels) in after.samples if name == "aserver_ring_fill_bytes"} >= {
        (("conn", "0"), ("direction", d), ("worker", w)) for d in ("request", "reply") for w in ("0", "1")
    }
    for client in clients:
        await client.close()
    await _wait_connections(server, 0)


async def test_refused_connection_counted_by_reason(server) -> None:
    await _wait_connections(server, 0)
    before = await _scrape(server)
    clients = [await Client.connect(*server.address) for _ in range(MAX_CONNECTIONS)]
    await _wait_connections(server, MAX_CONNECTIONS)
    extra = await Client.connect(*server.address)
    await extra.wait_closed(timeout=10)  # the server closes what it refuses
    after = await _scrape(server)
    assert after("aserver_connections_refused_total", reason="max_connections") == before(
        "aserver_connections_refused_total", reason="max_connections") + 1
    assert after("aserver_connections") == MAX_CONNECTIONS
    for client in clients:
        await client.close()
    await _wait_connections(server, 0)


async def _send(server, count: int) -> None:
    async with await Client.connect(*server.address) as client:
        replies = await client.call_many([(ECHO, b"x", 0)] * count, timeout=10)
        assert all(r.status_code == 0 for r in replies)


async def test_counters_survive_a_crashed_worker(server) -> None:
    await _send(server, 50)
    before = await _scrape(server)  # the crashed worker's counts up to here are kept
    pid = server.child_pids("worker")[0]
    os.kill(pid, signal.SIGKILL)
    server.wait_for_children("worker", 2, exclude={pid}, timeout=30)
    for _ in range(200):
        after = await _scrape(server)
        if after("aserver_child_restarts_total", role="worker") == before("aserver_child_restarts_total",
                                                                         role="worker") + 1:
            break
        await asyncio.sleep(0.05)
    assert after("aserver_child_restarts_total", role="worker") == before("aserver_child_restarts_total",
                                                                         role="worker") + 1
    assert after("aserver_requests_total", cmd_id="1") == before("aserver_requests_total", cmd_id="1")
    await _send(server, 30)
    later = await _scrape(server)
    assert later("aserver_requests_total", cmd_id="1") == before("aserver_requests_total", cmd_id="1") + 30


async def test_reload_loses_no_count(server) -> None:
    before = await _scrape(server)
    await _send(server, 40)  # not scraped before the workers are replaced: their final report carries it
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload complete", timeout=60)
    after = await _scrape(server)
    assert after("aserver_requests_total", cmd_id="1") == before("aserver_requests_total", cmd_id="1") + 40
    assert after("aserver_replies_total", cmd_id="1", status="OK") == before(
        "aserver_replies_total", cmd_id="1", status="OK") + 40


async def test_large_zero_copy_replies_are_counted_as_sent_by_reference() -> None:
    """The shipped echo (zero_copy) with bodies past records.REF_MIN: where the C ring
    writer was built, the replies that ran inline went by reference to the request ring,
    headers and all (an echo's header is its request's; a connection's first request may
    wait behind its on_connect hook, and is copied)."""
    with ServerProcess(settings={"metrics": {"enabled": True, "bind": "127.0.0.1:0"}}) as running:
        url = re.search(r"(http://\S+/metrics)", running.wait_for_log(r"metrics: serving http://\S+/metrics")).group(1)
        bodies = [os.urandom(4096 + i) for i in range(40)]
        async with await Client.connect(*running.address) as client:
            await client.call(ECHO, b"first", timeout=5)
            replies = await client.call_many([(ECHO, body, 0) for body in bodies], timeout=10)
        assert [r.body for r in replies] == bodies
        by_reference = (await asyncio.to_thread(scrape, url))("aserver_conn_events_total",
                                                              event="reply_bytes_by_reference")
    sent = sum(HEADER_SIZE + len(body) for body in bodies)
    assert by_reference == (sent if ring_module._c_core is not None else 0)


def test_other_paths_and_methods(server) -> None:
    base = server.metrics_url.removesuffix("/metrics")
    with pytest.raises(urllib.request.HTTPError) as info:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert info.value.code == 404
    request = urllib.request.Request(server.metrics_url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")


def test_metrics_off_by_default() -> None:
    assert Settings().metrics.enabled is False


def test_metrics_port_in_use_stops_startup(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = tmp_path / "settings.toml"
        settings.write_text(settings_toml({
            "server": {"bind": "127.0.0.1:0"},
            "supervisor": {"pid_file": str(tmp_path / "a.pid")},
            "metrics": {"enabled": True, "bind": f"127.0.0.1:{port}"},
        }))
        result = subprocess.run([sys.executable, "-m", "aserver", "--settings", str(settings)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "metrics.bind" in result.stderr, result.stderr


# Unit tests of the pieces -----------------------------------------------------------------


def test_worker_metrics_buckets_are_inclusive_upper_bounds() -> None:
    metrics = WorkerMetrics()
    metrics.observe(1, LATENCY_BUCKETS[0])  # exactly on the first bound: first bucket (le)
    metrics.observe(1, LATENCY_BUCKETS[0] * 1.01)
    metrics.observe(1, 1e9)
    counts = metrics.latency[1]
    assert counts[0] == 1 and counts[1] == 1 and counts[len(LATENCY_BUCKETS)] == 1
    assert sum(counts[:-1]) == 3


def test_worker_metrics_cap_the_cmd_series() -> None:
    metrics = WorkerMetrics()
    for cmd in range(MAX_CMD_SERIES + 10):
        metrics.observe(cmd, 0.001)
        metrics.reply(cmd, 0)
    assert len(metrics.latency) == MAX_CMD_SERIES + 1
    assert sum(metrics.latency[OTHER_CMD][:-1]) == 10
    snapshot = metrics.snapshot()
    assert [OTHER_CMD, 0, 10] in snapshot["replies"]


def test_child_counters_keep_the_totals_of_dead_children() -> None:
    counters = ChildCounters()
    one = WorkerMetrics()
    one.observe(1, 0.001)
    one.reply(1, 0)
    counters.update(100, {"stats": {"accepted": 3}, **one.snapshot()})
    counters.update(200, {"stats": {"accepted": 2}})
    assert counters.totals().stats["accepted"] == 5
    counters.exited(100)
    counters.update(101, {"stats": {"accepted": 1}})  # its replacement starts from zero
    totals = counters.totals()
    assert totals.stats["accepted"] == 6
    assert totals.replies[1, 0] == 1
    assert sum(totals.latency[1][:-1]) == 1


def test_the_c_loop_puts_a_latency_in_the_bucket_the_metrics_do():
    """The worker's C loop counts latencies itself: the same bucket as WorkerMetrics.observe
    (bisect_left: a bound belongs to its own bucket), at and next to every bound."""
    from aserver.worker import dispatcher

    if dispatcher._c_inline is None:
        pytest.skip("the C inline loop was not built here (no C compiler at install time)")
    bucket = dispatcher._c_inline.latency_bucket
    for bound in LATENCY_BUCKETS:
        for seconds in (math.nextafter(bound, 0), bound, math.nextafter(bound, 1)):
            assert bucket(seconds) == bisect.bisect_left(LATENCY_BUCKETS, seconds), seconds
    assert (bucket(0.0), bucket(1e9)) == (0, len(LATENCY_BUCKETS))


def test_a_c_loop_given_unusable_metrics_keeps_the_ones_it_had():
    """Re-initialising a runner with metrics it cannot count into raises and changes
    nothing (it used to leave the runner half set up, and the next request crashed)."""
    from types import SimpleNamespace

    from aserver.app import Request
    from aserver.protocol import PacketCodec
    from aserver.worker import dispatcher

    if dispatcher._c_inline is None:
        pytest.skip("the C inline loop was not built here (no C compiler at install time)")
    outbox: dict = {}
    setup = dict(handlers={1: lambda request: request.body}, fallback=None, outbox=outbox,
                 new_box=lambda conn_id: outbox.setdefault(conn_id, [0, 0]), request_type=Request,
                 cancelled=asyncio.CancelledError, big_endian=False, max_body=1000)
    metrics = WorkerMetrics()
    runner = dispatcher._c_inline.InlineRunner(**setup, metrics=metrics)
    with pytest.raises(AttributeError):
        runner.__init__(**setup, metrics=object())
    with pytest.raises(TypeError, match="must be dicts"):
        runner.__init__(**setup, metrics=SimpleNamespace(latency=[], replies={}))
    packets = PacketCodec().encode(1, b"x", seq_num=1) * 2
    assert runner.run(SimpleNamespace(id=7, closed=False), packets, 0) == (len(packets), 2, None)
    assert (sum(metrics.latency[1][:-1]), metrics.replies) == (2, {1 << 32: 2})
