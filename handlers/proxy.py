"""Proxy service: forwards each request to a backend speaking this protocol and answers
with the backend's reply body and status (the framework echoes seq_num, cmd_id, user_id).

    [workers]
    handlers = ["handlers.proxy"]

    [service]
    backend = "127.0.0.1:7001"     # required
    proxy_commands = [1, 2, "100-199"]   # optional: cmd_ids to forward (default: all)
    backend_timeout = 5.0          # seconds per call
    backend_connect_timeout = 2.0
    backend_connections = 2        # pooled connections per worker
    backend_byte_order = "little"  # or "network"

Unreachable backend: status BACKEND_UNAVAILABLE; no answer in time: BACKEND_TIMEOUT.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aserver import App, Reply, Request, Status
from aserver.backend import Backend, BackendTimeout, BackendUnavailable
from aserver.protocol import ByteOrder

log = logging.getLogger("handlers.proxy")

app = App("proxy")
_state: dict[str, Any] = {"backend": None, "commands": None, "timeouts": 0, "timeout_logged": 0.0}


def parse_commands(value: object) -> frozenset[int] | None:
    """`proxy_commands`: a list of cmd_ids and "LO-HI" ranges; None means every cmd_id."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"service.proxy_commands must be a list, got {value!r}")
    ids: set[int] = set()
    for item in value:
        if isinstance(item, str) and "-" in item:
            lo, _, hi = item.partition("-")
            ids.update(range(int(lo), int(hi) + 1))
        elif isinstance(item, int) and not isinstance(item, bool):
            ids.add(item)
        else:
            raise ValueError(f"service.proxy_commands: {item!r} is not a cmd_id or 'LO-HI' range")
    if not all(0 <= i <= 0xFFFF for i in ids):
        raise ValueError("service.proxy_commands: cmd_ids must be in 0-65535")
    return frozenset(ids)


@app.fallback
async def forward(request: Request) -> Reply:
    commands = _state["commands"]
    if commands is not None and request.cmd_id not in commands:
        return Reply(b"", Status.UNKNOWN_COMMAND)
    backend: Backend = _state["backend"]
    try:
        reply = await backend.call(request.cmd_id, request.body, user_id=request.user_id)
    except BackendUnavailable:
        # Backend logs each outage once (aserver.backend); nothing to add per request.
        return Reply(b"backend unavailable", Status.BACKEND_UNAVAILABLE)
    except BackendTimeout as exc:
        _log_timeout(exc)
        return Reply(b"backend timeout", Status.BACKEND_TIMEOUT)
    return Reply(reply.body, reply.status_code)


def _log_timeout(exc: BackendTimeout) -> None:
    """At most one line per 10 s, with the count since the last one."""
    _state["timeouts"] += 1
    now = time.monotonic()
    if now - _state["timeout_logged"] >= 10.0:
        log.warning("%s (%d timeouts since last report)", exc, _state["timeouts"])
        _state["timeouts"] = 0
        _state["timeout_logged"] = now


@app.on_startup
async def open_backend() -> None:
    config = app.config
    address = config.get("backend")
    if not isinstance(address, str):
        raise ValueError('handlers.proxy needs service.backend = "HOST:PORT" in the settings file')
    _state["commands"] = parse_commands(config.get("proxy_commands"))
    _state["backend"] = Backend.from_address(
        address,
        connections=int(config.get("backend_connections", 2)),
        timeout=float(config.get("backend_timeout", 5.0)),
        connect_timeout=float(config.get("backend_connect_timeout", 2.0)),
        byte_order=ByteOrder(config.get("backend_byte_order", "little")),
    )
    log.info("proxying to %s", address)


@app.on_shutdown
async def close_backend() -> None:
    backend, _state["backend"] = _state["backend"], None
    if backend is not None:
        await backend.close()
