"""The supervisor process: binds the port, creates the rings, runs and watches children.

It restarts a child that dies (with backoff, giving up on a crash loop), kills one whose
event loop stops answering heartbeats, and hands a dead or retired worker's rings to its
replacement through the conn processes (see ConnServer.worker_gone) so no request is lost.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
import resource
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiomultiprocess
import setproctitle
import uvloop

from aserver import logs, native
from aserver.conn.process import conn_process
from aserver.metrics import ChildCounters
from aserver.settings import Settings, SettingsError, load, reload_merge
from aserver.supervisor import systemd
from aserver.supervisor.child import EXIT_STARTUP_FAILED
from aserver.supervisor.control import ControlChannel, Message
from aserver.supervisor.pidfile import AlreadyRunning, PidFile
from aserver.supervisor.rings import RingSet
from aserver.supervisor.spec import ChildSpec
from aserver.supervisor.status import StatusServer
from aserver.worker.process import worker_process

log = logging.getLogger("aserver.supervisor")

START_TIMEOUT = 60.0
ASK_TIMEOUT = 10.0
# A child that lived shorter than this is restarted after a delay doubling each time.
QUICK_DEATH = 10.0
RESTART_BACKOFF_BASE = 0.1
RESTART_BACKOFF_MAX = 5.0
SECOND_SIGNAL_AFTER = 1.0  # seconds: an earlier repeat of a stop signal is ignored
FILES_PER_PROCESS = 64  # descriptors a process needs besides its clients


class StartupError(Exception):
    pass


@dataclass
class Child:
    role: str
    index: int
    incarnation: int = 0
    standby: bool = False
    process: aiomultiprocess.Process | None = None
    channel: ControlChannel | None = None
    started_at: float = 0.0
    ready: asyncio.Future | None = None
    exited: asyncio.Future | None = None
    retiring: bool = False
    restarts: int = 0
    quick_deaths: int = 0
    deaths: deque[float] = field(default_factory=deque)
    last_pong: float = 0.0
    answers: dict[int, asyncio.Future] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role} {self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done()


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


def raise_open_files_limit(settings: Settings) -> None:
    """Each conn process may hold its share of max_connections sockets."""
    per_process = -(-settings.server.max_connections // settings.server.conn_processes)
    need = per_process + FILES_PER_PROCESS + 8 * settings.workers.count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise StartupError(
            f"server.max_connections {settings.server.max_connections} needs {need} open files per conn "
            f"process, but the hard limit (RLIMIT_NOFILE) is {hard}: raise it (ulimit -Hn, systemd LimitNOFILE) "
            "or lower server.max_connections"
        )
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _ensure_manager() -> None:
    """aiomultiprocess creates every Process's Namespace on one shared manager process;
    if that process died, each later Process() would fail, and with it every restart."""
    manager = aiomultiprocess.core._manager
    process = getattr(manager, "_process", None)
    if manager is not None and (process is None or not process.is_alive()):
        log.warning("aiomultiprocess's manager process is gone; starting a new one")
        aiomultiprocess.core._manager = None


def load_exit_hook(spec: str):
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        hook = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StartupError(f"supervisor.on_child_exit: cannot load {spec!r}: {exc}") from None
    return hook


class Supervisor:
    def __init__(self, settings: Settings, settings_path: str | None = None, overrides: dict | None = None) -> None:
        self.settings = settings
        self.settings_path = settings_path
        self.overrides = overrides or {}
        self.conn_count = settings.server.conn_processes
        self.worker_count = settings.workers.count
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.listener: socket.socket | None = None
        self.rings: RingSet | None = None
        self.conns = [Child("conn", i) for i in range(self.conn_count)]
        self.workers = [Child("worker", i) for i in range(self.worker_count)]
        self.exit_code = 0
        self._stop_signal_at = 0.0
        self.started_at = time.time()
        self._ids = itertools.count(1)
        self._topology = asyncio.Lock()  # one restart/reload at a time
        self._tasks: set[asyncio.Task] = set()
        self._pid_file = PidFile(settings.supervisor.pid_file)
        self._status: StatusServer | None = None
        self._exit_hook = None
        self.counters = ChildCounters()  # children's metrics snapshots (aserver/metrics.py)
        self._metrics = None

    @property
    def children(self) -> list[Child]:
        return [*self.conns, *self.workers]

    async def run(self) -> int:
        settings = self.settings
        setproctitle.setproctitle(f"aserver[{settings.server.name}]: supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_stop_signal, sig)
        self.loop.add_signal_handler(signal.SIGHUP, self._background, self.reload)
        try:
            self._pid_file.acquire()
        except AlreadyRunning as exc:
            log.error("%s", exc)
            return 1
        try:
            self._exit_hook = load_exit_hook(settings.supervisor.on_child_exit)
            raise_open_files_limit(settings)
            self.listener = self._activated_listener()
            if self.listener is None:
                host, port = settings.bind_address
                self.listener = bind_listener(host, port, settings.server.backlog)
            bound = self.listener.getsockname()
            if settings.metrics.enabled:
                await self._start_metrics()
            self.rings = RingSet(f"aserver-{os.getpid()}", self.conn_count, self.worker_count, settings.ring.size)
            # Workers first: a conn process must not accept before someone can answer.
            await self._start_all(self.workers)
            await self._start_all(self.conns)
            self._status = StatusServer(str(self._pid_file.path) + ".sock", self.status)
            await self._status.start()
        except StartupError as exc:
            log.error("start-up failed: %s", exc)
            await self._shutdown()
            return 2
        ready = (
            f"aserver ready: listening on {bound[0]}:{bound[1]} ({self.conn_count} conn "
            f"process{'' if self.conn_count == 1 else 'es'}, {self.worker_count} workers, pid {os.getpid()}; "
            f"{native.describe()})"
        )
        logs.announce(log, ready)  # also on stderr when logging to files: tests and scripts wait for it
        systemd.notify("READY=1", f"STATUS=listening on {bound[0]}:{bound[1]}", f"MAINPID={os.getpid()}")
        heartbeat = asyncio.ensure_future(self._heartbeat())
        await self.stopping.wait()
        heartbeat.cancel()
        await self._shutdown()
        return self.exit_code

    def _activated_listener(self) -> socket.socket | None:
        try:
            sock = systemd.activated_listener()
        except (OSError, ValueError) as exc:
            raise StartupError(f"socket activation: {exc}") from None
        if sock is not None:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.listen(self.settings.server.backlog)
            log.info("socket activation: using the listening socket passed as fd 3 (server.bind ignored)")
        return sock

    async def _start_metrics(self) -> None:
        from aserver.supervisor.metrics import MetricsServer  # prometheus_client only when enabled

        host, port = self.settings.metrics_address
        self._metrics = MetricsServer(self, host, port)
        try:
            bound = await self._metrics.start()
        except OSError as exc:
            raise StartupError(f"metrics.bind: cannot listen on {host}:{port}: {exc.strerror}") from None
        log.info("metrics: serving http://%s:%d/metrics", bound[0], bound[1])

    def _background(self, coro_fn, *args) -> None:
        task = asyncio.ensure_future(coro_fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Starting children ----------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        assert self.rings is not None
        if child.role == "conn":
            rings, listener, target = self.rings.for_conn(child.index), self.listener, conn_process
        else:
            rings, listener, target = self.rings.for_worker(child.index), None, worker_process
        _ensure_manager()
        ours, theirs = socket.socketpair()
        spec = ChildSpec(child.role, child.index, child.incarnation, self.settings, theirs, rings, listener,
                         child.standby)
        process = aiomultiprocess.Process(
            target=target, args=(spec,), name=f"{child.role}-{child.index}", loop_initializer=uvloop.new_event_loop
        )
        process.start()
        theirs.close()
        child.process = process
        child.started_at = time.monotonic()
        child.last_pong = child.started_at
        child.ready = self.loop.create_future()
        child.exited = self.loop.create_future()
        child.retiring = False
        child.channel = ControlChannel(ours, lambda m: self._on_message(child, m), lambda: None)
        child.channel.start(self.loop)
        self.loop.add_reader(process.aio_process.sentinel, self._on_exit, child, process)
        log.debug("started %s (pid %d)", child.name, process.pid)

    async def _start_all(self, children: list[Child]) -> None:
        for child in children:
            self._spawn(child)
        await self._wait_ready(children)

    async def _wait_ready(self, children: list[Child]) -> None:
        waits = [asyncio.wait_for(asyncio.shield(c.ready), START_TIMEOUT) for c in children if c.ready]
        try:
            await asyncio.gather(*waits)
        except TimeoutError:
            raise StartupError(f"children did not report ready within {START_TIMEOUT:.0f}s") from None

    def _on_message(self, child: Child, message: Message) -> None:
        event = message.get("event")
        answer = child.answers.pop(message.get("id") or 0, None)
        if answer is not None and not answer.done():
            answer.set_result(message)
        if event == "pong":
            child.last_pong = time.monotonic()
        elif event == "metrics":
            self.counters.update(child.pid, message)
        elif child.ready is not None and not child.ready.done():
            if event == "ready":
                child.ready.set_result(None)
            elif event == "failed":
                child.ready.set_exception(StartupError(message.get("error", "failed")))

    async def ask(self, child: Child, cmd: str, timeout: float = ASK_TIMEOUT, **fields: Any) -> Message | None:
        """Send a command and wait for its answer (None if the child died or timed out)."""
        if child.channel is None or not child.alive:
            return None
        request_id = next(self._ids)
        answer = self.loop.create_future()
        child.answers[request_id] = answer
        child.channel.send({"cmd": cmd, "id": request_id, **fields})
        assert child.exited is not None
        done, _ = await asyncio.wait([answer, child.exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        child.answers.pop(request_id, None)
        return answer.result() if answer in done else None

    # Children exiting -------------------------------------------------------------------

    def _on_exit(self, child: Child, process: aiomultiprocess.Process) -> None:
        self.loop.remove_reader(process.aio_process.sentinel)
        # The sentinel closes a moment before the child can be reaped.
        process.aio_process.join(1)
        code = process.exitcode
        if child.process is not process:
            self.counters.exited(process.pid)
            return
        if child.channel is not None:
            child.channel.drain()  # its last words (final metrics) may be unread yet
            child.channel.close()
        self.counters.exited(process.pid)
        if child.exited is not None and not child.exited.done():
            child.exited.set_result(code)
        self._call_exit_hook(child, process.pid, code)
        if self.stopping.is_set() or child.retiring:
            return
        if child.ready is not None and not child.ready.done():
            reason = "failed to start" if code == EXIT_STARTUP_FAILED else f"exited with code {code} before ready"
            child.ready.set_exception(StartupError(f"{child.name} {reason}"))
            return
        self._background(self._recover, child, process.pid, code)

    def _call_exit_hook(self, child: Child, pid: int | None, code: int | None) -> None:
        if self._exit_hook is None:
            return
        try:
            result = self._exit_hook(child.role, child.index, pid, code)
            if asyncio.iscoroutine(result):
                self._background(lambda: result)
        except Exception:
            log.exception("supervisor.on_child_exit hook failed")

    async def _recover(self, child: Child, pid: int | None, code: int | None) -> None:
        now = time.monotonic()
        lived = now - child.started_at
        window = self.settings.supervisor.restart_window
        child.deaths.append(now)
        while child.deaths and child.deaths[0] < now - window:
            child.deaths.popleft()
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        if len(child.deaths) > self.settings.supervisor.max_restarts:
            log.critical(
                "%s %s; it died %d times within %.0fs (supervisor.max_restarts %d): crash loop, stopping the server",
                child.name, how, len(child.deaths), window, self.settings.supervisor.max_restarts,
            )
            self.exit_code = 1
            self.stopping.set()
            return
        child.quick_deaths = child.quick_deaths + 1 if lived < QUICK_DEATH else 0
        delay = 0.0
        if child.quick_deaths:
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_BASE * 2 ** (child.quick_deaths - 1))
        log.error("%s (pid %s) %s after %.1fs; restarting%s", child.name, pid, how, lived,
                  f" in {delay:.1f}s" if delay else "")
        async with self._topology:
            slots = self.workers if child.role == "worker" else self.conns
            if child.retiring or slots[child.index] is not child:
                return  # a reload retired or replaced it meanwhile: nothing to recover
            await self._hand_over(child)
            await asyncio.sleep(delay)
            if self.stopping.is_set():
                return
            child.incarnation += 1
            child.restarts += 1
            self._spawn(child)
            try:
                await self._wait_ready([child])
            except StartupError as exc:
                log.error("%s could not restart: %s", child.name, exc)
                if child.alive:
                    # Never became ready: kill it; its exit (with `ready` settled) brings
                    # us back here with the backoff and crash-loop accounting.
                    if child.ready is not None and not child.ready.done():
                        child.ready.cancel()
                    child.process.kill()
                else:
                    self._background(self._recover, child, child.pid, child.process.exitcode)
                return
            log.info("%s is back (pid %s)", child.name, child.pid)

    async def _hand_over(self, child: Child) -> None:
        """Tell the other side that `child` is gone, so its rings are consistent for the
        replacement: conns answer or replay a worker's requests; workers drop a conn's
        clients."""
        if child.role == "worker":
            answers = await asyncio.gather(*(self.ask(c, "worker_gone", index=child.index) for c in self.conns))
            lost = sum(a.get("lost", 0) for a in answers if a)
            if lost:
                log.warning("worker %d: %d requests in flight answered WORKER_LOST", child.index, lost)
        else:
            answers = await asyncio.gather(*(self.ask(w, "conn_gone", index=child.index) for w in self.workers))
            closed = sum(a.get("closed", 0) for a in answers if a) // max(1, len(self.workers))
            log.warning("conn %d: its %d clients were disconnected", child.index, closed)

    async def _heartbeat(self) -> None:
        interval = self.settings.supervisor.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            timeout = self.settings.supervisor.heartbeat_timeout
            now = time.monotonic()
            for child in self.children:
                if not child.alive or child.ready is None or not child.ready.done() or child.channel is None:
                    continue
                if now - child.last_pong > timeout:
                    log.error("%s (pid %s) did not answer heartbeats for %.1fs: killing it",
                              child.name, child.pid, now - child.last_pong)
                    child.last_pong = now  # once
                    child.process.kill()
                else:
                    child.channel.send({"cmd": "ping"})

    # Reload -----------------------------------------------------------------------------

    async def reload(self) -> None:
        if self.stopping.is_set() or self.settings_path is None:
            return
        systemd.notify("RELOADING=1", systemd.monotonic_usec())
        try:
            await self._reload()
        finally:
            if not self.stopping.is_set():
                systemd.notify("READY=1", "STATUS=reloaded")

    async def _reload(self) -> None:
        log.info("SIGHUP: reloading %s", self.settings_path)
        try:
            new = load(self.settings_path, self.overrides)
        except SettingsError as exc:
            log.error("reload refused, keeping the running settings and code: %s", exc)
            return
        merged, needs_restart = reload_merge(self.settings, new)
        if needs_restart:
            log.warning("reload: changed but only applied by a restart: %s", ", ".join(needs_restart))
        async with self._topology:
            old_settings = self.settings
            self.settings = merged
            fresh = [Child("worker", w.index, w.incarnation + 1, standby=True) for w in self.workers]
            for child in fresh:
                self._spawn(child)
            try:
                await self._wait_ready(fresh)
            except StartupError as exc:
                log.error("reload failed, keeping the running workers: %s", exc)
                self.settings = old_settings
                for child in fresh:
                    if child.alive:
                        child.retiring = True
                        child.process.kill()
                return
            for slot, child in enumerate(fresh):
                old = self.workers[slot]
                await self._retire(old)
                await self._hand_over(old)
                child.restarts = old.restarts
                child.last_pong = time.monotonic()  # heartbeats start now
                self.workers[slot] = child
                child.standby = False  # a later restart of this slot attaches at once
                answer = await self.ask(child, "attach")
                if answer is None and child.alive:
                    log.warning("worker %d did not confirm attaching", slot)
        log.info("reload complete: %d workers running the new code", len(self.workers))

    async def _retire(self, child: Child) -> None:
        """Stop a worker gracefully: it finishes what it took, then exits."""
        child.retiring = True
        if not child.alive:
            return
        assert child.exited is not None and child.channel is not None
        child.channel.send({"cmd": "stop"})
        try:
            await asyncio.wait_for(asyncio.shield(child.exited), self.settings.server.stop_timeout + 5)
        except TimeoutError:
            log.warning("%s (pid %s) did not finish in time; killing it", child.name, child.pid)
            child.process.kill()
            await child.exited

    # Status -------------------------------------------------------------------------------

    async def status(self) -> dict:
        async def row(child: Child) -> dict:
            stats = await self.ask(child, "stats", timeout=2.0) or {}
            return {
                "role": child.role,
                "index": child.index,
                "pid": child.pid,
                "alive": child.alive,
                "uptime": round(time.monotonic() - child.started_at, 1) if child.alive else 0,
                "restarts": child.restarts,
                "connections": stats.get("connections", 0),
                "requests": stats.get("requests", 0),
                "in_flight": stats.get("in_flight", 0),
            }

        rows = await asyncio.gather(*(row(c) for c in self.children))
        return {"name": self.settings.server.name, "pid": os.getpid(),
                "uptime": round(time.time() - self.started_at, 1), "children": rows}

    # Stopping --------------------------------------------------------------------------

    def _on_stop_signal(self, sig: int) -> None:
        now = time.monotonic()
        if self.stopping.is_set():
            # A signal to the process group (timeout(1), kill -TERM -PGID) also reaches
            # us directly: a repeat within a second is the same request, not a second one.
            if now - self._stop_signal_at < SECOND_SIGNAL_AFTER:
                return
            log.warning("second %s: stopping at once", signal.Signals(sig).name)
            for child in self.children:
                if child.alive:
                    child.process.kill()
            return
        log.info("%s received: stopping", signal.Signals(sig).name)
        self._stop_signal_at = now
        self.stopping.set()

    async def _shutdown(self) -> None:
        self.stopping.set()
        systemd.notify("STOPPING=1")
        if self._status is not None:
            await self._status.close()
        if self._metrics is not None:
            await self._metrics.close()
        # Our copy of the listening socket goes first: once the conn processes close
        # theirs, new connections are refused at once (a load balancer then tries another
        # server) instead of waiting in the accept queue until we exit.
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        timeout = self.settings.server.stop_timeout
        # conn processes first (stop reading, answer what they hold, close), then workers.
        for group in (self.conns, self.workers):
            for child in group:
                if child.alive:
                    child.channel.send({"cmd": "stop"})
            await self._join(group, timeout + 5)
        for child in self.children:
            if child.channel is not None:
                child.channel.close()
        if self.rings is not None:
            self.rings.close()
        if self.listener is not None:
            self.listener.close()
        manager = aiomultiprocess.core._manager
        if manager is not None:
            manager.shutdown()
            aiomultiprocess.core._manager = None
        self._pid_file.release()

    async def _join(self, group: list[Child], timeout: float) -> None:
        waits = [c.exited for c in group if c.alive]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for child in group:
            if child.alive:
                log.warning("%s (pid %s) did not stop in time; killing it", child.name, child.pid)
                child.process.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)


def serve(settings: Settings, settings_path: str | None = None, overrides: dict | None = None) -> int:
    async def main() -> int:
        return await Supervisor(settings, settings_path, overrides).run()

    return uvloop.run(main())
