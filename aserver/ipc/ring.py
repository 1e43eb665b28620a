"""A single-producer single-consumer byte ring in shared memory.

Layout (every shared u64 alone on its own 64-byte line, so reads are never torn):

    0    capacity           set once by the creator
    64   write_pos          producer publishes; monotonic byte count
    128  read_pos           consumer publishes (or the producer: see below); monotonic byte count
    192  reader_sleeping    consumer sets before it waits on its wake pipe
    256  writer_waiting     producer sets before it waits for space
    320  records_read       consumer publishes as it takes records: records taken so far
    DATA_OFFSET             capacity bytes of records

`records_read` lets the producer tell, after the consumer died, which of its records the
consumer had taken (those may be half done) and which it never saw (those can be replayed).
So it is published when records are taken, before they are handled; `read_pos` (their
space) may follow later, once the consumer is done with them (see RingReceiver in_place).
A worker's request rings go further: the worker never publishes `read_pos`; it sends
where it read to as a RELEASE record on its reply ring, after the replies that may still
refer to the requests' bytes (records.PACKETS_BY_REF), and the conn process publishes it
(`RingWriter.released`) once it has sent them. Room there comes back with the replies,
so the space pipe below is only the slow poll's safety net for such a ring.

A record is a 16-byte header (payload length u32, kind u32, connection id u64) and its
payload, padded to 8 bytes. A record never wraps: when it does not fit before the end, the
producer writes a WRAP record (or, with under 16 bytes left, nothing) and starts again at 0.
It also starts again at 0, the same way, once it is past `rewind_at` bytes (half the ring)
and finds the ring empty: the front of the ring is still in the CPU caches, while walking
on through megabytes of cold memory made each copy a cache miss (16 KiB bodies: half the
path's time). Not sooner: the skipped tail counts as used until the consumer releases the
WRAP record (after the batch it read it with), so the producer then has only the front to
write in. Rewinding at 256 KiB
left it a nearly full ring for a moment after each rewind: with 16 KiB bodies, one request
in eight paused its connection for room.

Wakeups: the producer writes a byte to the data pipe only when the consumer has said it is
asleep; the consumer writes to the space pipe only when the producer has said it waits.
Each side stores its flag, fences, then re-reads the other side's position, so a wakeup
cannot be lost between the check and the wait (x86 may reorder a store with a later load:
the C core fences, ring_core.fence takes a lock, whose atomic instructions fence). The
side that sends the byte clears the flag first, so a sleeper gets one byte however often
the other side publishes before it runs again (a stale clear is always followed by its
byte, so it cannot lose a wakeup either). Both sides also poll on a slow timer as a
safety net.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from multiprocessing import shared_memory

from aserver.ipc import ring_core
from aserver.ipc.ring_core import (
    DATA_OFFSET,
    KIND_WRAP,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    WORD_CAPACITY,
    WORD_READ_POS,
    WORD_READER_SLEEPING,
    WORD_RECORDS_READ,
    WORD_WRITE_POS,
    WORD_WRITER_WAITING,
    drain_pipe,
)
from aserver.ipc.ring_core import max_payload as max_payload  # part of this module's API
from aserver.native import native

# The per-record and per-batch steps in C when they were built (see ring_core.py).
_c_core = native("aserver.ipc._ring_core")
ReaderCore, WriterCore = (_c_core or ring_core).ReaderCore, (_c_core or ring_core).WriterCore
SenderCore = (_c_core or ring_core).SenderCore  # channel.RingSender's base


def record_size(payload_len: int) -> int:
    return (RECORD_HEADER_SIZE + payload_len + 7) & ~7


def create_segment(name: str, capacity: int) -> shared_memory.SharedMemory:
    """Create a ring's segment (the supervisor does this, and later unlinks it)."""
    capacity = (capacity + 7) & ~7
    shm = shared_memory.SharedMemory(name=name, create=True, size=DATA_OFFSET + capacity)
    words = shm.buf.cast("Q")
    words[WORD_CAPACITY] = capacity
    words.release()
    return shm


def attach_segment(name: str) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(name=name)


def walk_records(buf: memoryview, capacity: int, read: int, write: int) -> Iterator[tuple[int, int, int, int]]:
    """(kind, conn_id, payload offset in the segment, length) of each record between two
    positions, WRAP markers left out."""
    while read < write:
        offset = read % capacity
        tail = capacity - offset
        if tail < RECORD_HEADER_SIZE:
            read += tail
            continue
        length, kind, conn_id = RECORD_HEADER.unpack_from(buf, DATA_OFFSET + offset)
        if kind == KIND_WRAP:
            read += tail
            continue
        yield kind, conn_id, DATA_OFFSET + offset + RECORD_HEADER_SIZE, length
        read += (RECORD_HEADER_SIZE + length + 7) & ~7


def count_records(buf: memoryview, capacity: int, read: int, write: int) -> int:
    """Records between two positions (WRAP markers not counted)."""
    return sum(1 for _ in walk_records(buf, capacity, read, write))


class _RingSide:
    """What both ends share; the per-record step and the positions are in the core
    (ReaderCore or WriterCore), the first base class."""

    capacity: int
    max_payload: int
    detach: Callable[[], None]  # the core's: let go of the segment's buffer

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self._shm = shm  # keeps the mapping alive as long as the views below
        self._buf = shm.buf
        self._words = shm.buf.cast("Q")

    @property
    def segment(self) -> memoryview:
        """The whole shared segment, header first (offsets in PACKETS_BY_REF records
        are into it)."""
        return self._buf

    def fill(self) -> int:
        """Bytes currently in the ring (both positions as published)."""
        return self._words[WORD_WRITE_POS] - self._words[WORD_READ_POS]

    def close(self) -> None:
        self.detach()
        self._words.release()
        self._buf = None
        try:
            self._shm.close()
        except BufferError:
            # A view read in place is still referenced (say, from a traceback someone
            # kept): leave the mapping to the process's exit rather than fail its shutdown.
            pass


class RingWriter(WriterCore, _RingSide):
    """Producer end. `try_write` copies a record in; `publish` makes written records visible.

    Callers batch: write many records, publish once per event-loop iteration (or early,
    once `unpublished` grows), so the consumer sees them with one wakeup.
    """

    def __init__(
        self, shm: shared_memory.SharedMemory, wake_fd: int, space_fd: int, rewind_at: int | None = None
    ) -> None:
        WriterCore.__init__(self, shm)
        _RingSide.__init__(self, shm)
        # Past this offset an empty ring starts again at 0 (see the module docstring).
        self.rewind_at = self.capacity // 2 if rewind_at is None else rewind_at
        self.wake_fd = wake_fd  # data pipe, write end: wakes the consumer
        self.space_fd = space_fd  # space pipe, read end: the consumer says there is room
        self._write = self._words[WORD_WRITE_POS]
        self.unpublished = 0  # bytes written and not yet published
        self._read = self._words[WORD_READ_POS]
        # Records ever written (continues across consumers: the consumer's records_read
        # counts the same sequence). Read from two words that a live consumer publishes
        # separately (records_read leads read_pos for a whole batch read in place): only
        # sound while no consumer is reading, which holds because a producer attaches only
        # at start-up or after the consumer skipped everything, between its batches.
        self.records_written = self._words[WORD_RECORDS_READ] + count_records(
            self._buf, self.capacity, self._words[WORD_READ_POS], self._write
        )

    def room(self) -> int:
        """Bytes free as the consumer last published (contiguous or not)."""
        return self.capacity - (self._write - self._words[WORD_READ_POS])

    def records_taken(self) -> int:
        """How many records the consumer has taken (as it last published)."""
        return self._words[WORD_RECORDS_READ]

    def unread_records(self) -> list[tuple[int, int, bytes]]:
        """Copies of the records the consumer has not taken, in order, as (kind, conn_id,
        payload). Only while no consumer is attached (it died or retired)."""
        in_ring = list(walk_records(self._buf, self.capacity, self._words[WORD_READ_POS], self._write))
        # Records the consumer took but did not release yet come before the untaken ones.
        untaken = in_ring[len(in_ring) - (self.records_written - self._words[WORD_RECORDS_READ]) :]
        return [(kind, conn_id, bytes(self._buf[at : at + length])) for kind, conn_id, at, length in untaken]

    def discard_unread(self) -> None:
        """Mark everything in the ring as consumed. Only while no consumer is attached
        (it died or retired): the producer then re-sends what it wants the next one to see."""
        words = self._words
        self.publish()
        words[WORD_READ_POS] = self._write
        words[WORD_RECORDS_READ] = self.records_written
        words[WORD_READER_SLEEPING] = 0
        words[WORD_WRITER_WAITING] = 0
        self._read = self._write
        drain_pipe(self.space_fd)


class RingReader(ReaderCore, _RingSide):
    """Consumer end. `read_batch` returns records; `release` frees their space."""

    def __init__(self, shm: shared_memory.SharedMemory, wake_fd: int, space_fd: int) -> None:
        ReaderCore.__init__(self, shm)
        _RingSide.__init__(self, shm)
        self.wake_fd = wake_fd  # data pipe, read end
        self.space_fd = space_fd  # space pipe, write end
        self._read = self._words[WORD_READ_POS]
        self._records_read = self._words[WORD_RECORDS_READ]
        self._words[WORD_READER_SLEEPING] = 0

    @property
    def position(self) -> int:
        """Where we have read to (published by `release`, or sent to the producer)."""
        return self._read

    def skip_unread(self) -> None:
        """Drop every published record unread (their producer is gone)."""
        words = self._words
        write = words[WORD_WRITE_POS]
        # Count what is skipped so records_read stays in step with the producer's count.
        self._records_read += count_records(self._buf, self.capacity, self._read, write)
        self._read = write
        self.release()
