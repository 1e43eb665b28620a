"""Shared-memory SPSC ring (aserver.ipc.ring) and its event-loop ends (aserver.ipc.channel)."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aserver.ipc import records, ring_core
from aserver.ipc import ring as ring_module
from aserver.ipc.channel import RingReceiver, RingSender, RingSenderBase
from aserver.ipc.ring import (
    DATA_OFFSET,
    RECORD_HEADER,
    RingReader,
    RingWriter,
    attach_segment,
    create_segment,
    max_payload,
    record_size,
)

NO_REWIND = 1 << 62  # a rewind_at no test ring reaches

# -- fixtures -----------------------------------------------------------------------------


class RingPair:
    """A segment, its two pipes and both ends, each end on its own SharedMemory object
    (as in production, where they live in different processes)."""

    def __init__(self, capacity: int, rewind_at: int | None = None) -> None:
        self.rewind_at = rewind_at
        self.name = f"aserver-test-{uuid.uuid4().hex[:16]}"
        self.shm = create_segment(self.name, capacity)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.space_r, self.space_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.writer = RingWriter(attach_segment(self.name), self.wake_w, self.space_r, rewind_at)
        self.reader = RingReader(attach_segment(self.name), self.wake_r, self.space_w)
        self._closed = False

    def reopen_reader(self) -> RingReader:
        self.reader.close()
        self.reader = RingReader(attach_segment(self.name), self.wake_r, self.space_w)
        return self.reader

    def reopen_writer(self) -> RingWriter:
        self.writer.close()
        self.writer = RingWriter(attach_segment(self.name), self.wake_w, self.space_r, self.rewind_at)
        return self.writer

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        self.reader.close()
        for fd in (self.wake_r, self.wake_w, self.space_r, self.space_w):
            os.close(fd)
        self.shm.close()
        self.shm.unlink()


@pytest.fixture
def make_ring():
    made: list[RingPair] = []

    def make(capacity: int, rewind_at: int | None = None) -> RingPair:
        pair = RingPair(capacity, rewind_at)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


def pipe_bytes(fd: int) -> int:
    """Read (and so empty) everything waiting in a non-blocking pipe."""
    total = 0
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
    except BlockingIOError:
        pass
    return total


def pipe_pending(fd: int) -> int:
    """Bytes waiting in a pipe, left there."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def payload_for(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


# -- layout and limits ----------------------------------------------------------------------


def test_capacity_stored_in_header(make_ring):
    pair = make_ring(1000)  # rounded up to 8
    assert pair.writer.capacity == pair.reader.capacity == 1000
    pair = make_ring(1001)
    assert pair.writer.capacity == 1008
    assert pair.shm.size >= DATA_OFFSET + 1008
    assert pair.writer.max_payload == max_payload(1008) == 1008 // 4 - 16


def test_record_larger_than_max_payload_raises(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    limit = w.max_payload
    with pytest.raises(ValueError):
        w.try_write(1, 1, bytes(limit + 1))
    assert w.unpublished == 0
    w.publish()
    assert r.read_batch(10) == []
    assert w.try_write(1, 1, b"z" * limit)
    w.publish()
    assert r.read_batch(10) == [(1, 1, b"z" * limit)]


@settings(max_examples=60, deadline=None)
@given(offset_records=st.lists(st.integers(0, 240), max_size=12))
def test_max_payload_always_fits_in_empty_ring(offset_records):
    """Whatever the current offset, an empty ring takes a record of max_payload bytes."""
    pair = RingPair(1024)
    try:
        w, r = pair.writer, pair.reader
        for n in offset_records:
            assert w.try_write(2, n, bytes(n))
            w.publish()
            assert r.read_batch(5) == [(2, n, bytes(n))]
            r.release()
        big = os.urandom(w.max_payload)
        assert w.try_write(3, 99, big)
        w.publish()
        assert r.read_batch(5) == [(3, 99, big)]
    finally:
        pair.close()


def test_an_empty_ring_past_rewind_at_starts_again_at_the_front() -> None:
    pair = RingPair(4096, rewind_at=256)
    try:
        w, r = pair.writer, pair.reader
        assert w.try_write(1, 1, bytes(300))
        assert w.try_write(1, 2, b"second")  # past 256 but not empty: goes on
        w.publish()
        assert [c for _, c, _ in r.read_batch(10)] == [1, 2]
        assert w.try_write(1, 3, b"third")  # not yet released: still not empty
        w.publish()
        assert r.read_batch(10) == [(1, 3, b"third")]
        r.release()
        assert w.try_write(5, 4, b"front")  # empty now: written at offset 0
        w.publish()
        assert RECORD_HEADER.unpack_from(pair.shm.buf, DATA_OFFSET) == (5, 5, 4)
        assert r.read_batch(10) == [(5, 4, b"front")]
        r.release()
        assert w.fill() == 0
    finally:
        pair.close()


def test_by_default_a_ring_starts_again_at_the_front_only_past_its_middle(make_ring):
    """Until the consumer releases the WRAP record, a rewind leaves the producer only the
    front of the ring: past the middle, that is at least half of it."""
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    assert w.rewind_at == 2048

    def write_drained(conn_id: int, size: int) -> int:
        """Write a record into the emptied ring; the offset it landed at."""
        assert w.try_write(1, conn_id, bytes(size))
        w.publish()
        assert [c for _, c, _ in r.read_batch(10)] == [conn_id]
        r.release()
        return (w._write - record_size(size)) % 4096

    assert write_drained(1, 1008) == 0
    assert write_drained(2, 1000) == 1024  # not past the middle: goes on
    assert write_drained(3, 8) == 2040  # nor here
    assert w.try_write(1, 4, bytes(8))  # past it (2064), and empty: back to the front
    assert (w._write - record_size(8)) % 4096 == 0
    # Until the reader releases the WRAP, the skipped tail counts as used: the front is
    # all the room there is (2064 - 24 bytes: one more record of 1024, not two).
    assert w.try_write(1, 5, bytes(1008)) and not w.try_write(1, 6, bytes(1008))
    w.publish()
    assert [c for _, c, _ in r.read_batch(10)] == [4, 5]
    r.release()
    assert w.try_write(1, 6, bytes(1008))


def test_any_buffer_and_header_fields_kept(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    assert w.try_write(0xFFFFFFFE, 2**64 - 1, b"abcdefg")
    assert w.try_write(0, 0, bytearray(b"xy"))
    assert w.try_write(7, 12345, memoryview(b"-view-")[1:5])
    assert w.try_write(8, 1, b"")
    w.publish()
    assert r.read_batch(10) == [(0xFFFFFFFE, 2**64 - 1, b"abcdefg"), (0, 0, b"xy"), (7, 12345, b"view"), (8, 1, b"")]


def test_read_batch_limit_and_unpublished_invisible(make_ring):
    pair = make_ring(8192)
    w, r = pair.writer, pair.reader
    for i in range(10):
        assert w.try_write(1, i, payload_for(i, i * 3))
    assert r.read_batch(100) == []  # nothing published yet
    w.publish()
    assert [c for _, c, _ in r.read_batch(4)] == [0, 1, 2, 3]
    assert [c for _, c, _ in r.read_batch(4)] == [4, 5, 6, 7]
    assert [c for _, c, _ in r.read_batch(4)] == [8, 9]
    assert r.read_batch(4) == []


def test_full_ring_refuses_without_corruption(make_ring):
    pair = make_ring(4096, NO_REWIND)  # so the records after the drain wrap
    w, r = pair.writer, pair.reader
    written = []
    i = 0
    while True:
        data = payload_for(i, 50 + (i * 37) % 200)
        if not w.try_write(1, i, data):
            break
        written.append((1, i, data))
        i += 1
    before = w.unpublished
    # refused repeatedly, with all sizes that cannot fit, and nothing moves
    for size in (w.max_payload, 200, 100):
        if not w.try_write(9, 999, bytes(size)):
            assert w.unpublished == before
    w.publish()
    assert w.fill() == before
    got = r.read_batch(10_000)
    assert got[: len(written)] == written
    r.release()
    assert w.fill() == 0 or len(got) > len(written)
    # after draining, writing goes on and the next records still arrive intact
    for j in range(50):
        data = payload_for(j, (j * 91) % 700)
        assert w.try_write(4, j, data)
        w.publish()
        assert r.read_batch(10) == [(4, j, data)]
        r.release()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.sampled_from([512, 1000, 1024, 4096]),
    rewind_at=st.sampled_from([NO_REWIND, 64, 300]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 1000), st.integers(1, 3)),
            st.tuples(st.just("write"), st.sampled_from([0, 1, 8, 9, 48, 100]), st.just(1)),
            st.tuples(st.just("fill"), st.integers(0, 1000), st.integers(1, 3)),
            st.tuples(st.just("publish")),
            st.tuples(st.just("read"), st.integers(1, 8)),
            st.tuples(st.just("release")),
        ),
        max_size=150,
    ),
)
@example(  # a write refused after a wrap: the skipped tail must count as space in use
    capacity=512, rewind_at=NO_REWIND,
    ops=[("write", 0, 1), ("write", 73, 1), ("publish",), ("write", 0, 1), ("write", 0, 1), ("write", 1, 1),
         ("read", 2), ("release",), ("write", 0, 1), ("fill", 89, 1), ("write", 0, 1)],
)
def test_interleaved_writes_and_reads_model(capacity, rewind_at, ops):
    """Random interleavings of writes, publishes, reads and releases over a small ring
    (so it wraps often, and is often nearly full; with a small `rewind_at` it also goes
    back to the front whenever it is empty) against a queue model: content, order and
    space accounting."""
    pair = RingPair(capacity, rewind_at)
    try:
        w, r = pair.writer, pair.reader
        cap = w.capacity
        sent: list[tuple[int, int, bytes]] = []
        published = 0  # records visible to the reader
        taken = 0  # records returned by read_batch
        serial = 0

        def write(size: int, n: int) -> bool:
            nonlocal serial
            size %= w.max_payload + 1
            data = os.urandom(size)
            payload = memoryview(data) if n % 2 else data
            used = w.fill() + w.unpublished  # fill(): published write - released read
            pending = w.unpublished
            ok = w.try_write(serial % 5, serial, payload)
            need = record_size(size)
            if ok:
                sent.append((serial % 5, serial, data))
                assert cap - used >= need
                assert w.unpublished >= pending + need
            else:
                assert w.unpublished == pending
                # a refusal is only allowed when the free space is under two records
                # (one that would not fit before the end plus one from the start)
                assert cap - used < 2 * need
            serial += 1
            return ok

        for op in ops:
            if op[0] == "write":
                write(op[1], op[2])
            elif op[0] == "fill":
                while write(op[1], op[2]):
                    pass
            elif op[0] == "publish":
                w.publish()
                published = len(sent)
            elif op[0] == "read":
                got = r.read_batch(op[1])
                expect = sent[taken : min(taken + op[1], published)]
                assert got == expect
                taken += len(got)
            else:
                r.release()
            assert 0 <= w.fill() <= cap
        # drain everything left
        w.publish()
        rest = r.read_batch(10_000)
        assert rest == sent[taken:]
        r.release()
        assert w.fill() == 0
    finally:
        pair.close()


def test_every_offset_and_size_against_spec(make_ring):
    """Deterministic sweep over ring offsets, fill levels and record sizes in a tiny ring,
    checked against the documented rule: a record never wraps; if it does not fit before
    the end, the rest of the line is skipped and it starts at 0; it is accepted exactly
    when that much space is free. (No rewinds: they have their own tests.)"""
    pair = make_ring(256, NO_REWIND)
    w, r = pair.writer, pair.reader
    cap, limit = w.capacity, w.max_payload
    assert (cap, limit) == (256, 48)
    w_pos = r_pos = 0
    queue: list[tuple[int, int, bytes]] = []
    serial = 0

    def write(size: int) -> bool:
        nonlocal w_pos, serial
        need = record_size(size)
        tail = cap - w_pos % cap
        if need > tail:
            need += tail
        fits = need <= cap - (w_pos - r_pos)
        data = payload_for(serial, size)
        assert w.try_write(serial & 7, serial, data) is fits, (w_pos, r_pos, size)
        if fits:
            w_pos += need
            queue.append((serial & 7, serial, data))
        serial += 1
        return fits

    def drain() -> None:
        nonlocal r_pos
        w.publish()
        assert r.read_batch(10_000) == queue
        queue.clear()
        r.release()
        r_pos = w_pos
        assert w.fill() == 0

    for shift in range(0, 33, 8):
        for filler in (0, 8, 17, 24, 40, 48):
            for probe in range(limit + 1):
                assert write(shift)  # moves the start offset around
                while write(filler):
                    pass
                write(probe)
                drain()
                # and from an empty ring at this offset, everything up to the limit fits
                assert write(probe)
                assert write(limit)
                drain()
    assert w_pos > 50 * cap  # the sweep wrapped many times


def test_exact_fill_then_nothing_fits(make_ring):
    pair = make_ring(1024)
    w, r = pair.writer, pair.reader
    size = 128 - 16  # records of exactly 128 bytes: 8 fill the ring to the byte
    for i in range(8):
        assert w.try_write(1, i, payload_for(i, size))
    assert w.unpublished == 1024
    assert not w.try_write(1, 8, b"")  # not even an empty record
    w.publish()
    assert w.fill() == 1024
    assert r.read_batch(100) == [(1, i, payload_for(i, size)) for i in range(8)]
    assert not w.try_write(1, 8, b"")  # read but not released: still full
    r.release()
    assert w.try_write(1, 8, b"")
    w.publish()
    assert r.read_batch(100) == [(1, 8, b"")]


def test_reattached_reader_resumes_after_last_release(make_ring):
    """A replacement consumer finds the records its predecessor never released."""
    pair = make_ring(4096)
    w = pair.writer
    for i in range(5):
        assert w.try_write(1, i, payload_for(i, 10 * i))
    w.publish()
    r = pair.reader
    assert [c for _, c, _ in r.read_batch(2)] == [0, 1]
    r.release()
    assert [c for _, c, _ in r.read_batch(2)] == [2, 3]  # read but never released
    r = pair.reopen_reader()
    assert [c for _, c, _ in r.read_batch(10)] == [2, 3, 4]
    # and a replacement producer continues where the old one published
    w = pair.reopen_writer()
    assert w.try_write(1, 5, b"five")
    w.publish()
    assert r.read_batch(10) == [(1, 5, b"five")]


# -- wakeup protocol ------------------------------------------------------------------------


def test_publish_pokes_only_a_sleeping_reader(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader

    # reader awake: no wake byte
    assert w.try_write(1, 1, b"a")
    w.publish()
    assert pipe_bytes(pair.wake_r) == 0
    assert len(r.read_batch(10)) == 1
    r.release()

    # reader announces sleep on an empty ring: the next publish pokes it
    assert r.prepare_sleep() is True
    w.publish()  # nothing new: no poke
    assert pipe_bytes(pair.wake_r) == 0
    assert w.try_write(1, 2, b"b")
    assert pipe_bytes(pair.wake_r) == 0  # written but not published: no poke yet
    w.publish()
    assert select.select([pair.wake_r], [], [], 0)[0] == [pair.wake_r]
    r.woken()  # drains the pipe, clears the flag
    assert pipe_bytes(pair.wake_r) == 0
    assert len(r.read_batch(10)) == 1
    r.release()

    # after woken(), the reader is awake again: no poke
    assert w.try_write(1, 3, b"c")
    w.publish()
    assert pipe_bytes(pair.wake_r) == 0
    assert len(r.read_batch(10)) == 1


def test_prepare_sleep_refuses_when_records_pending(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    assert w.try_write(1, 1, b"a")
    w.publish()
    assert r.prepare_sleep() is False  # must drain instead of sleeping
    # the flag was cleared again: a later publish does not poke
    assert w.try_write(1, 2, b"b")
    w.publish()
    assert pipe_bytes(pair.wake_r) == 0
    assert len(r.read_batch(10)) == 2
    # read but not released still counts as drained for the reader
    assert r.prepare_sleep() is True
    assert w.try_write(1, 3, b"c")
    w.publish()
    assert pipe_bytes(pair.wake_r) == 1
    r.woken()


def test_poke_on_full_wake_pipe_does_not_raise(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    filled = 0
    try:
        while True:
            filled += os.write(pair.wake_w, b"\0" * 4096)
    except BlockingIOError:
        pass
    assert filled > 0
    assert r.prepare_sleep() is True
    assert w.try_write(1, 1, b"x")
    w.publish()  # the pipe is full: the poke is dropped, not raised
    r.woken()  # drains it completely
    assert pipe_bytes(pair.wake_r) == 0
    assert r.read_batch(10) == [(1, 1, b"x")]


def _fill(w: RingWriter, size: int = 100) -> int:
    n = 0
    while w.try_write(1, n, bytes(size)):
        n += 1
    return n


def test_release_pokes_only_a_waiting_writer(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader

    # writer not waiting: release writes nothing to the space pipe
    n = _fill(w)
    w.publish()
    assert len(r.read_batch(1000)) == n
    r.release()
    assert pipe_bytes(pair.space_r) == 0

    # writer fills the ring and announces it waits
    n = _fill(w)
    w.publish()
    assert w.wait_for_space() is False  # nothing released since the refusal
    assert pipe_bytes(pair.space_r) == 0
    r.release()  # nothing read yet: the position does not move, no poke
    assert pipe_bytes(pair.space_r) == 0
    assert len(r.read_batch(3)) == 3
    r.release()
    assert select.select([pair.space_r], [], [], 0)[0] == [pair.space_r]
    w.space_woken()  # drains, clears the flag, refreshes the read position
    assert pipe_bytes(pair.space_r) == 0
    assert w.try_write(1, 1000, bytes(100))

    # flag cleared: a later release does not poke
    assert len(r.read_batch(3)) == 3
    r.release()
    assert pipe_bytes(pair.space_r) == 0


def test_wait_for_space_sees_room_made_meanwhile(make_ring):
    pair = make_ring(4096)
    w, r = pair.writer, pair.reader
    _fill(w)
    w.publish()
    assert len(r.read_batch(2)) == 2
    r.release()  # writer not yet waiting: no poke
    assert pipe_bytes(pair.space_r) == 0
    # the writer now notices the room instead of sleeping on a pipe nobody will write
    assert w.wait_for_space() is True
    assert w.try_write(1, 1, bytes(100))
    # and its flag is down again: no poke on the next release
    assert len(r.read_batch(2)) == 2
    r.release()
    assert pipe_bytes(pair.space_r) == 0


# -- cross-process stress -------------------------------------------------------------------

CHILD_WRITER = textwrap.dedent(
    """
    import os, select, sys, time
    from multiprocessing import resource_tracker
    # The parent created the segment and unlinks it; this process only attaches.
    resource_tracker.register = lambda *args, **kwargs: None
    from aserver.ipc.ring import RingWriter, attach_segment

    name, wake_fd, space_fd, count, seed = sys.argv[1:6]
    wake_fd, space_fd, count, seed = int(wake_fd), int(space_fd), int(count), int(seed)
    shm = attach_segment(name)
    w = RingWriter(shm, wake_fd, space_fd)
    big = w.max_payload
    stalls = waits = 0
    x = seed
    deadline = time.monotonic() + 9
    i = 0
    while i < count:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        size = big if x % 97 == 0 else (x >> 8) % 600
        data = (i.to_bytes(4, "little") * (size // 4 + 1))[:size]
        while not w.try_write(i & 0xFFFF, i * 2654435761 % 2**64, data):
            w.publish()
            if w.wait_for_space():
                continue
            waits += 1
            ready = select.select([space_fd], [], [], 1.0)[0]
            if not ready and w.fill() < w.capacity // 2:
                # timed out although the reader had made room: give a late poke a
                # second chance, then count a lost wakeup
                if not select.select([space_fd], [], [], 1.0)[0]:
                    stalls += 1
            w.space_woken()
            if time.monotonic() > deadline:
                print("TIMEOUT", i, stalls, flush=True)
                sys.exit(3)
        if (x >> 4) % 13 == 0:
            w.publish()
        i += 1
    w.publish()
    w.close()
    print("DONE", count, stalls, waits, flush=True)
    """
)


def _expected_record(i: int, x: int, big: int) -> tuple[int, tuple[int, int, bytes]]:
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    size = big if x % 97 == 0 else (x >> 8) % 600
    data = (i.to_bytes(4, "little") * (size // 4 + 1))[:size]
    return x, (i & 0xFFFF, i * 2654435761 % 2**64, data)


def test_cross_process_stream_no_loss_no_lost_wakeup(make_ring):
    """A child process pushes 200k records of varying size through a 64 KiB ring while
    this process consumes with the sleep/wake protocol. Every record must arrive, in
    order, intact, and neither side may ever sit out a timeout with work waiting."""
    count, seed = 200_000, 12345
    pair = make_ring(64 * 1024)
    r = pair.reader
    # the child gets its own copies of the producer's pipe ends
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITER, pair.name, str(pair.wake_w), str(pair.space_r), str(count), str(seed)],
        pass_fds=(pair.wake_w, pair.space_r),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        big = r.max_payload
        x = seed
        i = 0
        reader_stalls = 0
        sleeps = 0
        deadline = time.monotonic() + 9
        while i < count:
            assert time.monotonic() < deadline, f"consumer stuck at record {i}"
            records = r.read_batch(256)
            if records:
                r.release()
                for rec in records:
                    x, expect = _expected_record(i, x, big)
                    assert rec == expect, f"record {i} differs"
                    i += 1
                continue
            if not r.prepare_sleep():
                continue
            sleeps += 1
            ready = select.select([pair.wake_r], [], [], 1.0)[0]
            if not ready:
                assert child.poll() is None or child.returncode == 0, child.stderr.read().decode()
                # everything read was released, so fill() > 0 means records were
                # published while we slept; a poke may be a moment late, give it a
                # second chance before calling it lost
                if r.fill() > 0 and not select.select([pair.wake_r], [], [], 1.0)[0]:
                    reader_stalls += 1
            r.woken()
        out, err = child.communicate(timeout=10)
        assert child.returncode == 0, err.decode()
        done, written, writer_stalls, writer_waits = out.decode().split()
        assert (done, written, writer_stalls) == ("DONE", str(count), "0"), (out, err)
        assert r.read_batch(10) == []
        assert reader_stalls == 0
        assert not err, err.decode()
        # both sides really slept on their pipes at some point (the paths under test)
        assert sleeps > 0
        assert int(writer_waits) > 0
        print(f"reader sleeps {sleeps}, writer waits {writer_waits}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- channel: RingSender / RingReceiver -------------------------------------------------------


async def test_sender_overflow_keeps_everything_in_order(make_ring):
    pair = make_ring(4096)
    loop = asyncio.get_running_loop()
    received: list[tuple[int, int, bytes]] = []
    done = asyncio.Event()
    total = 3000
    rooms = []

    def on_records(records):
        received.extend(records)
        if len(received) >= total:
            done.set()

    sender = RingSender(pair.writer, loop, lambda: rooms.append(len(received)))
    receiver = RingReceiver(pair.reader, loop, on_records, batch=64)
    receiver.start()
    results = []
    expected = []
    for i in range(total):
        size = (i * 131) % (sender.max_payload + 1)
        data = payload_for(i, size)
        expected.append((2, i, data))
        results.append(sender.send(2, i, memoryview(data) if i % 2 else bytearray(data)))
    # far more than the ring holds: it overflowed, and from then on send says so
    assert results[0] is True
    first_false = results.index(False)
    assert all(ok is False for ok in results[first_false:])
    assert sender.backlogged
    assert rooms == []
    await asyncio.wait_for(done.wait(), 10)
    assert received == expected
    assert not sender.backlogged
    assert len(rooms) >= 1
    assert rooms[0] > 0  # on_room came after the receiver had drained something
    # after the room callback the sender writes directly again
    assert sender.send(2, total, b"after") is True
    await asyncio.sleep(0.05)
    assert received[-1] == (2, total, b"after")
    receiver.stop()


async def test_sender_respecting_backpressure_with_paused_receiver(make_ring):
    pair = make_ring(8192)
    loop = asyncio.get_running_loop()
    received: list[tuple[int, int, bytes]] = []
    room = asyncio.Event()
    room_calls = 0

    def on_room():
        nonlocal room_calls
        room_calls += 1
        room.set()

    sender = RingSender(pair.writer, loop, on_room)
    receiver = RingReceiver(pair.reader, loop, received.extend, batch=16)
    receiver.start()
    receiver.pause()

    total = 2000
    sent = 0
    blocked_times = 0
    resumed = False
    deadline = loop.time() + 10
    while sent < total:
        assert loop.time() < deadline
        data = payload_for(sent, (sent * 53) % 900)
        ok = sender.send(3, sent, data)
        sent += 1
        if not ok:
            blocked_times += 1
            room.clear()
            if not resumed:
                # the paused receiver leaves the ring full: no room may be announced
                await asyncio.sleep(0.3)
                assert not room.is_set()
                assert received == []
                receiver.resume()
                resumed = True
            await asyncio.wait_for(room.wait(), 5)
        elif sent % 50 == 0:
            await asyncio.sleep(0)
    for _ in range(200):
        if len(received) >= total:
            break
        await asyncio.sleep(0.01)
    assert [(k, c, d) for k, c, d in received] == [(3, i, payload_for(i, (i * 53) % 900)) for i in range(total)]
    assert blocked_times >= 1
    assert room_calls >= blocked_times
    receiver.stop()


async def test_receiver_wakes_on_pipe_after_idle(make_ring):
    """Once the receiver sleeps, a later send is delivered through the wake pipe well
    before the 100 ms safety-net poll."""
    pair = make_ring(4096)
    loop = asyncio.get_running_loop()
    got = asyncio.Queue()
    sender = RingSender(pair.writer, loop, lambda: None)
    receiver = RingReceiver(pair.reader, loop, lambda recs: [got.put_nowait(x) for x in recs])
    receiver.start()
    await asyncio.sleep(0.02)  # receiver finds the ring empty and goes to sleep
    for n in range(5):
        t0 = loop.time()
        assert sender.send(1, n, b"ping")
        assert await asyncio.wait_for(got.get(), 1) == (1, n, b"ping")
        assert loop.time() - t0 < 0.08
        await asyncio.sleep(0.01)
    receiver.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.sampled_from([512, 1000, 4096]),
    rewind_at=st.sampled_from([NO_REWIND, 64, 300]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 120), st.integers(0, 2**32 - 1)),
            st.tuples(st.just("write"), st.integers(0, 1100), st.integers(0, 2**32 - 1)),
            # reserve room for up to `size` bytes, fill `fill`, commit `commit` of them (if any
            # room): a socket read straight into the ring
            st.tuples(st.just("reserve"), st.integers(0, 1100), st.integers(0, 1100), st.integers(0, 1100),
                      st.sampled_from([2, 2**32 - 1])),
            st.tuples(st.just("publish")),
            st.tuples(st.just("read"), st.integers(1, 8)),
            st.tuples(st.just("release")),
            # the producer frees what the consumer read (a RELEASE record), or past its end
            st.tuples(st.just("released"), st.sampled_from([0, 8])),
            st.tuples(st.just("drain")),  # publish, read everything, release: an empty ring
            st.tuples(st.just("mark_taken")),
            # the wakeup steps: a side says it sleeps or waits; the other's publish or
            # release pokes it; it is woken (its pipe drained)
            st.tuples(st.sampled_from(["prepare_sleep", "wait_for_space", "woken", "space_woken"])),
        ),
        max_size=120,
    ),
)
@example(capacity=512, rewind_at=64, ops=[("write", 100, 1), ("drain",), ("write", 100, 2)])  # rewind
@example(capacity=512, rewind_at=NO_REWIND, ops=[("write", 100, 1)] * 5 + [("drain",), ("write", 100, 2)])  # wrap
@example(  # kind 0xFFFFFFFF would read as a wrap marker: both refuse it
    capacity=512, rewind_at=64, ops=[("write", 57, 0), ("drain",), ("write", 0, 2**32 - 1), ("drain",), ("write", 0, 0)]
)
@example(capacity=512, rewind_at=NO_REWIND, ops=[("write", 300, 1), ("drain",), ("reserve", 100, 50, 40, 2),
                                                 ("reserve", 100, 100, 101, 2), ("reserve", 0, 0, 0, 2**32 - 1)])
@example(capacity=512, rewind_at=NO_REWIND, ops=[("prepare_sleep",), ("woken",)])  # woken clears the flag
@example(  # a sleeper is poked once however often the other side publishes; woken empties the pipe
    capacity=512, rewind_at=NO_REWIND, ops=[("prepare_sleep",), ("publish",), ("write", 10, 1), ("publish",),
                                            ("write", 10, 1), ("publish",), ("prepare_sleep",), ("woken",),
                                            ("prepare_sleep",)]
)
@example(  # a waiting writer is poked by a release, and sees the room when woken
    capacity=512, rewind_at=NO_REWIND, ops=[("write", 100, 1)] * 4 + [("publish",), ("wait_for_space",),
                                            ("read", 2), ("mark_taken",), ("release",), ("release",),
                                            ("space_woken",), ("wait_for_space",), ("read", 1), ("release",),
                                            ("wait_for_space",), ("write", 100, 1)]
)
def test_c_and_python_cores_agree(capacity, rewind_at, ops):
    """The C per-record and per-batch steps (_ring_core.c) and the Python ones
    (ring_core.py) given the same operations: the same answers, positions, counts, flags
    and wakeup bytes, and byte for byte the same segment. (The rest of this module runs
    on whichever one ring.py picked.)"""
    if ring_module._c_core is None:
        pytest.skip("the C ring core was not built here (no C compiler at install time)")
    sides = []
    for core in (ring_module._c_core, ring_core):
        shm = create_segment(f"aserver-test-{uuid.uuid4().hex[:16]}", capacity)
        writer, reader = core.WriterCore(shm), core.ReaderCore(shm)
        writer.rewind_at = rewind_at
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK)
        space_read, space_write = os.pipe2(os.O_NONBLOCK)
        writer.wake_fd, reader.wake_fd = wake_write, wake_read
        writer.space_fd, reader.space_fd = space_read, space_write
        sides.append((shm, shm.buf.cast("Q"), writer, reader, (wake_read, wake_write, space_read, space_write)))
    try:
        for serial, op in enumerate(ops):
            answers = []
            for shm, words, writer, reader, pipes in sides:
                if op[0] == "write":
                    data = bytes(range(256)) * 5
                    payload = data[serial % 7 : serial % 7 + op[1]]
                    parts = op[2] % 4  # 0: one buffer; else a list (as the worker sends replies)
                    if parts:
                        cuts = [0, *sorted({(serial * k * 37) % (op[1] + 1) for k in range(1, parts * 30)}), op[1]]
                        payload = [payload[a:b] for a, b in itertools.pairwise(cuts)]  # up to ~90 parts
                    try:
                        answers.append(writer.try_write(op[2], serial, payload))
                    except ValueError as exc:
                        answers.append(str(exc))
                elif op[0] == "reserve":
                    _, size, fill, commit, kind = op
                    try:
                        at = writer.reserve(size)
                        answers.append(at)
                        if at >= 0:
                            shm.buf[at : at + min(fill, size)] = bytes([serial % 256]) * min(fill, size)
                        writer.commit(kind, serial, commit, serial % 3 + 1)
                        answers.append("committed")
                        writer.commit(kind, serial, 0)  # a reservation is good for one record
                    except ValueError as exc:
                        answers.append(str(exc))
                elif op[0] == "read":
                    in_place = op[1] % 2 == 1
                    got = reader.read_batch(op[1], in_place)
                    assert all(isinstance(p, memoryview) and p.readonly for _, _, p in got) if in_place else True
                    answers.append([(kind, conn_id, bytes(p)) for kind, conn_id, p in got])
                    del got
                elif op[0] == "release":
                    reader.release()
                elif op[0] == "released":
                    try:
                        writer.released(writer._write + op[1] if op[1] else reader._read)
                        answers.append(words[16])
                    except ValueError as exc:
                        answers.append(str(exc))
                elif op[0] in ("mark_taken", "prepare_sleep", "wait_for_space", "woken", "space_woken"):
                    answers.append(getattr(reader if hasattr(reader, op[0]) else writer, op[0])())
                if op[0] in ("publish", "drain"):
                    writer.publish()
                if op[0] == "drain":
                    answers.append(reader.read_batch(10_000))
                    reader.release()
                # every shared word, and the wakeup bytes waiting in each pipe
                answers.append((writer._write, writer._read, writer.unpublished, writer.unpublished_weight,
                                writer.records_written, reader._read, reader._records_read,
                                [words[i] for i in range(0, 48, 8)],
                                pipe_pending(pipes[0]), pipe_pending(pipes[2])))
            assert answers[: len(answers) // 2] == answers[len(answers) // 2 :], op
        assert bytes(sides[0][0].buf) == bytes(sides[1][0].buf)
    finally:
        for shm, words, writer, reader, pipes in sides:
            for fd in pipes:
                os.close(fd)
            words.release()
            writer.detach()
            reader.detach()
            shm.close()
            shm.unlink()


class RecordingLoop:
    """Enough of an event loop for a RingSender: it records what is scheduled."""

    def __init__(self) -> None:
        self.soon: list = []
        self.readers: dict = {}

    def call_soon(self, callback, *args):
        self.soon.append((callback, args))

    def call_later(self, delay, callback, *args):
        return self  # the poll timer: never run here; its handle's cancel() is ours

    def cancel(self) -> None:
        pass

    def add_reader(self, fd, callback, *args):
        self.readers[fd] = callback

    def remove_reader(self, fd):
        return self.readers.pop(fd, None) is not None

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(0, 1100), st.integers(0, 3)),  # size, parts
            st.tuples(st.just("reserve"), st.integers(0, 1100), st.integers(0, 1100)),  # size, committed
            st.tuples(st.just("tick")),  # the loop runs what send scheduled (the publish)
            st.tuples(st.just("drain")),  # the consumer takes everything; the sender retries
            st.tuples(st.sampled_from(["sleep", "woken"])),  # the consumer says it sleeps, or is woken
        ),
        max_size=40,
    ),
)
@settings(max_examples=120, deadline=None)
@example(ops=[("send", 100, 0), ("send", 100, 1), ("tick",)])  # one publish per loop iteration
@example(ops=[("send", 1000, 0)] * 5 + [("send", 10, 0), ("drain",), ("send", 10, 2)])  # full, queued, retried
@example(ops=[("send", 1100, 0)])  # too big for one record: both raise
@example(ops=[("reserve", 1000, 1000)] * 5 + [("reserve", 10, 10), ("drain",), ("reserve", 10, 5)])  # no room
def test_c_and_python_senders_agree(ops):
    """RingSender.send on the C SenderCore and on ring_core.SenderCore: the same answers,
    records_sent, queue, publish scheduling and ring contents (early publish at 512 bytes,
    a sleeping consumer woken at 3 records or 1,024 bytes here, so all of it happens)."""
    if ring_module._c_core is None:
        pytest.skip("the C ring core was not built here (no C compiler at install time)")
    python_sender = type("PythonRingSender", (ring_core.SenderCore, RingSenderBase), {})
    pairs, senders, loops, taken = [], [], [], []
    for sender_type in (RingSender, python_sender):
        pair = RingPair(4096)
        loop = RecordingLoop()
        sender = sender_type(pair.writer, loop, lambda: None)
        sender.early_publish_bytes = 512
        sender.wake_weight = 3
        sender.wake_bytes = 1024
        pairs.append(pair)
        senders.append(sender)
        loops.append(loop)
        taken.append([])
    references = [sys.getrefcount(sender) for sender in senders]
    try:
        for serial, op in enumerate(ops):
            answers = []
            for pair, sender, loop, got in zip(pairs, senders, loops, taken, strict=True):
                if op[0] == "send":
                    payload = bytes([serial % 256]) * op[1]
                    if op[2]:
                        payload = [payload[i::op[2] + 1] for i in range(op[2] + 1)]
                    try:
                        answers.append(sender.send(serial % 5, serial, payload))
                    except ValueError as exc:
                        answers.append(str(exc))
                elif op[0] == "reserve":
                    try:
                        room = sender.reserve(op[1])
                        answers.append(None if room is None else (len(room), room.readonly))
                        if room is not None:
                            room[: op[2]] = bytes([serial % 256]) * min(op[1], op[2])
                            del room
                            sender.commit(serial % 5, serial, min(op[1], op[2]), serial % 3 + 1)
                    except ValueError as exc:
                        answers.append(str(exc))
                elif op[0] == "tick":
                    loop.run_soon()
                elif op[0] == "sleep":
                    answers.append(pair.reader.prepare_sleep())
                elif op[0] == "woken":
                    pair.reader.woken()
                else:
                    got += [(k, c, bytes(p)) for k, c, p in pair.reader.read_batch(10_000)]
                    pair.reader.release()
                    sender._on_space()
                answers.append((sender.records_sent, list(sender._overflow), sender._publish_scheduled,
                                len(loop.soon), sender.backlogged, pair.writer.unpublished, pair.writer._write,
                                pair.writer.records_written, pair.writer._words[8], list(loop.readers) != [],
                                pair.writer.unpublished_weight, pipe_pending(pair.wake_r)))
            assert answers[: len(answers) // 2] == answers[len(answers) // 2 :], op
        assert taken[0] == taken[1]
        for sender, loop in zip(senders, loops, strict=True):
            loop.run_soon()  # what was scheduled held the senders
            sender._stop_waiting()  # so does a waiting sender's reader callback: now nothing does
        assert [sys.getrefcount(sender) for sender in senders] == references
    finally:
        for sender, pair in zip(senders, pairs, strict=True):
            sender._stop_waiting()
            pair.close()


@pytest.mark.parametrize("core", ["ring.py's", "ring_core"])
def test_a_sleeping_consumer_is_woken_only_for_a_batch_worth_it(make_ring, core):
    """Records go to an awake consumer early (at early_publish_bytes); a sleeping one is
    woken once records of wake_weight or wake_bytes are waiting, or at the end of the loop
    iteration, whichever comes first; on either SenderCore."""
    if core == "ring.py's":
        sender_type = RingSender
    else:
        sender_type = type("PythonRingSender", (ring_core.SenderCore, RingSenderBase), {})
    pair = make_ring(64 * 1024)
    loop = RecordingLoop()
    sender = sender_type(pair.writer, loop, lambda: None)
    sender.early_publish_bytes, sender.wake_weight, sender.wake_bytes = 512, 4, 8192

    def published() -> bool:
        return pair.writer._words[8] == pair.writer._write

    def asleep() -> None:
        pair.reader.read_batch(10_000)
        pair.reader.release()
        assert pair.reader.prepare_sleep()

    sender.send(1, 1, b"a" * 600)  # awake: at once, no wakeup needed
    assert published() and pipe_pending(pair.wake_r) == 0
    asleep()
    for i in range(3):
        sender.send(1, 1, b"b" * 600)
        assert not published(), i  # asleep: not worth a wakeup yet
    assert pipe_pending(pair.wake_r) == 0
    sender.send(1, 1, b"c" * 600)  # the fourth record: wake it
    assert published() and pipe_pending(pair.wake_r) == 1
    pair.reader.woken()
    asleep()
    sender.send(1, 1, b"d" * 9000)  # wake_bytes at once
    assert published() and pipe_pending(pair.wake_r) == 1
    pair.reader.woken()
    asleep()
    sender.send(1, 1, b"e" * 100)
    assert not published()
    loop.run_soon()  # the end of the loop iteration
    assert published() and pipe_pending(pair.wake_r) == 1
    pair.reader.woken()
    asleep()
    room = sender.reserve(100)
    room[:10] = b"f" * 10
    del room
    sender.commit(1, 1, 10, 4)  # a run of 4 requests (the conn process says so) is worth a wakeup
    assert published() and pipe_pending(pair.wake_r) == 1


def test_a_send_whose_publish_cannot_be_scheduled_raises_and_tries_again_next_time(make_ring):
    """A loop that refuses the publish (it is closed): send raises, the record stays
    written, and the next send tries to schedule it again, on either SenderCore."""
    python_sender = type("PythonRingSender", (ring_core.SenderCore, RingSenderBase), {})
    for sender_type in (RingSender, python_sender):
        pair = make_ring(4096)
        loop = RecordingLoop()
        sender = sender_type(pair.writer, loop, lambda: None)
        loop.call_soon = lambda *args: (_ for _ in ()).throw(RuntimeError("Event loop is closed"))
        with pytest.raises(RuntimeError):
            sender.send(1, 2, b"abc")
        assert (sender.records_sent, pair.writer.records_written, sender._publish_scheduled) == (1, 1, False)
        del loop.call_soon  # the class's again
        assert sender.send(1, 2, b"def")
        assert sender._publish_scheduled and len(loop.soon) == 1, sender_type


async def test_a_queued_list_payload_is_what_its_parts_held_when_sent(make_ring):
    """A list payload (reply parts, some of them a handler's buffers) that must wait for
    room is queued as its bytes at send time: a buffer changed later does not change it."""
    pair = make_ring(4096)
    loop = asyncio.get_running_loop()
    sender = RingSender(pair.writer, loop, lambda: None)
    while sender.send(1, 0, b"x" * 900):
        pass
    body = bytearray(b"before")
    assert not sender.send(2, 7, [b"HDR:", body])  # the ring is full: queued
    body[:] = b"after!"
    got = []
    for _ in range(200):
        got += pair.reader.read_batch(100)
        pair.reader.release()
        if any(kind == 2 for kind, _, _ in got):
            break
        await asyncio.sleep(0.01)
    assert [(conn_id, payload) for kind, conn_id, payload in got if kind == 2] == [(7, b"HDR:before")]


def test_a_view_read_in_place_stays_readable_after_close(make_ring):
    """A payload view kept past its batch (say, through a traceback someone kept) must
    not crash whoever reads it once the ring is closed: close() leaves the mapping."""
    pair = make_ring(4096)
    assert pair.writer.try_write(1, 2, b"hello")
    pair.writer.publish()
    (_, _, view), = pair.reader.read_batch(10, True)
    assert isinstance(view, memoryview) and view.readonly
    pair.close()
    assert bytes(view) == b"hello"


def test_a_stale_c_module_is_not_used(monkeypatch):
    """A C module built from older sources (its ABI number differs) falls back to Python."""
    from aserver import native

    module = "aserver.ipc._ring_core"
    what, abi = native.MODULES[module]
    monkeypatch.setitem(native.MODULES, module, (what, abi + 1))
    assert native.native(module) is None
    monkeypatch.setitem(native.MODULES, module, (what, abi))
    assert (native.native(module) is None) == (ring_module._c_core is None)


def test_unread_records_are_what_the_consumer_never_took(make_ring):
    """After the consumer died, the producer gets copies of what it never took, in order:
    records in the ring past the ones it took (even those it took and never released),
    then the ones waiting for room. Read straight into the ring or copied in, the same."""
    python_sender = type("PythonRingSender", (ring_core.SenderCore, RingSenderBase), {})
    for sender_type in (RingSender, python_sender):
        pair = make_ring(4096, rewind_at=NO_REWIND)
        sender = sender_type(pair.writer, RecordingLoop(), lambda: None)
        for i in range(2):
            assert sender.send(records.PACKETS, i, bytes([i]) * 1000)
        room = sender.reserve(1000)
        room[:1000] = b"\x02" * 1000
        del room
        sender.commit(records.PACKETS, 2, 1000)
        sender.flush()
        taken = pair.reader.read_batch(1, True)  # the consumer takes the first and dies with it
        pair.reader.mark_taken()
        del taken
        assert sender.send(records.CLOSED, 3, b"")
        assert sender.send(records.PACKETS, 4, b"\x04" * 1000)
        assert not sender.send(records.PACKETS, 5, b"\x05" * 1000)  # no room: it waits
        assert sender.unread_records() == [(records.PACKETS, 1, b"\x01" * 1000), (records.PACKETS, 2, b"\x02" * 1000),
                                           (records.CLOSED, 3, b""), (records.PACKETS, 4, b"\x04" * 1000),
                                           (records.PACKETS, 5, b"\x05" * 1000)]
        sender.discard_unread()
        assert sender.unread_records() == []
        sender._stop_waiting()


def test_a_sender_whose_sources_wait_in_an_empty_ring_looks_again_once_at_a_time(make_ring):
    """on_room says sources still wait, but the ring is empty: no wakeup can come from the
    consumer, so the sender looks again shortly; one look at a time however many callers
    come (the poll, the space pipe), and none after it was closed."""
    loop = asyncio.new_event_loop()
    errors = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    pair = make_ring(4096)
    looks, wanted = [], [6]

    def on_room() -> bool:
        looks.append(pair.writer.fill())
        return len(looks) < wanted[0]

    sender = RingSender(pair.writer, loop, on_room)

    def fill_then_empty() -> None:
        while sender.send(records.PACKETS, 1, b"x" * 1000):
            pass
        for _ in range(2):  # the consumer takes everything (the record that waited too)
            pair.reader.read_batch(100)
            pair.reader.release()
            loop.run_until_complete(asyncio.sleep(0))  # the space pipe wakes the sender

    try:
        fill_then_empty()
        assert looks[0] > 0 and looks[1:] == [0] and sender._waiting  # a look is due in 1 ms
        for _ in range(3):
            sender._on_poll()  # more callers meanwhile
        loop.run_until_complete(asyncio.sleep(0.05))
        assert (looks[1:], sender._waiting) == ([0] * 5, False)  # 3 calls and 1 look, not 3 more
        looks.clear()
        wanted[0] = 100
        fill_then_empty()
        assert looks[1:] == [0] and sender._waiting
        sender.close()  # with a look due
        loop.run_until_complete(asyncio.sleep(0.02))
        assert (len(looks), errors) == (2, [])
    finally:
        loop.close()


# -- freeing by the producer, references to another ring ----------------------------------


async def test_a_receiver_with_release_leaves_freeing_its_space_to_the_producer(make_ring):
    """With `release` (a worker's request rings), a batch's space is not freed by the
    consumer: it says where it read to, after on_records, even when that raised; the
    producer's `released` frees it, and a sender waiting for room goes on at once."""
    pair = make_ring(4096)
    loop = asyncio.get_running_loop()
    positions, rooms = [], []
    sender = RingSender(pair.writer, loop, lambda: rooms.append(sender.room()))

    def on_records(batch):
        positions.append("records")
        if any(conn_id == 1 for _, conn_id, _ in batch):
            raise RuntimeError("a failing batch is released all the same")

    receiver = RingReceiver(pair.reader, loop, on_records, in_place=True, release=positions.append)
    with pytest.raises(ValueError, match="in place"):
        RingReceiver(pair.reader, loop, on_records, release=positions.append)
    while sender.send(records.PACKETS, 0, b"x" * 900):
        pass
    assert sender.backlogged  # one record waits for room
    full = sender.room()
    receiver.drain_now()
    assert positions == ["records", pair.reader.position] and pair.reader.position > 0  # after the batch
    del positions[0]
    assert sender.room() == full and rooms == []  # read, not freed
    sender.released(positions[0])
    assert not sender.backlogged and len(rooms) == 1  # the waiting record went in
    assert pair.writer.fill() == pair.writer._write - positions[0]
    assert sender.send(records.PACKETS, 1, b"y")
    sender.flush()
    with pytest.raises(RuntimeError, match="released all the same"):
        receiver.drain_now()
    assert positions[-2:] == ["records", pair.reader.position] and pair.reader.position == pair.writer._write
    sender.released(positions[-1])
    assert pair.writer.fill() == 0
    for wrong in (positions[0], pair.writer._write + 8):  # behind what is freed, past what is written
        with pytest.raises(ValueError, match="release to"):
            pair.writer.released(wrong)
    sender._stop_waiting()


@pytest.fixture
def referring_writer(make_ring):
    """A C reply-ring writer that refers to a second (request) ring, that ring, and a
    reader of the replies."""
    if ring_module._c_core is None:
        pytest.skip("the C ring core was not built here (no C compiler at install time)")
    requests, replies = make_ring(1 << 16), make_ring(1 << 16)
    requests.writer.segment[DATA_OFFSET:] = bytes(range(256)) * ((len(requests.writer.segment) - DATA_OFFSET) // 256)
    replies.writer.refer_to(requests.reader.segment, records.PACKETS_BY_REF, records.REF_MIN)
    return replies, requests.reader.segment.toreadonly()


def test_large_reply_parts_in_the_request_ring_are_written_as_references(referring_writer):
    """List parts that lie in the referred-to ring and are REF_MIN bytes or more go as
    references: the record is PACKETS_BY_REF (its acks kept) and stands for the same
    bytes. Small parts, parts elsewhere and the ring's header are copied."""
    replies, requests = referring_writer
    body = requests[DATA_OFFSET + 64 : DATA_OFFSET + 64 + 5000]
    small = requests[DATA_OFFSET + 8000 : DATA_OFFSET + 8000 + records.REF_MIN - 1]
    header_area = requests[16 : 16 + records.REF_MIN]
    exact = requests[DATA_OFFSET + 9000 : DATA_OFFSET + 9000 + records.REF_MIN]
    parts = [b"H" * 16, body, b"T" * 16, small, header_area, bytes(2000), exact, b"end"]
    assert replies.writer.try_write(records.PACKETS | 3 << records.ACK_SHIFT, 7, parts)
    assert replies.writer.try_write(records.PACKETS, 8, body)  # not a list: copied
    replies.writer.publish()
    (kind, conn_id, payload), (plain_kind, _, plain) = replies.reader.read_batch(10)
    assert (kind, conn_id, plain_kind, plain) == (records.PACKETS_BY_REF | 3 << records.ACK_SHIFT, 7,
                                                  records.PACKETS, bytes(body))
    entry = records.REF_ENTRY
    inline = 16 + 16 + len(small) + len(header_area) + 2000 + 3
    assert len(payload) == 3 * entry.size + inline  # two references and the bytes after the last
    assert entry.unpack_from(payload, 0) == (16, 5000, DATA_OFFSET + 64)
    from aserver.conn.conn_core import referred_parts
    assert b"".join(referred_parts(payload, requests)[0]) == b"".join(parts)
    assert referred_parts(payload, requests)[1] == 5000 + records.REF_MIN
    # A box of many replies (past the parts the C writer keeps on its stack) is no different.
    many = [part for i in range(40) for part in (b"H" * 16, requests[DATA_OFFSET + i * 1024 :][: records.REF_MIN])]
    assert replies.writer.try_write(records.PACKETS, 9, many)
    replies.writer.publish()
    (kind, _, payload), = replies.reader.read_batch(10)
    assert (kind, len(payload)) == (records.PACKETS_BY_REF, 40 * (entry.size + 16))
    parts_back, refs = referred_parts(payload, requests)
    assert refs == 40 * records.REF_MIN and b"".join(parts_back) == b"".join(many)
    del parts_back
    del many
    del body, small, header_area, exact


def test_the_python_writer_copies_what_the_c_one_refers_to(make_ring):
    """ring_core.WriterCore.refer_to is accepted and every part is copied (no address of
    a buffer can be had in Python): a plain PACKETS record of the same bytes."""
    requests, replies = make_ring(1 << 16), make_ring(1 << 16)
    shm = attach_segment(replies.name)
    writer = ring_core.WriterCore(shm)
    writer.rewind_at = NO_REWIND
    writer.refer_to(requests.reader.segment, records.PACKETS_BY_REF, records.REF_MIN)
    body = requests.reader.segment[DATA_OFFSET : DATA_OFFSET + 4096]
    assert writer.try_write(records.PACKETS, 1, [b"H" * 16, body])
    replies.writer._words[8] = writer._write
    assert replies.reader.read_batch(10) == [(records.PACKETS, 1, b"H" * 16 + bytes(body))]
    del body
    writer.detach()
    shm.close()


@pytest.mark.parametrize("payload, error", [
    (records.REF_ENTRY.pack(4, 0, 0) + b"ab", "cut short"),
    (records.REF_ENTRY.pack(0, 16, 0)[:10], "cut short"),
    (records.REF_ENTRY.pack(0, 16, (1 << 16) + DATA_OFFSET - 8), "past its request ring"),
    (records.REF_ENTRY.pack(0, 16, (1 << 64) - 8), "past its request ring"),
])
def test_a_bad_reference_record_is_refused(payload, error, make_ring):
    from aserver.conn.conn_core import referred_parts
    requests = make_ring(1 << 16).reader.segment
    with pytest.raises(ValueError, match=error):
        referred_parts(payload, requests)


def test_echoed_requests_go_as_one_reference_to_their_own_bytes(make_ring):
    """A reply header equal to the ring bytes just before its body (an echo's header is
    its request's) joins the reference, and references that meet are one: a run of
    echoes is one reference to the run of requests. Anything else stays as it was."""
    if ring_module._c_core is None:
        pytest.skip("the C ring core was not built here (no C compiler at install time)")
    from aserver.conn.conn_core import referred_parts
    from aserver.protocol import HEADER_SIZE, PacketCodec

    codec = PacketCodec()
    requests, replies = make_ring(1 << 16), make_ring(1 << 16)
    replies.writer.refer_to(requests.reader.segment, records.PACKETS_BY_REF, records.REF_MIN)
    packets = [codec.encode(1, bytes([i]) * (2000 + i), seq_num=i) for i in range(4)]
    run = b"".join(packets)
    requests.writer.segment[DATA_OFFSET + 16 : DATA_OFFSET + 16 + len(run)] = run  # as a record's payload
    ring = requests.reader.segment.toreadonly()
    starts = [DATA_OFFSET + 16 + sum(map(len, packets[:i])) for i in range(4)]
    bodies = [ring[start + HEADER_SIZE : start + len(packet)] for start, packet in zip(starts, packets, strict=True)]
    own = [bytes(ring[start : start + HEADER_SIZE]) for start in starts]
    failed = codec.header.pack(HEADER_SIZE + len(bodies[2]), 2, 1, 1, 0)  # not the request's header
    parts = [own[0], bodies[0], own[1], bodies[1], failed, bodies[2], own[3], bodies[3], b"tail"]
    assert replies.writer.try_write(records.PACKETS, 5, parts)
    replies.writer.publish()
    (kind, _, payload), = replies.reader.read_batch(10)
    entry = records.REF_ENTRY
    assert kind == records.PACKETS_BY_REF
    assert entry.unpack_from(payload, 0) == (0, len(packets[0]) + len(packets[1]), starts[0])  # two echoes: one
    # The third reply's header is copied; its body and the fourth echo are one reference.
    assert entry.unpack_from(payload, entry.size) == (HEADER_SIZE, len(bodies[2]) + len(packets[3]),
                                                      starts[2] + HEADER_SIZE)
    assert entry.unpack_from(payload, 2 * entry.size + HEADER_SIZE) == (len(b"tail"), 0, 0)
    assert len(payload) == 3 * entry.size + HEADER_SIZE + len(b"tail")
    got, referred = referred_parts(payload, ring)
    assert referred == len(packets[0]) + len(packets[1]) + len(bodies[2]) + len(packets[3])
    assert b"".join(got) == b"".join(parts)
    # A header that differs only in its last byte, a view repeated, views that overlap:
    # each stays what it is.
    last_byte = own[1][:-1] + bytes([own[1][-1] ^ 1])
    overlapping = ring[starts[0] + HEADER_SIZE + 100 : starts[0] + len(packets[0]) + 500]
    for parts in ([own[0], bodies[0], last_byte, bodies[1]], [own[0], bodies[0], own[0], bodies[0]],
                  [bodies[0], overlapping], [own[1], bodies[1], bodies[1]]):
        assert replies.writer.try_write(records.PACKETS, 7, parts)
        replies.writer.publish()
        (kind, _, payload), = replies.reader.read_batch(10)
        assert kind == records.PACKETS_BY_REF and b"".join(referred_parts(payload, ring)[0]) == b"".join(parts)
    del overlapping
    # At the very front of the ring there is nothing before a body to compare its header with.
    front = ring[DATA_OFFSET : DATA_OFFSET + records.REF_MIN]
    assert replies.writer.try_write(records.PACKETS, 6, [bytes(ring[DATA_OFFSET - 16 : DATA_OFFSET]), front])
    replies.writer.publish()
    (_, _, payload), = replies.reader.read_batch(10)
    assert entry.unpack_from(payload, 0) == (16, records.REF_MIN, DATA_OFFSET)
    del bodies, got, front, ring
