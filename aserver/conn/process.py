"""Entry point of a conn process."""

from __future__ import annotations

import asyncio
import logging

from aserver.conn.in_conn import load_conn_handlers
from aserver.conn.server import ConnServer
from aserver.metrics import conn_snapshot
from aserver.supervisor.child import (
    ChildControl,
    open_consumer,
    open_producer,
    report_ready,
    run_child,
    startup_failed,
)
from aserver.supervisor.spec import ChildSpec

log = logging.getLogger("aserver.conn")


async def conn_process(spec: ChildSpec) -> None:
    await run_child(spec, _serve)


async def _serve(spec: ChildSpec, control: ChildControl) -> None:
    loop = asyncio.get_running_loop()
    try:
        conn_handlers = load_conn_handlers(spec.settings.workers.handlers, spec.settings.service)
        rings = [(open_producer(requests), open_consumer(replies)) for requests, replies in spec.rings]
        server = ConnServer(spec.settings, spec.index, spec.incarnation, rings, loop, conn_handlers)
        assert spec.listener is not None
        await server.start(spec.listener)
    except Exception as exc:
        startup_failed(control, f"conn {spec.index} could not start", exc)
    control.on("worker_gone", lambda m: {"event": "worker_reset", "lost": server.worker_gone(m["index"])})
    control.on("stats", lambda m: {"event": "stats", **server.snapshot()})
    control.on("metrics", lambda m: {"event": "metrics", **conn_snapshot(server)})
    report_ready(control)
    await control.stop.wait()
    log.info("stopping: %d connections open", len(server.connections))
    await server.stop(spec.settings.server.stop_timeout)
    if spec.settings.metrics.enabled:  # final counts, so a stop loses none
        control.report("metrics", **conn_snapshot(server, rings=False))
