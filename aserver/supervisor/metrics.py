"""The Prometheus endpoint ([metrics] settings), served by the supervisor.

Why the supervisor collects over the control channel rather than prometheus_client's
multiprocess mode: that mode needs a shared directory with one mmap'ed file per metric
type and pid, cleanup of dead pids' files, and prometheus_client objects (a lock and an
mmap write) on every request in the workers. Here each child keeps plain counters
(aserver/metrics.py); on each scrape the supervisor, which already talks to every child,
asks them for a snapshot and adds the answers up in a custom Collector.

Counters stay monotonic across restarts: the last snapshot of a child that exits is kept
and added to the living children's. Children that stop cleanly (stop, reload) send a
final snapshot; a crashed child's counts since its last snapshot are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from aserver.app import Status
from aserver.metrics import LATENCY_BUCKETS, OTHER_CMD, Totals

if TYPE_CHECKING:
    from aserver.supervisor.supervisor import Child, Supervisor

log = logging.getLogger("aserver.metrics")

SCRAPE_TIMEOUT = 2.0  # per child; a child that does not answer in time shows as down
REQUEST_TIMEOUT = 10.0
_LE = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]


_status_names = {int(s): s.name for s in Status}


def status_label(status: int) -> str:
    """The framework's statuses by name (OK, UNKNOWN_COMMAND, ...), a service's as a number."""
    return _status_names.get(status) or str(status)


def cmd_label(cmd: int) -> str:
    return "other" if cmd == OTHER_CMD else str(cmd)


def families(supervisor: Supervisor, totals: Totals, answers: list[tuple[Child, dict | None]]) -> list[Metric]:
    """Every metric family of one scrape."""
    connections = GaugeMetricFamily("aserver_connections", "Open client connections")
    in_flight = GaugeMetricFamily("aserver_requests_in_flight", "Requests received from clients and not answered yet")
    up = GaugeMetricFamily("aserver_child_up", "1 if the child answered this scrape", labels=["role", "index"])
    fill = GaugeMetricFamily("aserver_ring_fill_bytes", "Bytes of a shared-memory ring in use (records waiting, and a "
                             "skipped end of the ring until the reader passes it)",
                             labels=["conn", "worker", "direction"])
    open_count = pending = 0
    for child, answer in answers:
        up.add_metric([child.role, str(child.index)], 1 if answer is not None else 0)
        if answer is None or child.role != "conn":
            continue
        open_count += answer.get("connections", 0)
        pending += answer.get("in_flight", 0)
        for worker, requests, replies in answer.get("rings", ()):
            fill.add_metric([str(child.index), str(worker), "request"], requests)
            fill.add_metric([str(child.index), str(worker), "reply"], replies)
    connections.add_metric([], open_count)
    in_flight.add_metric([], pending)
    capacity = GaugeMetricFamily("aserver_ring_capacity_bytes", "Bytes each ring holds",
                                 value=supervisor.settings.ring.size)

    stats = totals.stats
    accepted = CounterMetricFamily("aserver_connections_accepted", "Client connections accepted",
                                   value=stats.get("accepted", 0))
    refused = CounterMetricFamily("aserver_connections_refused", "Client connections refused, by reason",
                                  labels=["reason"])
    events = CounterMetricFamily("aserver_conn_events", "Other events counted by the conn processes",
                                 labels=["event"])
    received = CounterMetricFamily("aserver_conn_requests", "Request packets received from clients",
                                   value=stats.get("requests", 0))
    for key, n in sorted(stats.items()):
        if key.startswith("refused_"):
            refused.add_metric([key.removeprefix("refused_")], n)
        elif key not in ("accepted", "requests"):
            events.add_metric([key], n)

    requests = CounterMetricFamily("aserver_requests", "Requests run by the workers, by cmd_id", labels=["cmd_id"])
    latency = HistogramMetricFamily("aserver_handler_latency_seconds", "Time from a request's start in a worker "
                                    "to its handler's return, by cmd_id", labels=["cmd_id"])
    for cmd, counts in sorted(totals.latency.items()):
        cumulative = list(itertools.accumulate(counts[:-1]))
        requests.add_metric([cmd_label(cmd)], cumulative[-1])
        latency.add_metric([cmd_label(cmd)], list(zip(_LE, cumulative, strict=True)), counts[-1])
    replies = CounterMetricFamily("aserver_replies", "Replies sent by the workers, by cmd_id and status",
                                  labels=["cmd_id", "status"])
    for (cmd, status), n in sorted(totals.replies.items()):
        replies.add_metric([cmd_label(cmd), status_label(status)], n)

    restarts = CounterMetricFamily("aserver_child_restarts", "Children restarted after dying, by role",
                                   labels=["role"])
    for role, group in (("conn", supervisor.conns), ("worker", supervisor.workers)):
        restarts.add_metric([role], sum(child.restarts for child in group))
    return [connections, in_flight, accepted, refused, received, events, requests, replies, latency, fill, capacity,
            restarts, up]


class _Snapshot:
    """A Collector that yields the families computed for the scrape in progress."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self.metrics


class MetricsServer:
    """A minimal HTTP/1.1 server on the supervisor's event loop: GET /metrics."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        self.supervisor = supervisor
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot()
        self._registry.register(self._snapshot)
        self._lock = asyncio.Lock()  # one scrape at a time shares the collector

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        supervisor = self.supervisor
        children = supervisor.children
        # Answers also reach supervisor.counters through its message handler.
        answers = await asyncio.gather(*(supervisor.ask(c, "metrics", timeout=SCRAPE_TIMEOUT) for c in children))
        encoder, content_type = choose_encoder(accept)
        async with self._lock:
            self._snapshot.metrics = families(supervisor, supervisor.counters.totals(),
                                              list(zip(children, answers, strict=True)))
            return encoder(self._registry), content_type

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            path = target.partition("?")[0]
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path not in ("/metrics", "/"):
                status, body, content_type = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                status = "200 OK"
                body, content_type = await self.render(headers.get("accept", ""))
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            with contextlib.suppress(Exception):
                writer.close()
