"""What the supervisor hands a child process (pickled across the spawn)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from multiprocessing import reduction

from aserver.settings import Settings


class PassFd:
    """An fd handed to a spawned child: dup'ed into it while the child is being started."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return (_received_fd, (reduction.DupFd(self.fd),))


def _received_fd(dup) -> PassFd:
    return PassFd(dup.detach())


@dataclass
class RingEnd:
    """One end of a ring: its segment and the two pipe ends this side uses."""

    name: str
    wake: PassFd  # producer: data pipe write end; consumer: data pipe read end
    space: PassFd  # producer: space pipe read end; consumer: space pipe write end


@dataclass
class ChildSpec:
    role: str  # "conn" or "worker"
    index: int
    incarnation: int
    settings: Settings
    control: socket.socket  # the child's end of its control socketpair
    # conn: (request ring producer end, reply ring consumer end) per worker
    # worker: (request ring consumer end, reply ring producer end) per conn process
    rings: list[tuple[RingEnd, RingEnd]]
    listener: socket.socket | None = None
    # A worker started for a reload loads its code, reports ready, and attaches to its
    # rings only when told (after the worker it replaces has finished).
    standby: bool = False

    @property
    def title(self) -> str:
        return f"aserver[{self.settings.server.name}]: {self.role} {self.index}"
