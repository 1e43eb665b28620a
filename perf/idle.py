"""Idle connections: what each one costs the server's connection-holding process, from /proc.

    python perf/idle.py --target 127.0.0.1:7000 --pid <conn process pid> -n 10000

Reads VmRSS of the process before and after opening N connections that send nothing
(after the process holds all N sockets, counted in /proc/<pid>/fd), then sends one echo
request on every connection and verifies every reply, and reads VmRSS again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import uvloop
from loadgen import HEADER, HEADER_SIZE, raise_open_files

CONNECT_BATCH = 200  # connects in flight at once: well under the server's listen backlog
ACCEPT_TIMEOUT = 60.0


def vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class OneEcho(asyncio.Protocol):
    """Holds a connection idle; on `ask`, sends one request and checks the reply is its echo."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.reply = bytearray()
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def ask(self) -> asyncio.Future:
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)  # type: ignore[union-attr]
        return self.done

    def data_received(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) >= len(self.request) and self.done is not None and not self.done.done():
            self.done.set_result(bytes(self.reply) == self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(False)


def request_for(index: int) -> bytes:
    body = index.to_bytes(4, "little")
    return HEADER.pack(HEADER_SIZE + len(body), index, 1, 0, index + 1) + body


async def open_all(host: str, port: int, count: int) -> list[OneEcho]:
    loop = asyncio.get_running_loop()
    protocols: list[OneEcho] = []
    for first in range(0, count, CONNECT_BATCH):
        batch = [loop.create_connection(lambda i=i: OneEcho(request_for(i)), host, port)
                 for i in range(first, min(count, first + CONNECT_BATCH))]
        protocols += [proto for _, proto in await asyncio.gather(*batch)]
    return protocols


async def settled_fds(pid: int) -> int:
    """Open files of `pid` once unchanged for 0.3 s (e.g. the readiness probe's socket closed)."""
    last, stable_since = open_fds(pid), time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        await asyncio.sleep(0.05)
        now = open_fds(pid)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


async def wait_accepted(pid: int, fds_before: int, count: int) -> int:
    """Wait until the server holds `count` more sockets (it accepts asynchronously), or the
    timeout; returns how many it holds. A shortfall shows as unanswered connections."""
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while open_fds(pid) < fds_before + count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # let it finish setting up the last ones
    return open_fds(pid) - fds_before


async def measure(host: str, port: int, pid: int, count: int) -> dict:
    raise_open_files(count + 64)
    fds_before = await settled_fds(pid)
    rss_before = vmrss_kib(pid)
    protocols = await open_all(host, port, count)
    try:
        accepted = await wait_accepted(pid, fds_before, count)
        rss_open = vmrss_kib(pid)
        oks = await asyncio.wait_for(asyncio.gather(*(p.ask() for p in protocols)), ACCEPT_TIMEOUT)
        rss_answered = vmrss_kib(pid)
    finally:
        for p in protocols:
            if p.transport is not None:
                p.transport.close()
        await asyncio.sleep(0.1)
    answered = sum(oks)
    return {
        "connections": count,
        "accepted": accepted,
        "rss_before_kib": rss_before,
        "rss_open_kib": rss_open,
        "rss_answered_kib": rss_answered,
        "kib_per_conn_open": (rss_open - rss_before) / count,
        "kib_per_conn_answered": (rss_answered - rss_before) / count,
        "answered": answered,
        "errors": count - answered,
    }


def run(host: str, port: int, pid: int, count: int) -> dict:
    """Blocking; see the module docstring."""
    return uvloop.run(measure(host, port, pid, count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:7000", metavar="HOST:PORT")
    parser.add_argument("--pid", type=int, required=True, help="the process holding the connections")
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    result = run(host.strip("[]") or "127.0.0.1", int(port), args.pid, args.connections)
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
