"""Entry point of a worker process."""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging

from aserver.app import App, callable_name
from aserver.ipc import records
from aserver.ipc.channel import RingReceiver, RingSender
from aserver.metrics import WorkerMetrics
from aserver.protocol import PacketCodec
from aserver.supervisor.child import (
    ChildControl,
    open_consumer,
    open_producer,
    report_ready,
    run_child,
    startup_failed,
)
from aserver.supervisor.spec import ChildSpec, RingEnd
from aserver.worker.dispatcher import Dispatcher

log = logging.getLogger("aserver.worker")


def load_app(modules: list[str], config: dict | None = None) -> App:
    """Import each handler module ('pkg.mod' or 'pkg.mod:attr', attr defaulting to 'app')
    and merge their Apps. Each App gets `config` (the [service] table)."""
    merged = App()
    merged.config = config or {}
    for spec in modules:
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        app = getattr(module, attr or "app", None)
        if not isinstance(app, App):
            raise ImportError(f"handler module {module_name!r} has no aserver.App named {attr or 'app'!r}")
        app.config = merged.config
        merged.include(app)
    return merged


async def worker_process(spec: ChildSpec) -> None:
    await run_child(spec, _serve)


async def _serve(spec: ChildSpec, control: ChildControl) -> None:
    loop = asyncio.get_running_loop()
    settings = spec.settings
    try:
        app = load_app(settings.workers.handlers, settings.service)
        for hook in app.startup_hooks:
            await hook()
    except Exception as exc:
        startup_failed(control, f"worker {spec.index} could not start", exc)
    dispatcher = Dispatcher(
        app,
        PacketCodec(settings.byte_order),
        loop,
        settings.workers.concurrency,
        settings.workers.max_pending,
        settings.workers.body_format,
        WorkerMetrics() if settings.metrics.enabled else None,
    )
    control.on("conn_gone", lambda m: {"event": "conn_reset", "closed": dispatcher.conn_gone(m["index"])})
    control.on("stats", lambda m: {"event": "stats", **dispatcher.snapshot()})
    if dispatcher.metrics is not None:
        metrics = dispatcher.metrics
        control.on("metrics", lambda m: {"event": "metrics", **metrics.snapshot()})
    attach = asyncio.Event()
    control.on("attach", lambda m: attach.set() or {"event": "attaching"})
    periodic: list[asyncio.Task] = []
    if spec.standby:
        report_ready(control)
        await _first(attach.wait(), control.stop.wait())
    if not control.stop.is_set():
        attach_rings(dispatcher, loop, spec.rings)
        periodic = [asyncio.ensure_future(_every(seconds, hook)) for seconds, hook in app.periodic]
        dispatcher.start()
        if not spec.standby:
            report_ready(control)
        await control.stop.wait()
        # Finish what we took; what is still in the rings waits for our successor.
        dispatcher.stop_intake()
        if not await dispatcher.finish(settings.server.stop_timeout):
            log.warning("stop timeout: %d requests left unanswered", dispatcher.pending)
    for task in periodic:
        task.cancel()
    for hook in app.shutdown_hooks:
        try:
            await hook()
        except Exception:
            log.exception("on_shutdown hook %s failed", callable_name(hook))
    for receiver in dispatcher.receivers:
        receiver.close()
    for sender in dispatcher.senders:
        sender.close()
    if dispatcher.metrics is not None:  # final counts, so a reload or stop loses none
        control.report("metrics", **dispatcher.metrics.snapshot())


def attach_rings(dispatcher: Dispatcher, loop: asyncio.AbstractEventLoop,
                 rings: list[tuple[RingEnd, RingEnd]]) -> None:
    """Open the worker's ends of its rings, a (request, reply) pair per conn process, and
    attach them: requests read in place and released through the reply ring, large reply
    parts that are request bytes (zero_copy bodies) sent by reference."""
    senders = []
    receivers = []
    for index, (requests, replies) in enumerate(rings):
        reader = open_consumer(requests)
        receivers.append(RingReceiver(reader, loop, dispatcher.on_records, in_place=True,
                                      release=functools.partial(dispatcher.release_requests, index)))
        writer = open_producer(replies)
        writer.refer_to(reader.segment, records.PACKETS_BY_REF, records.REF_MIN)
        senders.append(RingSender(writer, loop, dispatcher.on_room))
    dispatcher.attach(senders, receivers)


async def _first(*aws) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def _every(seconds: float, hook) -> None:
    loop = asyncio.get_running_loop()
    next_run = loop.time() + seconds
    while True:
        await asyncio.sleep(max(0.0, next_run - loop.time()))
        next_run += seconds
        try:
            await hook()
        except Exception:
            log.exception("periodic hook %s failed", callable_name(hook))
