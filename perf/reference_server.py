"""The yardstick: a single-process uvloop echo server with aserver's framing.

    python perf/reference_server.py --bind 127.0.0.1:7001

Every packet is decoded (all five header fields, so a real server could dispatch on cmd_id)
and its reply header re-encoded with status 0, in place in a copy of the received run; all
replies of one `data_received` go out in one `transport.write`. No handler call, no
coroutine per request: this is about as fast as a Python asyncio server for this protocol
gets, so aserver's multi-process path is measured against it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys

import uvloop

HEADER = struct.Struct("<IIHII")
HEADER_SIZE = HEADER.size
LENGTH = struct.Struct("<I")
MAX_PACKET = 1024 * 1024


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("_buffer", "transport")

    def __init__(self) -> None:
        self._buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        end = complete_end(data)
        if end < 0:
            self.transport.abort()  # type: ignore[union-attr]
            return
        self._buffer = data[end:] if end < len(data) else b""
        if end:
            self.transport.write(echo_run(data, end))  # type: ignore[union-attr]


def complete_end(data: bytes) -> int:
    """Offset just past the last complete packet in `data`; -1 on a bad length."""
    unpack_len = LENGTH.unpack_from
    size = len(data)
    end = 0
    while size - end >= 4:
        (length,) = unpack_len(data, end)
        if length < HEADER_SIZE or length > MAX_PACKET:
            return -1
        if size - end < length:
            break
        end += length
    return end


def echo_run(data: bytes, end: int) -> bytearray:
    """Replies for the complete packets in data[:end]: same header and body, status 0."""
    out = bytearray(memoryview(data)[:end])
    unpack, pack_into = HEADER.unpack_from, HEADER.pack_into
    pos = 0
    while pos < end:
        length, seq, cmd, _status, user = unpack(out, pos)
        pack_into(out, pos, length, seq, cmd, 0, user)
        pos += length
    return out


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=1024, reuse_address=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    bound = server.sockets[0].getsockname()
    print(f"reference ready: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Single-process uvloop echo server (benchmark yardstick).")
    parser.add_argument("--bind", default="127.0.0.1:7001", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    uvloop.run(serve(host.strip("[]"), int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
