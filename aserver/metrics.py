"""Metrics kept inside the children, cheap enough for the request path.

Workers count with plain dicts and lists (no prometheus_client objects, no locks): per
request one bisect on a small tuple and two list increments, per reply one dict
increment. The supervisor asks each child for a `snapshot()` over the control channel
when Prometheus scrapes it and adds them up (aserver/supervisor/metrics.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any

# Upper bounds (seconds) of the handler latency buckets; a last bucket holds the rest (+Inf).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
# A client chooses cmd_id (u16): past this many distinct ones per worker, new ones are
# counted under OTHER_CMD so a hostile client cannot blow up the series count.
MAX_CMD_SERIES = 256
OTHER_CMD = -1


class WorkerMetrics:
    """Handler latency and replies by cmd_id (and status), in one worker."""

    def __init__(self) -> None:
        # cmd -> [count of each bucket ..., count above the last bound, sum of seconds]
        self.latency: dict[int, list] = {}
        # cmd << 32 | status -> replies sent
        self.replies: dict[int, int] = {}
        self._cmds: set[int] = set()

    def observe(self, cmd: int, seconds: float) -> None:
        """One request of `cmd` ran for `seconds`."""
        try:
            counts = self.latency[cmd]
        except KeyError:
            counts = self._histogram(cmd)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # bisect_left: a bound is inclusive (le)
        counts[-1] += seconds

    def reply(self, cmd: int, status: int) -> None:
        """A reply of `cmd` with `status` was sent."""
        key = cmd << 32 | status
        try:
            self.replies[key] += 1
        except KeyError:
            key = self._series(cmd) << 32 | status
            self.replies[key] = self.replies.get(key, 0) + 1

    def _series(self, cmd: int) -> int:
        if cmd in self._cmds or len(self._cmds) < MAX_CMD_SERIES:
            self._cmds.add(cmd)
            return cmd
        return OTHER_CMD

    def _histogram(self, cmd: int) -> list:
        series = self._series(cmd)
        counts = self.latency.get(series)
        if counts is None:
            counts = self.latency[series] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        return counts

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly: the control channel encodes messages as JSON."""
        return {
            "latency": [[cmd, counts] for cmd, counts in self.latency.items()],
            "replies": [[key >> 32, key & 0xFFFFFFFF, n] for key, n in self.replies.items()],
        }


def conn_snapshot(server: Any, rings: bool = True) -> dict[str, Any]:
    """What a conn process (aserver.conn.server.ConnServer) reports: its event counters,
    open connections, and the fill level of each ring pair it shares with a worker
    (`rings=False` once they are closed). A `server.metrics` (WorkerMetrics of requests
    answered in the conn process itself) is merged in like a worker's."""
    snapshot = {
        "stats": dict(server.stats),
        "connections": len(server.connections),
        "in_flight": sum(conn.outstanding for conn in server.connections.values()),
        "rings": [[link.index, link.sender.fill, link.receiver.fill] for link in server.links] if rings else [],
    }
    metrics = getattr(server, "metrics", None)
    if isinstance(metrics, WorkerMetrics):
        snapshot.update(metrics.snapshot())
    return snapshot


class Totals:
    """Counters added up over snapshots of several children (or incarnations)."""

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.latency: dict[int, list] = {}
        self.replies: Counter[tuple[int, int]] = Counter()

    def add(self, snapshot: dict[str, Any]) -> None:
        self.stats.update(snapshot.get("stats", {}))
        for cmd, counts in snapshot.get("latency", ()):
            mine = self.latency.get(cmd)
            if mine is None:
                self.latency[cmd] = list(counts)
            else:
                for i, n in enumerate(counts):
                    mine[i] += n
        for cmd, status, n in snapshot.get("replies", ()):
            self.replies[cmd, status] += n

    def copy(self) -> Totals:
        other = Totals()
        other.stats = Counter(self.stats)
        other.latency = {cmd: list(counts) for cmd, counts in self.latency.items()}
        other.replies = Counter(self.replies)
        return other


class ChildCounters:
    """In the supervisor: the latest snapshot of each running child (by pid), plus the
    totals of every child that exited, so counters never go down when a child restarts."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, Any]] = {}
        self.dead = Totals()

    def update(self, pid: int | None, snapshot: dict[str, Any]) -> None:
        if pid is not None:
            self.live[pid] = snapshot

    def exited(self, pid: int | None) -> None:
        snapshot = self.live.pop(pid, None) if pid is not None else None
        if snapshot is not None:
            self.dead.add(snapshot)

    def totals(self) -> Totals:
        totals = self.dead.copy()
        for snapshot in self.live.values():
            totals.add(snapshot)
        return totals
