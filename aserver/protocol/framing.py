"""Incremental framing: a stream of bytes in, runs of complete packets out.

The decoder hands back *runs* (several whole packets back to back) instead of one object
per packet: the conn process forwards a run to a worker as one ring record, and only the
worker splits it. `iter_packets` does that split.
"""

from __future__ import annotations

from collections.abc import Iterator

from aserver.protocol.header import HEADER_SIZE, Packet, PacketCodec


class ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot continue.

    `run` holds the complete packets that arrived before the offending header (in the
    same feed), so they can still be served before the connection is closed.
    """

    def __init__(self, message: str, run: bytes = b"", count: int = 0) -> None:
        super().__init__(message)
        self.run = run
        self.count = count


class FrameDecoder:
    """Feed bytes in any split; get back the complete packets received so far."""

    __slots__ = ("_buffer", "_length", "count", "max_len")

    def __init__(self, codec: PacketCodec, max_len: int) -> None:
        if max_len < HEADER_SIZE:
            raise ValueError(f"max_len must be at least {HEADER_SIZE}")
        self._length = codec.length
        self.max_len = max_len
        self._buffer = bytearray()
        self.count = 0  # packets in the run the last feed() returned

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished packet held back (0 between packets)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Return every complete packet now available, concatenated (possibly empty).

        Raises ProtocolError on a length below the header size or above max_len, as soon
        as the 4 length bytes have arrived (not after max_len bytes of garbage).
        """
        if self._buffer:
            self._buffer += data
            data = self._buffer
        unpack_length = self._length.unpack_from
        max_len = self.max_len
        size = len(data)
        end = 0
        count = 0
        while size - end >= 4:
            (length,) = unpack_length(data, end)
            if length < HEADER_SIZE or length > max_len:
                run = bytes(memoryview(data)[:end])
                self._buffer = bytearray()
                raise ProtocolError(f"packet length {length} outside [{HEADER_SIZE}, {max_len}]", run, count)
            if size - end < length:
                break
            end += length
            count += 1
        self.count = count
        if end == size:
            if data is self._buffer:
                self._buffer = bytearray()
            return data
        rest = data[end:]
        if data is self._buffer:
            complete = bytes(memoryview(data)[:end])
            self._buffer = bytearray(rest)
            return complete
        self._buffer = bytearray(rest)
        return memoryview(data)[:end]


def iter_packets(run: bytes | bytearray | memoryview, codec: PacketCodec) -> Iterator[Packet]:
    """Split a run of complete packets (as FrameDecoder.feed returns) into Packets."""
    unpack = codec.header.unpack_from
    pos = 0
    size = len(run)
    while pos < size:
        pkg_len, seq, cmd, status, user = unpack(run, pos)
        yield Packet(seq, cmd, status, user, bytes(run[pos + HEADER_SIZE : pos + pkg_len]))
        pos += pkg_len


def split_run(run: bytes | bytearray | memoryview, limit: int, codec: PacketCodec) -> list:
    """Cut a run of complete packets into pieces of at most `limit` bytes, at packet
    boundaries (every single packet must fit in `limit`)."""
    unpack_length = codec.length.unpack_from
    view = memoryview(run)
    pieces = []
    start = pos = 0
    size = len(run)
    while pos < size:
        (length,) = unpack_length(run, pos)
        if pos + length - start > limit:
            pieces.append(view[start:pos])
            start = pos
        pos += length
    pieces.append(view[start:pos])
    return pieces


def count_packets(run: bytes | bytearray | memoryview, codec: PacketCodec) -> int:
    unpack_length = codec.length.unpack_from
    count = pos = 0
    size = len(run)
    while pos < size:
        pos += unpack_length(run, pos)[0]
        count += 1
    return count
