"""Python cost of the whole request path, without sockets or a second process.

    python perf/pathbench.py [--connections 50] [--depths 16,1] [--body 64] [--profile DEPTH]

One process runs a conn side (ConnServer, one ClientProtocol per connection on a fake
transport) and a worker side (Dispatcher with handlers/echo.py), joined by real
shared-memory rings and wake pipes, on uvloop. Each round feeds every connection D echo
requests in one read (into the buffer the protocol gives, as the event loop reads a socket)
and runs the loop until all replies were "written".
Prints µs per request for both directions together: the interpreter's share of a request,
which the end-to-end benchmark cannot separate from the kernel's and the scheduler's.
Pin it to a core for steadier numbers (taskset -c 1).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aserver.conn.client_protocol import ClientProtocol  # noqa: E402
from aserver.conn.server import ConnServer  # noqa: E402
from aserver.metrics import WorkerMetrics  # noqa: E402
from aserver.protocol import PacketCodec  # noqa: E402
from aserver.settings import from_dict  # noqa: E402
from aserver.supervisor.child import open_consumer, open_producer  # noqa: E402
from aserver.supervisor.rings import RingSet  # noqa: E402
from aserver.worker.dispatcher import Dispatcher  # noqa: E402
from aserver.worker.process import attach_rings  # noqa: E402
from handlers.echo import app  # noqa: E402


def deliver(protocol: ClientProtocol, data: bytes) -> None:
    """What uvloop does with bytes that arrive for a BufferedProtocol: read them into the
    buffer it gives (the copy stands in for the kernel's), as many reads as that takes."""
    while data:
        buffer = protocol.get_buffer(-1)
        took = min(len(buffer), len(data))
        buffer[:took] = data[:took]
        del buffer
        protocol.buffer_updated(took)
        data = data[took:]


class CountingTransport:
    """Stands in for a client socket: counts reply bytes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.written = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", self.port) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.written += len(chunk)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def measure(connections: int, depths: list[int], body: int, requests: int, profile: int | None,
                  ring_size: int, metrics: bool) -> None:
    loop = asyncio.get_running_loop()
    rings = RingSet(f"aserver-pathbench-{os.getpid()}", 1, 1, ring_size)
    try:
        ((request_producer, reply_consumer),) = rings.for_conn(0)
        ((request_consumer, reply_producer),) = rings.for_worker(0)
        server = ConnServer(from_dict({}), 0, 1, [(open_producer(request_producer), open_consumer(reply_consumer))],
                            loop)
        for link in server.links:
            link.receiver.start()
        codec = PacketCodec()
        dispatcher = Dispatcher(app, codec, loop, 64, 100_000, metrics=WorkerMetrics() if metrics else None)
        attach_rings(dispatcher, loop, [(request_consumer, reply_producer)])
        dispatcher.start()
        clients = []
        for i in range(connections):
            protocol = ClientProtocol(server)
            transport = CountingTransport(10_000 + i)
            protocol.connection_made(transport)  # type: ignore[arg-type]
            clients.append((protocol, transport))
        for depth in depths:
            data = codec.encode(1, os.urandom(body), seq_num=1) * depth
            rounds = max(1, requests // (connections * depth))
            profiler = cProfile.Profile() if depth == profile else None
            best = float("inf")
            for _ in range(1 if profiler else 7):
                if profiler:
                    profiler.enable()
                started = time.perf_counter()
                for _ in range(rounds):
                    for protocol, transport in clients:
                        transport.written = 0
                        deliver(protocol, data)
                    while any(transport.written < len(data) for _, transport in clients):
                        await asyncio.sleep(0)
                best = min(best, (time.perf_counter() - started) / (rounds * connections * depth))
                if profiler:
                    profiler.disable()
            print(f"{connections} connections x {depth:2d} per read, {body} B bodies: "
                  f"{best * 1e6:.2f} us per request", flush=True)
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        for link in server.links:
            link.receiver.close()
            link.requests.release()
            link.sender.close()
        for receiver in dispatcher.receivers:
            receiver.close()
        for sender in dispatcher.senders:
            sender.close()
    finally:
        rings.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--depths", default="16,1", help="requests per read, comma-separated")
    parser.add_argument("--body", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200_000, help="requests per timed pass")
    parser.add_argument("--profile", type=int, help="cProfile one pass at this depth")
    parser.add_argument("--ring-size", type=int, default=8 * 1024 * 1024, help="bytes per ring (ring.size)")
    parser.add_argument("--metrics", action="store_true", help="the worker keeps [metrics] (latency, replies)")
    args = parser.parse_args()
    uvloop.run(measure(args.connections, [int(d) for d in args.depths.split(",")], args.body, args.requests,
                       args.profile, args.ring_size, args.metrics))


if __name__ == "__main__":
    main()
