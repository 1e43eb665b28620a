"""The per-record steps of a ring: `WriterCore.try_write`, `ReaderCore.read_batch`, and
`SenderCore.send` (RingSender's: write or queue, and see that it gets published); and
the per-batch ones that publish a side's position and manage its wakeups (`publish`,
`release`, `prepare_sleep`, ...).

`_ring_core.c` is the same in C, built at install time when a C compiler is there, and
ring.py uses that when it can (about 9x less time per record); this module is the
fallback and the readable description. Both keep each side's own position (and the
writer's last view of the reader's) in the object. Layout and wakeup rules: ring.py.
"""

from __future__ import annotations

import os
import struct
import threading
from multiprocessing import shared_memory

DATA_OFFSET = 384
RECORD_HEADER = struct.Struct("<IIQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 16
KIND_WRAP = 0xFFFFFFFF
WORD_CAPACITY, WORD_WRITE_POS, WORD_READ_POS = 0, 8, 16
WORD_READER_SLEEPING, WORD_WRITER_WAITING, WORD_RECORDS_READ = 24, 32, 40

_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier: the lock's atomic instructions order stores before loads."""
    _fence_lock.acquire()
    _fence_lock.release()


def announce_then_load(words: memoryview, word: int, value: int, index: int) -> int:
    """Store one of our words (a position or a flag), then read one of the other side's:
    the fence keeps the load from passing the store (each side announces itself before
    it looks at the other, so no wakeup is lost)."""
    words[word] = value
    fence()
    return words[index]


def announce_and_wake(words: memoryview, word: int, value: int, flag: int, fd: int) -> None:
    """Publish one of our positions, then wake the other side through `fd` if its flag
    says it waits (clearing the flag first: one byte per wait)."""
    if announce_then_load(words, word, value, flag):
        words[flag] = 0
        poke(fd)


def poke(fd: int) -> None:
    """One byte down a wake pipe."""
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass  # the pipe is full of wakeups already


def drain_pipe(fd: int) -> None:
    """Empty a wake pipe's (non-blocking) read end."""
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except BlockingIOError:
        pass


def max_payload(capacity: int) -> int:
    """Largest payload one record may carry: a quarter of the ring, so that an empty ring
    always has room for it whatever the current offset."""
    return capacity // 4 - RECORD_HEADER_SIZE


class _Core:
    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self._seg_buf = shm.buf
        # Slicing the mmap itself copies in or out in one step; a memoryview slice
        # would first make a view object (a third of the cost of a small record).
        self._seg_map = shm._mmap  # type: ignore[attr-defined]
        self._seg_words = shm.buf.cast("Q")
        self.capacity = self._seg_words[WORD_CAPACITY]
        self.max_payload = max_payload(self.capacity)

    def detach(self) -> None:
        """Let go of the segment's buffer (before it is closed)."""
        self._seg_words.release()


class WriterCore(_Core):
    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        super().__init__(shm)
        self.rewind_at = 0
        self._write = 0  # our position, made visible by `publish`
        self._read = 0  # the consumer's position as we last read it
        self.unpublished = 0
        self.unpublished_weight = 0  # what the records since the last publish weigh (see commit)
        self.records_written = 0
        self._reserved = -1  # payload bytes `reserve` found room for (-1: none)
        self._skip = 0

    def try_write(
        self, kind: int, conn_id: int, payload: bytes | bytearray | memoryview | list[bytes | bytearray | memoryview]
    ) -> bool:
        """Copy one record in, or return False when there is no room (nothing written).
        A list payload is its parts one after another (C copies them in without joining)."""
        if kind == KIND_WRAP:
            raise ValueError("record kind 0xFFFFFFFF is the ring's wrap marker")
        if type(payload) is list:
            payload = b"".join(payload)
        length = len(payload)
        at = self.reserve(length)
        if at < 0:
            return False
        self._seg_map[at : at + length] = payload
        self.commit(kind, conn_id, length)
        return True

    def released(self, position: int) -> None:
        """The consumer is done up to `position` (for a ring whose space the producer
        frees, told by the consumer's RELEASE record: see channel.RingReceiver's
        `release`): publish that as the read position."""
        read = self._seg_words[WORD_READ_POS]
        if not read <= position <= self._write:
            raise ValueError(f"release to {position}: the ring holds {read} to {self._write}")
        self._seg_words[WORD_READ_POS] = self._read = position

    def publish(self) -> None:
        """Make written records visible; wake the consumer if it sleeps."""
        if not self.unpublished:
            return
        self.unpublished = self.unpublished_weight = 0
        announce_and_wake(self._seg_words, WORD_WRITE_POS, self._write, WORD_READER_SLEEPING, self.wake_fd)

    def wait_for_space(self) -> bool:
        """Announce that we wait for room. Returns True if room appeared meanwhile
        (then do not wait); otherwise the space pipe will become readable."""
        read = announce_then_load(self._seg_words, WORD_WRITER_WAITING, 1, WORD_READ_POS)
        if read != self._read:
            self._read = read
            self._seg_words[WORD_WRITER_WAITING] = 0
            return True
        return False

    def space_woken(self) -> None:
        """Call when the space pipe is readable, before retrying writes."""
        drain_pipe(self.space_fd)
        self._seg_words[WORD_WRITER_WAITING] = 0
        self._read = self._seg_words[WORD_READ_POS]

    def refer_to(self, segment: memoryview | None, kind: int, min_size: int) -> None:
        """Have list parts (try_write's) that lie in `segment` (another ring's, read in
        place) and are at least `min_size` bytes written as references to it rather than
        copied; such a record's kind gets `kind` as its low byte (records.PACKETS_BY_REF
        says what its payload is). The C writer does this; here, where no address of a
        buffer can be had, every part is copied, which is what a reference stands for."""

    def reserve(self, length: int) -> int:
        """Find room for a record of up to `length` payload bytes. Returns the payload's
        offset in the segment (fill it, then `commit`), or -1 when there is no room.
        Nothing is written, and the room is ours only until the next write."""
        if length < 0 or length > self.max_payload:
            raise ValueError(f"record of {length} bytes exceeds ring limit {self.max_payload}")
        self._reserved = -1
        size = (RECORD_HEADER_SIZE + length + 7) & ~7
        capacity = self.capacity
        write = self._write
        offset = write % capacity
        tail = capacity - offset
        if size > tail:
            need = tail + size
        elif offset >= self.rewind_at and size <= offset and self._seg_words[WORD_READ_POS] == write:
            self._read = write  # everything was consumed: back to the (cache-warm) front
            need = tail + size
        else:
            need = size
        if need > capacity - (write - self._read):
            self._read = self._seg_words[WORD_READ_POS]
            if need > capacity - (write - self._read):
                return -1
        self._reserved = length
        self._skip = need - size  # the tail left before going back to 0 (a WRAP), or 0
        return DATA_OFFSET + RECORD_HEADER_SIZE + (0 if self._skip else offset)

    def commit(self, kind: int, conn_id: int, length: int, weight: int = 1) -> None:
        """Make the first `length` payload bytes of the room `reserve` found a record.
        `weight` is what the record is worth to its consumer, towards waking it (the conn
        process weighs a run of requests by their number; anything else weighs 1)."""
        if not 0 <= kind <= 0xFFFFFFFF:
            raise OverflowError("record kind does not fit in 32 bits")
        if kind == KIND_WRAP:
            raise ValueError("record kind 0xFFFFFFFF is the ring's wrap marker")
        if not 0 <= length <= self._reserved:
            raise ValueError(f"commit of {length} bytes: {max(self._reserved, 0)} were reserved")
        self._reserved = -1
        offset = self._write % self.capacity
        if self._skip:
            if self._skip >= RECORD_HEADER_SIZE:
                RECORD_HEADER.pack_into(self._seg_buf, DATA_OFFSET + offset, 0, KIND_WRAP, 0)
            offset = 0
        RECORD_HEADER.pack_into(self._seg_buf, DATA_OFFSET + offset, length, kind, conn_id)
        need = self._skip + ((RECORD_HEADER_SIZE + length + 7) & ~7)
        self._write += need
        self.unpublished += need  # a skipped tail too: `unpublished` is ring space in use
        self.unpublished_weight += weight
        self.records_written += 1


class ReaderCore(_Core):
    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        super().__init__(shm)
        self._read = 0  # our position, published by `release`
        self._records_read = 0
        self._seg_view = shm.buf.toreadonly()  # in-place payloads are slices of it

    def detach(self) -> None:
        self._seg_view.release()
        super().detach()

    def read_batch(self, limit: int, in_place: bool = False) -> list[tuple[int, int, bytes | memoryview]]:
        """Up to `limit` records as (kind, conn_id, payload); does not free them. Payloads
        are copies, or with `in_place` read-only views of the ring, valid until the reader
        releases them (ring.py's release)."""
        write = self._seg_words[WORD_WRITE_POS]
        read = self._read
        if read == write:
            return []
        buf = self._seg_buf
        mapped = self._seg_map if not in_place else self._seg_view
        capacity = self.capacity
        unpack = RECORD_HEADER.unpack_from
        records = []
        while read < write and len(records) < limit:
            offset = read % capacity
            tail = capacity - offset
            if tail < RECORD_HEADER_SIZE:
                read += tail
                continue
            at = DATA_OFFSET + offset
            length, kind, conn_id = unpack(buf, at)
            if kind == KIND_WRAP:
                read += tail
                continue
            start = at + RECORD_HEADER_SIZE
            records.append((kind, conn_id, mapped[start : start + length]))
            read += (RECORD_HEADER_SIZE + length + 7) & ~7
        self._read = read
        self._records_read += len(records)
        return records

    def mark_taken(self) -> None:
        """Publish how many records we have taken, before handling them: if we die while
        handling them, the producer counts them as taken (maybe half done), never as
        unseen records to send again to our replacement."""
        self._seg_words[WORD_RECORDS_READ] = self._records_read

    def release(self) -> None:
        """Publish our read position (and records taken); wake the producer if it waits
        for room."""
        words = self._seg_words
        if words[WORD_READ_POS] == self._read:
            return
        words[WORD_RECORDS_READ] = self._records_read
        announce_and_wake(words, WORD_READ_POS, self._read, WORD_WRITER_WAITING, self.space_fd)

    def prepare_sleep(self) -> bool:
        """Say we are going to wait. Returns False if records arrived meanwhile (drain
        again instead of waiting)."""
        if announce_then_load(self._seg_words, WORD_READER_SLEEPING, 1, WORD_WRITE_POS) != self._read:
            self._seg_words[WORD_READER_SLEEPING] = 0
            return False
        return True

    def woken(self) -> None:
        """Call when the data pipe is readable, before draining."""
        drain_pipe(self.wake_fd)
        self._seg_words[WORD_READER_SLEEPING] = 0


class SenderCore:
    """The per-record step of channel.RingSender, whose instance holds the state used here
    (`_writer`, `_overflow`, `_loop`, `_publish_scheduled`, `early_publish_bytes`) and
    the slow path, `_wait`."""

    @property
    def records_sent(self) -> int:
        """Sequence number the next record will have (written or waiting in overflow)."""
        return self._writer.records_written + len(self._overflow)  # type: ignore[attr-defined]

    def send(
        self, kind: int, conn_id: int, payload: bytes | bytearray | memoryview | list[bytes | bytearray | memoryview]
    ) -> bool:
        """Write one record (a list payload is its parts back to back) and see that it is
        published: at the end of this loop iteration, or now once `early_publish_bytes`
        are unpublished. If records already wait or the ring is full, `_wait` queues it
        (and returns False)."""
        writer = self._writer  # type: ignore[attr-defined]
        if not self._overflow and writer.try_write(kind, conn_id, payload):  # type: ignore[attr-defined]
            self._published_soon()
            return True
        return self._wait(kind, conn_id, payload)  # type: ignore[attr-defined]

    def reserve(self, length: int) -> memoryview | None:
        """Room in the ring for a record of up to `length` payload bytes, to be filled
        in place (a socket read straight into the ring) and then `commit`ted; None when
        records wait or there is no room (then `send` a copy, which queues it)."""
        if self._overflow:  # type: ignore[attr-defined]
            return None
        writer = self._writer  # type: ignore[attr-defined]
        at = writer.reserve(length)
        return None if at < 0 else writer._buf[at : at + length]  # ring.RingWriter's segment

    def commit(self, kind: int, conn_id: int, length: int, weight: int = 1) -> None:
        """Send the first `length` bytes of the reserved room as a record (of `weight`:
        see WriterCore.commit)."""
        self._writer.commit(kind, conn_id, length, weight)  # type: ignore[attr-defined]
        self._published_soon()

    def _published_soon(self) -> None:
        """A record was written: publish it at the end of this loop iteration, or now
        once `early_publish_bytes` are unpublished and the consumer is awake (it goes on
        with them), or once records of `wake_weight` or `wake_bytes` are (worth waking
        it for)."""
        writer = self._writer  # type: ignore[attr-defined]
        if (
            writer.unpublished >= self.wake_bytes  # type: ignore[attr-defined]
            or writer.unpublished_weight >= self.wake_weight  # type: ignore[attr-defined]
            or (
                writer.unpublished >= self.early_publish_bytes  # type: ignore[attr-defined]
                and not writer._words[WORD_READER_SLEEPING]  # ring.RingWriter's view of the header
            )
        ):
            writer.publish()
        elif not self._publish_scheduled:  # type: ignore[has-type]
            self._loop.call_soon(self._publish)  # type: ignore[attr-defined]
            self._publish_scheduled = True
