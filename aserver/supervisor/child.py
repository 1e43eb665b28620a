"""Code that runs first in every child process, whatever its role."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import setproctitle

from aserver import logs
from aserver.ipc.ring import RingReader, RingWriter, attach_segment
from aserver.supervisor.control import ControlChannel, Message
from aserver.supervisor.spec import ChildSpec, RingEnd

log = logging.getLogger("aserver")

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


# glibc mallopt parameters, and the values the children use.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 4 << 20), (M_TRIM_THRESHOLD, 32 << 20), (M_TOP_PAD, 4 << 20))


def _keep_freed_memory() -> None:
    """Reply records and socket reads are tens of KiB, allocated and freed in bursts. With
    glibc's defaults a free often hands the heap's top back to the kernel and the next
    burst takes it back page by page: 2-4 page faults per 16 KiB request in the conn
    process. Keep up to 32 MiB of freed heap, and serve blocks under 4 MiB from the heap."""
    try:
        libc = ctypes.CDLL(None)
        for param, value in MALLOC_SETTINGS:
            libc.mallopt(param, value)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator's defaults stand


def open_producer(end: RingEnd) -> RingWriter:
    return RingWriter(attach_segment(end.name), end.wake.fd, end.space.fd)


def open_consumer(end: RingEnd) -> RingReader:
    return RingReader(attach_segment(end.name), end.wake.fd, end.space.fd)


CommandHandler = Callable[[Message], dict[str, Any] | None]


class ChildControl:
    """The child's end of its control channel, and its stop signal.

    Commands from the supervisor ("cmd") go to registered handlers; a handler's dict
    result is sent back as the answer, tagged with the command's "id".
    """

    def __init__(self, spec: ChildSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.stop = asyncio.Event()
        self._handlers: dict[str, CommandHandler] = {"stop": self._on_stop, "ping": lambda m: {"event": "pong"}}
        self.channel = ControlChannel(spec.control, self._on_message, self._on_closed)
        self.channel.start(loop)
        # Ctrl-C reaches the whole process group: the supervisor decides what happens.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)

    def on(self, cmd: str, handler: CommandHandler) -> None:
        self._handlers[cmd] = handler

    def report(self, event: str, **fields: Any) -> None:
        self.channel.send({"event": event, **fields})

    def _on_stop(self, message: Message) -> None:
        self.stop.set()

    def _on_message(self, message: Message) -> None:
        handler = self._handlers.get(message.get("cmd", ""))
        if handler is None:
            log.error("unknown control command %r", message)
            return
        try:
            answer = handler(message)
        except Exception as exc:
            log.exception("control command %r failed", message)
            answer = {"event": "error", "error": str(exc)}
        if answer is not None:
            self.channel.send({**answer, "id": message.get("id")})

    def _on_closed(self) -> None:
        # The supervisor is gone (pdeathsig may not have fired yet): stop.
        self.stop.set()


async def run_child(spec: ChildSpec, body: Callable[[ChildSpec, ChildControl], Awaitable[None]]) -> None:
    """Prepare the process (title, logging, parent-death signal), then run `body`."""
    _die_with_parent()
    _keep_freed_memory()
    setproctitle.setproctitle(spec.title)
    settings = spec.settings
    logs.setup(settings.server.log_level, f"{spec.role} {spec.index}", settings.logging, settings.server.name)
    control = ChildControl(spec, asyncio.get_running_loop())
    await body(spec, control)
    control.channel.close()


def report_ready(control: ChildControl) -> None:
    """Start-up is done: tell the supervisor. What start-up built (modules, the app,
    settings) lives as long as the process, so it is frozen out of the garbage collector:
    a full collection then scans only what serving allocates, a shorter pause."""
    gc.freeze()
    control.report("ready")


def startup_failed(control: ChildControl, what: str, exc: BaseException) -> NoReturn:
    """Report why start-up failed and exit with the code the supervisor will not retry."""
    reason = f"{what}: {type(exc).__name__}: {exc}"
    log.error("%s", reason, exc_info=not isinstance(exc, ImportError))
    control.report("failed", error=reason)
    logging.shutdown()
    os._exit(EXIT_STARTUP_FAILED)
