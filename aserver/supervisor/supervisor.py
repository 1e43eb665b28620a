"""The supervisor process: binds the port, creates the rings, runs and watches children."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import aiomultiprocess
import setproctitle
import uvloop

from aserver.conn.process import conn_process
from aserver.settings import Settings
from aserver.supervisor.child import EXIT_STARTUP_FAILED
from aserver.supervisor.rings import RingSet
from aserver.supervisor.spec import ChildSpec, PassFd
from aserver.worker.process import worker_process

log = logging.getLogger("aserver.supervisor")

START_TIMEOUT = 60.0
# A child that dies sooner than this after starting is restarted after a growing delay.
RESTART_BACKOFF_BASE = 0.1
RESTART_BACKOFF_MAX = 5.0


class StartupError(Exception):
    pass


@dataclass
class Child:
    role: str
    index: int
    incarnation: int = 0
    process: aiomultiprocess.Process | None = None
    control_fd: int = -1
    started_at: float = 0.0
    ready: asyncio.Future | None = None
    restarts: int = 0
    quick_deaths: int = 0
    _buffer: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str:
        return f"{self.role} {self.index}"


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class Supervisor:
    def __init__(self, settings: Settings, conn_processes: int = 1) -> None:
        self.settings = settings
        self.conn_count = conn_processes
        self.worker_count = settings.workers.count
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.listener: socket.socket | None = None
        self.rings: RingSet | None = None
        self.children: list[Child] = [Child("conn", i) for i in range(conn_processes)]
        self.children += [Child("worker", i) for i in range(self.worker_count)]
        self.exit_code = 0

    async def run(self) -> int:
        settings = self.settings
        setproctitle.setproctitle(f"aserver[{settings.server.name}]: supervisor")
        host, port = settings.bind_address
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_stop_signal, sig)
        try:
            self.listener = bind_listener(host, port, settings.server.backlog)
            bound = self.listener.getsockname()
            self.rings = RingSet(f"aserver-{os.getpid()}", self.conn_count, self.worker_count, settings.ring.size)
            # Workers first: a conn process must not accept before someone can answer.
            await self._start_all([c for c in self.children if c.role == "worker"])
            await self._start_all([c for c in self.children if c.role == "conn"])
        except StartupError as exc:
            log.error("start-up failed: %s", exc)
            await self._shutdown()
            return 2
        log.info(
            "aserver ready: listening on %s:%d (%d conn process, %d workers)",
            bound[0], bound[1], self.conn_count, self.worker_count,
        )
        await self.stopping.wait()
        await self._shutdown()
        return self.exit_code

    # Children --------------------------------------------------------------------------

    def _spec(self, child: Child) -> ChildSpec:
        assert self.rings is not None
        if child.role == "conn":
            rings, listener = self.rings.for_conn(child.index), self.listener
        else:
            rings, listener = self.rings.for_worker(child.index), None
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        child.control_fd = read_fd
        spec = ChildSpec(child.role, child.index, child.incarnation, self.settings, PassFd(write_fd), rings, listener)
        spec._control_write = write_fd  # type: ignore[attr-defined]
        return spec

    def _spawn(self, child: Child) -> None:
        spec = self._spec(child)
        target = conn_process if child.role == "conn" else worker_process
        process = aiomultiprocess.Process(
            target=target, args=(spec,), name=f"{child.role}-{child.index}",
            loop_initializer=uvloop.new_event_loop,
        )
        process.start()
        os.close(spec._control_write)  # type: ignore[attr-defined]
        child.process = process
        child.started_at = time.monotonic()
        child.ready = self.loop.create_future()
        os.set_blocking(child.control_fd, False)
        self.loop.add_reader(child.control_fd, self._on_control, child)
        self.loop.add_reader(process.aio_process.sentinel, self._on_exit, child)
        log.debug("started %s (pid %d)", child.name, process.pid)

    async def _start_all(self, children: list[Child]) -> None:
        for child in children:
            self._spawn(child)
        waits = [asyncio.wait_for(asyncio.shield(c.ready), START_TIMEOUT) for c in children if c.ready]
        try:
            await asyncio.gather(*waits)
        except TimeoutError:
            raise StartupError(f"children did not report ready within {START_TIMEOUT:.0f}s") from None

    def _on_control(self, child: Child) -> None:
        try:
            data = os.read(child.control_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(child.control_fd)
            return
        child._buffer += data
        *lines, child._buffer = child._buffer.split(b"\n")
        for line in lines:
            message = line.decode(errors="replace")
            if child.ready is None or child.ready.done():
                continue
            if message == "ready":
                child.ready.set_result(None)
            elif message.startswith("failed "):
                child.ready.set_exception(StartupError(message.removeprefix("failed ")))

    def _on_exit(self, child: Child) -> None:
        process = child.process
        assert process is not None
        self.loop.remove_reader(process.aio_process.sentinel)
        process.aio_process.join(0)
        code = process.exitcode
        self._close_control(child)
        if self.stopping.is_set():
            return
        if child.ready is not None and not child.ready.done():
            reason = f"exited with code {code} before it was ready"
            if code == EXIT_STARTUP_FAILED:
                reason = "failed to start"
            child.ready.set_exception(StartupError(f"{child.name} {reason}"))
            return
        lived = time.monotonic() - child.started_at
        child.quick_deaths = child.quick_deaths + 1 if lived < 10 else 0
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_BASE * (2 ** child.quick_deaths)) if child.quick_deaths else 0
        log.error("%s (pid %s) died with exit code %s after %.1fs; restarting in %.1fs",
                  child.name, process.pid, code, lived, delay)
        child.incarnation += 1
        child.restarts += 1
        self.loop.call_later(delay, self._restart, child)

    def _restart(self, child: Child) -> None:
        if not self.stopping.is_set():
            self._spawn(child)

    def _close_control(self, child: Child) -> None:
        if child.control_fd >= 0:
            self.loop.remove_reader(child.control_fd)
            os.close(child.control_fd)
            child.control_fd = -1

    # Stopping --------------------------------------------------------------------------

    def _on_stop_signal(self, sig: int) -> None:
        if self.stopping.is_set():
            log.warning("second %s: stopping at once", signal.Signals(sig).name)
            for child in self.children:
                if child.process is not None and child.process.is_alive():
                    child.process.kill()
            return
        log.info("%s received: stopping", signal.Signals(sig).name)
        self.stopping.set()

    async def _shutdown(self) -> None:
        self.stopping.set()
        timeout = self.settings.server.stop_timeout
        # conn processes first (stop accepting, close clients), then the workers.
        for role in ("conn", "worker"):
            group = [c for c in self.children if c.role == role and c.process is not None]
            for child in group:
                if child.process.is_alive():
                    child.process.terminate()
            await self._join(group, timeout + 2)
        for child in self.children:
            self._close_control(child)
        if self.rings is not None:
            self.rings.close()
        if self.listener is not None:
            self.listener.close()
        manager = aiomultiprocess.core._manager
        if manager is not None:
            manager.shutdown()
            aiomultiprocess.core._manager = None

    async def _join(self, group: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for child in group:
            process = child.process.aio_process
            while process.exitcode is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if process.exitcode is None:
                log.warning("%s (pid %d) did not stop in time; killing it", child.name, process.pid)
                process.kill()
                process.join(5)


def serve(settings: Settings) -> int:
    async def main() -> int:
        return await Supervisor(settings).run()

    return uvloop.run(main())
