"""Load generator for the aserver wire protocol: N connections x D requests in flight.

    python perf/loadgen.py --target 127.0.0.1:7000 -c 50 -d 16 -b 64 -t 5 [--processes 2]

or from Python: `run(LoadConfig(...))` returns a result dict.

Why it is cheap enough to measure a server with:
- Every request of a connection is precomputed in a ring of K packets (seq_num cycles with
  period K > D, user_id is per connection, bodies are random slices). The echo reply of a
  request is the request itself (status 0 in both), so the expected reply stream of a
  connection is exactly its request stream: verification is one bytes comparison per
  `data_received`, with no per-request Python objects. Only when that comparison fails are
  the packets decoded one by one to count and describe the bad replies.
- When replies complete, as many new requests are sent at once, in one write.
- Latency is sampled, not recorded for every request: one tracked request per connection
  at a time (the last one of a write), which at depth 1 is every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import uvloop

HEADER = struct.Struct("<IIHII")
HEADER_SIZE = HEADER.size
RING_BYTES = 256 * 1024  # request bytes precomputed per connection (at least 2*D packets)
# Ring bytes one process may hold: 1,000 connections x 16 in flight x 16 KiB need 2*D packets
# each (0.5 GB); above the budget connections share rings (see ring_plan).
RING_BUDGET = 64 * 1024 * 1024
MAX_ERROR_SAMPLES = 5


@dataclass
class LoadConfig:
    host: str = "127.0.0.1"
    port: int = 7000
    connections: int = 50
    depth: int = 16  # requests in flight per connection
    body: int = 64  # body bytes per request
    duration: float = 5.0  # measured seconds
    warmup: float = 1.0  # seconds of load before measuring
    cmd_id: int = 1
    processes: int = 1
    start_at: float | None = None  # time.monotonic() at which measuring starts (default: now + warmup)
    drain_timeout: float = 5.0  # seconds to wait for in-flight replies after the window


# Requests ----------------------------------------------------------------------------------


def build_ring(cmd_id: int, user_id: int, body: int, depth: int, rng: random.Random,
               ring_bytes: int = RING_BYTES) -> tuple[bytes, int]:
    """K back-to-back request packets for one connection; returns (ring, K)."""
    pkt = HEADER_SIZE + body
    count = max(2 * depth, ring_bytes // pkt, 2)
    pool = rng.randbytes(body + 4096)
    seq_base = rng.getrandbits(32)
    parts = []
    for i in range(count):
        off = rng.randrange(4096)
        parts.append(HEADER.pack(pkt, (seq_base + i) & 0xFFFFFFFF, cmd_id, 0, user_id))
        parts.append(pool[off : off + body])
    return b"".join(parts), count


def ring_plan(connections: int, pkt: int, depth: int, budget: int = RING_BUDGET) -> tuple[int, int]:
    """(ring bytes per connection, distinct rings) for `connections` within `budget`.

    Rings shrink first (down to 2*D packets); only then do connections share rings
    round-robin. Sharing connections have the same user_id and seq_nums, so a reply
    crossed between two of them could go unnoticed; every other check still holds.
    """
    ring_bytes = max(2 * depth * pkt, min(RING_BYTES, budget // connections))
    return ring_bytes, max(1, min(connections, budget // ring_bytes))


def raise_open_files(need: int) -> None:
    """Lift the soft RLIMIT_NOFILE to `need` (up to the hard limit) for many connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


def ring_slice(ring: bytes, start: int, size: int) -> bytes:
    """`size` bytes of the endless repetition of `ring`, from byte offset `start`."""
    ring_len = len(ring)
    start %= ring_len
    end = start + size
    if end <= ring_len:
        return ring[start:end]
    out = bytearray(ring[start:])
    size -= ring_len - start
    while size > ring_len:
        out += ring
        size -= ring_len
    out += ring[:size]
    return bytes(out)


def describe_mismatch(got: bytes, want: bytes) -> str:
    """Name the fields in which one reply packet differs from the expected one."""
    if len(got) < HEADER_SIZE:
        return f"short packet ({len(got)} bytes)"
    names = ("pkg_len", "seq_num", "cmd_id", "status", "user_id")
    g, w = HEADER.unpack_from(got), HEADER.unpack_from(want)
    diffs = [f"{n} {gv} != {wv}" for n, gv, wv in zip(names, g, w, strict=True) if gv != wv]
    if got[HEADER_SIZE:] != want[HEADER_SIZE:]:
        diffs.append("body differs")
    return ", ".join(diffs) or "unknown difference"


# One connection ----------------------------------------------------------------------------


class Stats:
    """Shared by the connections of one process."""

    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.closed_early = 0

    def error(self, text: str, count: int = 1) -> None:
        self.errors += count
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)


class LoadProtocol(asyncio.Protocol):
    def __init__(self, ring: bytes, pkt: int, depth: int, stats: Stats, done: asyncio.Future) -> None:
        self.ring = ring
        self.pkt = pkt
        self.depth = depth
        self.stats = stats
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.sent = 0  # requests written
        self.received = 0  # reply bytes received (and verified)
        self.bad = False  # a mismatch was seen: stop pipelining, finish quietly
        self.track_index = -1  # request number whose send time is in track_time
        self.track_time = 0.0

    @property
    def completed(self) -> int:
        return self.received // self.pkt

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send(self.depth)

    def send(self, count: int) -> None:
        pkt = self.pkt
        self.transport.write(ring_slice(self.ring, self.sent * pkt, count * pkt))  # type: ignore[union-attr]
        self.sent += count
        if self.track_index < 0:
            self.track_index = self.sent - 1
            self.track_time = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        start = self.received
        size = len(data)
        if self.bad:
            return
        if start + size > self.sent * self.pkt:
            self.fail(data[: self.sent * self.pkt - start], start)
            self.stats.error(f"{start + size - self.sent * self.pkt} bytes beyond the requests sent")
            return
        if data != ring_slice(self.ring, start, size):
            self.fail(data, start)
            return
        before = start // self.pkt
        self.received = start + size
        now_done = self.received // self.pkt
        if now_done == before:
            return
        stats = self.stats
        if self.track_index >= 0 and now_done > self.track_index:
            if stats.measuring:
                stats.latencies.append(time.perf_counter() - self.track_time)
            self.track_index = -1
        if not stats.stopping:
            self.send(now_done - before)
        elif now_done == self.sent and not self.done.done():
            self.done.set_result(None)

    def fail(self, data: bytes, start: int) -> None:
        """Count every bad reply packet in `data` (a byte-exact mismatch somewhere)."""
        pkt = self.pkt
        head = start % pkt
        # Re-align on a packet boundary: the first `head` bytes of this packet already matched.
        stream = ring_slice(self.ring, start - head, head) + data
        want = ring_slice(self.ring, start - head, len(stream))
        bad = 0
        for pos in range(0, len(stream) - pkt + 1, pkt):
            got_packet, want_packet = stream[pos : pos + pkt], want[pos : pos + pkt]
            if got_packet != want_packet:
                bad += 1
                if len(self.stats.error_samples) < MAX_ERROR_SAMPLES:
                    number = (start - head + pos) // pkt
                    self.stats.error_samples.append(
                        f"reply #{number}: {describe_mismatch(got_packet, want_packet)}"
                    )
        self.stats.errors += max(bad, 1)
        # The stream may be out of step from here on: stop this connection.
        self.bad = True
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if not self.stats.stopping or self.completed < self.sent:
                self.stats.closed_early += 1
            self.done.set_result(None)


# One process -------------------------------------------------------------------------------


async def _run_connections(cfg: LoadConfig, first_index: int, count: int, start_at: float) -> dict:
    loop = asyncio.get_running_loop()
    stats = Stats()
    rng = random.Random(first_index * 7919 + os.getpid())
    pkt = HEADER_SIZE + cfg.body
    protocols: list[LoadProtocol] = []
    raise_open_files(count + 64)
    ring_bytes, ring_count = ring_plan(count, pkt, cfg.depth)
    connect_start = time.monotonic()
    rings = [build_ring(cfg.cmd_id, first_index + i + 1, cfg.body, cfg.depth, rng, ring_bytes)[0]
             for i in range(ring_count)]
    for i in range(count):
        ring = rings[i % ring_count]
        done = loop.create_future()
        _, proto = await loop.create_connection(
            lambda ring=ring, done=done: LoadProtocol(ring, pkt, cfg.depth, stats, done), cfg.host, cfg.port
        )
        protocols.append(proto)

    connected = time.monotonic()
    # A server slow to accept must not eat the window: it then starts a warm-up after the last
    # connect (and a bench's CPU sampler, timed to start_at, no longer lines up: see connect_s).
    start_at = max(start_at, connected + cfg.warmup)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    stats.measuring = True
    done_before = sum(p.completed for p in protocols)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.sleep(max(0.0, start_at + cfg.duration - t0))
    t1 = time.monotonic()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    done_after = sum(p.completed for p in protocols)
    stats.measuring = False
    stats.stopping = True

    for p in protocols:  # connections already idle will not see another reply
        if p.completed == p.sent and not p.done.done():
            p.done.set_result(None)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), cfg.drain_timeout)
    except TimeoutError:
        pass
    missing = sum(p.sent - p.completed for p in protocols if not p.bad)
    if missing:
        stats.error(f"{missing} replies never arrived within {cfg.drain_timeout}s", missing)
    for p in protocols:
        if not p.done.done():
            p.done.set_result(None)  # accounted for above; closing it is not a server fault
        if p.transport is not None:
            p.transport.close()
    await asyncio.sleep(0)
    return {
        "completed": done_after - done_before,
        "connect_s": connected - connect_start,
        "elapsed": t1 - t0,
        "latencies": stats.latencies,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "closed_early": stats.closed_early,
        "cpu": (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime),
    }


def _process_main(cfg: LoadConfig, first_index: int, count: int, start_at: float) -> dict:
    return uvloop.run(_run_connections(cfg, first_index, count, start_at))


def _child(cfg: LoadConfig, first_index: int, count: int, start_at: float, queue: multiprocessing.Queue) -> None:
    try:
        queue.put(_process_main(cfg, first_index, count, start_at))
    except BaseException as exc:
        queue.put({"exception": f"{type(exc).__name__}: {exc}"})
        raise


# Whole run ---------------------------------------------------------------------------------


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _merge(cfg: LoadConfig, parts: list[dict]) -> dict:
    failures = [p["exception"] for p in parts if "exception" in p]
    if failures:
        raise RuntimeError("load generator process failed: " + "; ".join(failures))
    latencies = sorted(x for p in parts for x in p["latencies"])
    elapsed = max(p["elapsed"] for p in parts)
    completed = sum(p["completed"] for p in parts)
    cpu = sum(p["cpu"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    closed_early = sum(p["closed_early"] for p in parts)
    return {
        "config": asdict(cfg),
        "requests": completed,
        "elapsed_s": elapsed,
        "req_per_s": completed / elapsed if elapsed > 0 else 0.0,
        # Reply bytes (headers included); requests carry the same amount the other way.
        "bytes_per_s": completed * (HEADER_SIZE + cfg.body) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": _percentile(latencies, 0.50) * 1e3,
            "p99": _percentile(latencies, 0.99) * 1e3,
            "p99.9": _percentile(latencies, 0.999) * 1e3,
            "samples": len(latencies),
        },
        "errors": errors + closed_early,
        "error_samples": [s for p in parts for s in p["error_samples"]][:MAX_ERROR_SAMPLES]
        + ([f"{closed_early} connections closed by the server"] if closed_early else []),
        "client_cpu_s": cpu,
        "connect_s": max(p["connect_s"] for p in parts),  # slowest process to open its connections
        "client_cpu_cores": cpu / elapsed if elapsed > 0 else 0.0,  # 1.0 = one core busy all window
    }


def run(cfg: LoadConfig) -> dict:
    """Run the load (blocking; must not be called from a running event loop); returns the result."""
    if cfg.connections < 1 or cfg.depth < 1 or cfg.processes < 1:
        raise ValueError("connections, depth and processes must be >= 1")
    processes = min(cfg.processes, cfg.connections)
    start_at = cfg.start_at if cfg.start_at is not None else time.monotonic() + 0.2 * processes + cfg.warmup
    shares = _shares(cfg.connections, processes)
    firsts = [sum(shares[:i]) for i in range(processes)]
    if processes == 1:
        return _merge(cfg, [_process_main(cfg, 0, cfg.connections, start_at)])
    # fork: children start in ~ms and need nothing pickled but the config.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(cfg, first, share, start_at, queue), daemon=True)
        for first, share in zip(firsts, shares, strict=True)
    ]
    for child in children:
        child.start()
    deadline = start_at + cfg.duration + cfg.drain_timeout + 30
    parts = [queue.get(timeout=max(1.0, deadline - time.monotonic())) for _ in children]
    for child in children:
        child.join(timeout=5)
    return _merge(cfg, parts)


def format_result(result: dict) -> str:
    lat = result["latency_ms"]
    cfg = result["config"]
    text = (
        f"{cfg['connections']} conns x {cfg['depth']} in flight, {cfg['body']} B bodies, "
        f"{cfg['processes']} client process(es)\n"
        f"  {result['req_per_s']:,.0f} req/s, {result['bytes_per_s'] / 1e6:,.1f} MB/s of replies "
        f"({result['requests']:,} in {result['elapsed_s']:.2f} s)\n"
        f"  latency p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, p99.9 {lat['p99.9']:.3f} ms "
        f"({lat['samples']:,} samples)\n"
        f"  client CPU {result['client_cpu_s']:.2f} s = {result['client_cpu_cores']:.2f} cores\n"
        f"  errors {result['errors']}"
    )
    for sample in result["error_samples"]:
        text += f"\n    {sample}"
    return text


def parse_target(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None, client: Callable[[LoadConfig], dict] | None = None,
         description: str = __doc__) -> int:
    """The command line; `client` runs the load (default: this module's `run`; cload.py
    passes the C client's)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:7000", metavar="HOST:PORT")
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-d", "--depth", type=int, default=16, help="requests in flight per connection")
    parser.add_argument("-b", "--body", type=int, default=64, help="body bytes per request")
    parser.add_argument("-t", "--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--cmd", type=int, default=1, help="cmd_id (must be an echo command)")
    parser.add_argument("-p", "--processes", type=int, default=1, help="client processes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    host, port = parse_target(args.target)
    cfg = LoadConfig(host, port, args.connections, args.depth, args.body, args.duration, args.warmup,
                     args.cmd, args.processes)
    result = (client or run)(cfg)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
