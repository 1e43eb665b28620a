"""The shared-memory segments and wake pipes between conn processes and workers.

The supervisor creates and unlinks them all, so they outlive any one child: a replacement
worker finds the requests its predecessor never took still waiting in its ring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import shared_memory

from aserver.ipc.ring import create_segment
from aserver.supervisor.spec import PassFd, RingEnd


@dataclass
class Ring:
    shm: shared_memory.SharedMemory
    wake_read: int
    wake_write: int
    space_read: int
    space_write: int

    @property
    def producer(self) -> RingEnd:
        return RingEnd(self.shm.name, PassFd(self.wake_write), PassFd(self.space_read))

    @property
    def consumer(self) -> RingEnd:
        return RingEnd(self.shm.name, PassFd(self.wake_read), PassFd(self.space_write))

    def close(self) -> None:
        for fd in (self.wake_read, self.wake_write, self.space_read, self.space_write):
            os.close(fd)
        self.shm.close()
        self.shm.unlink()


def _make_ring(name: str, size: int) -> Ring:
    # Blocking-ness is per open file description, shared with the children: both ends
    # non-blocking so that no process can stall on a wake byte.
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    space_read, space_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return Ring(create_segment(name, size), wake_read, wake_write, space_read, space_write)


class RingSet:
    """Request and reply rings for every (conn process, worker) pair."""

    def __init__(self, prefix: str, conns: int, workers: int, size: int) -> None:
        self.requests: dict[tuple[int, int], Ring] = {}
        self.replies: dict[tuple[int, int], Ring] = {}
        try:
            for c in range(conns):
                for w in range(workers):
                    self.requests[c, w] = _make_ring(f"{prefix}-c{c}w{w}-req", size)
                    self.replies[c, w] = _make_ring(f"{prefix}-c{c}w{w}-rep", size)
        except BaseException:
            self.close()
            raise
        self.conns = conns
        self.workers = workers

    def for_conn(self, c: int) -> list[tuple[RingEnd, RingEnd]]:
        return [(self.requests[c, w].producer, self.replies[c, w].consumer) for w in range(self.workers)]

    def for_worker(self, w: int) -> list[tuple[RingEnd, RingEnd]]:
        return [(self.requests[c, w].consumer, self.replies[c, w].producer) for c in range(self.conns)]

    def close(self) -> None:
        for ring in [*self.requests.values(), *self.replies.values()]:
            try:
                ring.close()
            except OSError:
                pass
        self.requests.clear()
        self.replies.clear()
