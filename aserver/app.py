"""The handler API: an App collects handlers and hooks; workers run them."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

import msgspec

if TYPE_CHECKING:
    from aserver.worker.connection import Connection


class Status(enum.IntEnum):
    """Reply status codes the framework itself sends. Services use values below
    0xFFFF0000; the range from there up is reserved."""

    OK = 0
    UNKNOWN_COMMAND = 0xFFFF0001  # no handler for the request's cmd_id
    HANDLER_ERROR = 0xFFFF0002  # the handler raised; the traceback is in the worker's log
    WORKER_LOST = 0xFFFF0003  # the worker died while holding the request
    BAD_REQUEST = 0xFFFF0004  # the body could not be decoded for the handler
    BACKEND_UNAVAILABLE = 0xFFFF0005  # a backend link is down (handlers.proxy)
    BACKEND_TIMEOUT = 0xFFFF0006  # a backend did not answer in time (handlers.proxy)


class Reply(NamedTuple):
    """What a handler may return instead of bare body bytes. A typed handler's reply
    body may be a Struct."""

    body: Any = b""
    status: int = 0


def reply_parts(result: object) -> tuple[bytes | bytearray | memoryview, int]:
    """A handler's result other than bytes or None, as (body, status) ready to send: a
    flat byte buffer and a u32. Raises (inside the handler's try, so the client gets
    HANDLER_ERROR) for anything else."""
    if isinstance(result, Reply):
        body, status = result.body, result.status
        if not isinstance(status, int) or not 0 <= status <= 0xFFFFFFFF:
            raise ValueError(f"Reply status {status!r} is not an integer in 0-4294967295")
    else:
        body, status = result, 0
    if isinstance(body, bytes | bytearray):
        return body, status
    if isinstance(body, memoryview):
        flat = body.ndim == 1 and body.format == "B" and body.c_contiguous
        return (body if flat else body.tobytes()), status
    if inspect.iscoroutine(body):
        # A plain function that returns a coroutine was taken for a sync handler.
        body.close()
        raise TypeError("handler returned a coroutine: declare it `async def` so the worker awaits it")
    what = "Reply body" if isinstance(result, Reply) else "handler"
    raise TypeError(f"{what} returned {type(body).__name__}; expected bytes, Reply or None")


def callable_name(fn: object) -> str:
    """A handler's or hook's name for messages (a partial or callable object has no
    __qualname__)."""
    name = getattr(fn, "__qualname__", None)
    return name if name is not None else repr(fn)


class BadRequest(Exception):
    """Raise in a handler (typed handlers raise it for an undecodable body): the client
    gets status BAD_REQUEST and the reason goes to the log, without a traceback."""


class Request(msgspec.Struct, eq=False):
    """One request packet, as a handler sees it. A msgspec Struct because one is built
    per request: that costs a quarter of a Python class's `__init__`. Compared and hashed
    by identity, like a plain object."""

    seq_num: int
    cmd_id: int
    status_code: int
    user_id: int
    body: bytes | memoryview  # a memoryview only for zero_copy handlers (App.handler)
    connection: Connection
    message: Any = None  # the decoded body, for typed handlers

    @property
    def peer(self) -> tuple[str, int]:
        """The client's (host, port)."""
        return self.connection.peer

    def __repr__(self) -> str:
        try:
            body = f"{len(self.body)} bytes"
        except ValueError:  # a zero_copy body, released once its handler returned
            body = "released"
        return (
            f"Request(cmd_id={self.cmd_id}, seq_num={self.seq_num}, user_id={self.user_id}, "
            f"body={body}, connection={self.connection.id:#x})"
        )


HandlerResult = bytes | bytearray | memoryview | Reply | None
# A handler is `async def`, or a plain `def` that the worker runs inline (see App.handler).
Handler = Callable[[Request], Awaitable[HandlerResult] | HandlerResult]
ConnectionHook = Callable[["Connection"], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])
# A handler run in the conn process (in_conn=True): sync, on the conn's hot path.
ConnHandler = Callable[[Request], HandlerResult]


def _require_async(fn: Callable, what: str) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{what} {callable_name(fn)!r} must be an async function")


class App:
    """Register handlers with decorators:

        app = App()

        @app.handler(1)
        def echo(request: Request) -> bytes:
            return request.body

        @app.handler(2)
        async def lookup(request: Request) -> bytes:
            return await store.get(request.body)
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        # The settings file's [service] table, set in each worker before start-up hooks.
        self.config: dict[str, Any] = {}
        self.handlers: dict[int, Handler] = {}
        # cmd_id -> (request Struct type, reply Struct type) for typed handlers
        self.message_types: dict[int, tuple[Any, Any]] = {}
        # cmd_id -> sync handler the conn process may run itself (in_conn=True)
        self.conn_handlers: dict[int, ConnHandler] = {}
        self.fallback_handler: Handler | None = None
        # cmd_ids (and whether the fallback) whose handlers take memoryview bodies
        self.zero_copy: set[int] = set()
        self.fallback_zero_copy = False
        self.connect_hooks: list[ConnectionHook] = []
        self.disconnect_hooks: list[ConnectionHook] = []
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []
        self.periodic: list[tuple[float, Hook]] = []

    def handler(
        self, cmd_id: int, *, request: Any = None, reply: Any = None, in_conn: bool = False,
        zero_copy: bool = False,
    ) -> Callable[[F], F]:
        """Register the handler for `cmd_id`.

        An `async def` handler runs in one of the worker's consumer tasks and may await.
        A plain `def` handler runs inline as its request arrives, with no task switch:
        the fastest path, for handlers that never wait (in-memory state, computation);
        while one runs, nothing else in that worker does.

        With `request` (a msgspec Struct type) the body is decoded into
        `request.message`; with `reply` the handler may return that Struct. The wire
        format is the setting workers.body_format.
        With `in_conn=True` the handler is a fast *sync* function the conn process runs
        itself when reply order allows (else a worker runs it); there
        `request.connection` has only `id` and `peer`.

        With `zero_copy=True` `request.body` is a read-only memoryview. A sync handler
        run as its request is read gets a view of the shared-memory ring record (the
        pure-Python loop: of its own copy of the record), so the worker copies the
        body once fewer (perf/README.md). It is valid only until the handler returns:
        the ring space is reused then, and the view is released if the handler kept
        it, so a later use raises ValueError. A slice or memoryview made from it is not
        released, nor is the view while something holds a buffer of it (numpy,
        struct.iter_unpack, a msgspec.Raw field; counted as zero_copy_views_held and
        logged): those would read reused memory. Keep what you need as bytes,
        `bytes(request.body[:8])`. Returning the view or a slice of it (also in a
        Reply, or through request.connection.send) is fine: replies are copied out
        before the space is reused. A request that had to wait (an async handler, or
        its connection was busy) gets a view of a copy of its own; do not rely on
        that lasting either."""
        if not isinstance(cmd_id, int) or not 0 <= cmd_id <= 0xFFFF:
            raise ValueError(f"cmd_id must be an integer in 0-65535, got {cmd_id!r}")

        def register(fn: F) -> F:
            if in_conn:  # a sync function, answered in the conn process when order allows
                if request is not None or reply is not None or zero_copy:
                    raise ValueError(
                        f"in_conn handler for cmd_id {cmd_id} takes bytes bodies (no request=/reply=/zero_copy=)"
                    )
                if inspect.iscoroutinefunction(fn):
                    raise TypeError(f"in_conn handler {callable_name(fn)!r} must be a plain (sync) function")
                if cmd_id in self.handlers:
                    raise ValueError(f"cmd_id {cmd_id} already has a handler: {callable_name(self.handlers[cmd_id])}")
                self.conn_handlers[cmd_id] = fn
                self.handlers[cmd_id] = fn
                return fn
            if cmd_id in self.handlers:
                raise ValueError(f"cmd_id {cmd_id} already has a handler: {callable_name(self.handlers[cmd_id])}")
            self.handlers[cmd_id] = fn
            if request is not None or reply is not None:
                self.message_types[cmd_id] = (request, reply)
            if zero_copy:
                self.zero_copy.add(cmd_id)
            return fn

        return register

    @overload
    def fallback(self, fn: F) -> F: ...
    @overload
    def fallback(self, *, zero_copy: bool = False) -> Callable[[F], F]: ...

    def fallback(self, fn: F | None = None, *, zero_copy: bool = False) -> F | Callable[[F], F]:
        """Handle every cmd_id that has no handler of its own (a proxy, say); sync or
        async, like a handler. `@app.fallback` or `@app.fallback(zero_copy=True)`."""

        def register(fn: F) -> F:
            if self.fallback_handler is not None:
                raise ValueError(f"a fallback handler is already set: {callable_name(self.fallback_handler)}")
            self.fallback_handler = fn
            self.fallback_zero_copy = zero_copy
            return fn

        return register if fn is None else register(fn)

    def on_connect(self, fn: F) -> F:
        _require_async(fn, "on_connect hook")
        self.connect_hooks.append(fn)
        return fn

    def on_disconnect(self, fn: F) -> F:
        _require_async(fn, "on_disconnect hook")
        self.disconnect_hooks.append(fn)
        return fn

    def on_startup(self, fn: F) -> F:
        _require_async(fn, "on_startup hook")
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: F) -> F:
        _require_async(fn, "on_shutdown hook")
        self.shutdown_hooks.append(fn)
        return fn

    def every(self, seconds: float) -> Callable[[F], F]:
        if not seconds > 0:
            raise ValueError(f"every() needs a positive interval, got {seconds!r}")

        def register(fn: F) -> F:
            _require_async(fn, "periodic hook")
            self.periodic.append((float(seconds), fn))
            return fn

        return register

    def include(self, other: App) -> None:
        """Merge another app's registrations into this one (cmd_ids must not clash)."""
        for cmd_id, fn in other.handlers.items():
            request, reply = other.message_types.get(cmd_id, (None, None))
            self.handler(cmd_id, request=request, reply=reply, zero_copy=cmd_id in other.zero_copy)(fn)
        if other.fallback_handler is not None:
            self.fallback(zero_copy=other.fallback_zero_copy)(other.fallback_handler)
        self.conn_handlers.update(other.conn_handlers)
        self.connect_hooks += other.connect_hooks
        self.disconnect_hooks += other.disconnect_hooks
        self.startup_hooks += other.startup_hooks
        self.shutdown_hooks += other.shutdown_hooks
        self.periodic += other.periodic
