"""Code that runs first in every child process, whatever its role."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import NoReturn

import setproctitle

from aserver import logs
from aserver.ipc.ring import RingReader, RingWriter, attach_segment
from aserver.supervisor.spec import ChildSpec, RingEnd

PR_SET_PDEATHSIG = 1

# Exit code of a child that could not start (bad handler module, failing startup hook):
# the supervisor stops instead of restarting it.
EXIT_STARTUP_FAILED = 3


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor still stops children itself


def open_producer(end: RingEnd) -> RingWriter:
    return RingWriter(attach_segment(end.name), end.wake.fd, end.space.fd)


def open_consumer(end: RingEnd) -> RingReader:
    return RingReader(attach_segment(end.name), end.wake.fd, end.space.fd)


class ChildControl:
    """The child's side of its control pipe, and its stop signal."""

    def __init__(self, spec: ChildSpec, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = spec.control.fd
        self.stop = asyncio.Event()
        # Ctrl-C reaches the whole process group: the supervisor decides what happens.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)

    def report(self, message: str) -> None:
        try:
            os.write(self._fd, message.encode()[:4000] + b"\n")
        except OSError:
            pass  # the supervisor is gone; pdeathsig will stop us


async def run_child(spec: ChildSpec, body: Callable[[ChildSpec, ChildControl], Awaitable[None]]) -> None:
    """Prepare the process (title, logging, parent-death signal), then run `body`."""
    _die_with_parent()
    setproctitle.setproctitle(spec.title)
    logs.setup(spec.settings.server.log_level, f"{spec.role} {spec.index}")
    control = ChildControl(spec, asyncio.get_running_loop())
    await body(spec, control)


def startup_failed(control: ChildControl, what: str, exc: BaseException) -> NoReturn:
    """Report why start-up failed and exit with the code the supervisor will not retry."""
    reason = f"{what}: {type(exc).__name__}: {exc}"
    logging.getLogger("aserver").error("%s", reason, exc_info=not isinstance(exc, ImportError))
    control.report("failed " + reason)
    logging.shutdown()
    os._exit(EXIT_STARTUP_FAILED)
