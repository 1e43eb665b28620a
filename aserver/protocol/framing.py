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
            return self._feed_after_partial(data)
        unpack_length = self._length.unpack_from
        max_len = self.max_len
        size = len(data)
        end = 0
        count = 0
        while size - end >= 4:
            (length,) = unpack_length(data, end)
            if length < HEADER_SIZE or length > max_len:
                self.count = 0
                raise ProtocolError(f"packet length {length} outside [{HEADER_SIZE}, {max_len}]",
                                    bytes(memoryview(data)[:end]), count)
            if size - end < length:
                break
            end += length
            count += 1
        self.count = count
        if end == size:
            return data
        self._buffer = bytearray(memoryview(data)[end:])  # the start of the next packet
        return memoryview(data)[:end]

    def _feed_after_partial(self, data: bytes | bytearray | memoryview) -> bytes | bytearray:
        """A packet was cut short by the last read: copy in only what completes it, then
        frame the rest of `data` in place. (Appending all of `data` to the buffer first
        copied every byte twice more, for large packets most of the conn's time.)"""
        buffer = self._buffer
        view = memoryview(data)
        if len(buffer) < 4:
            take = 4 - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < 4:
                self.count = 0
                return b""
        (length,) = self._length.unpack_from(buffer, 0)
        if length < HEADER_SIZE or length > self.max_len:
            self._buffer = bytearray()
            self.count = 0
            raise ProtocolError(f"packet length {length} outside [{HEADER_SIZE}, {self.max_len}]")
        missing = length - len(buffer)
        if len(view) < missing:
            buffer += view
            self.count = 0
            return b""
        buffer += view[:missing]
        self._buffer = bytearray()
        if len(view) == missing:
            self.count = 1
            return buffer
        try:
            run = self.feed(view[missing:])
        except ProtocolError as exc:
            buffer += exc.run
            raise ProtocolError(str(exc), bytes(buffer), exc.count + 1) from None
        buffer += run
        self.count += 1
        return buffer


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
