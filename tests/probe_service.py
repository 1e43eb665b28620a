"""Handlers the integration tests run inside the real server.

Events that tests must observe from outside (hooks running in every worker) are appended
to files in $PROBE_EVENTS_DIR, one file per worker process.
"""

import asyncio
import os

import msgspec

from aserver import App, BadRequest, Connection, Reply, Request

app = App("probe")
_background: set[asyncio.Task] = set()

ECHO, FAIL, SLOW_ECHO, CLOSE_ME, TRIPLE, WHO, BAD_RETURN, STATUS = 1, 3, 4, 5, 6, 7, 8, 9


def _record(event: str, conn: Connection) -> None:
    directory = os.environ.get("PROBE_EVENTS_DIR")
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}.log"), "a") as f:
            f.write(f"{event} {conn.id} {conn.peer[0]} {conn.peer[1]}\n")


@app.on_connect
async def connected(conn: Connection) -> None:
    _record("connect", conn)


@app.on_disconnect
async def disconnected(conn: Connection) -> None:
    _record("disconnect", conn)


@app.handler(ECHO)
def echo(request: Request) -> bytes:
    return request.body


@app.handler(FAIL)
def fail(request: Request) -> bytes:
    raise RuntimeError("deliberate failure for a test")


@app.handler(SLOW_ECHO)
async def slow_echo(request: Request) -> bytes:
    await asyncio.sleep(int(request.body[:4] or b"100") / 1000)
    return request.body


@app.handler(CLOSE_ME)
def close_me(request: Request) -> bytes:
    request.connection.close()
    return b"never delivered"


@app.handler(TRIPLE)
async def triple(request: Request) -> None:
    """Answers three times: twice at once, once later, through the connection handle."""
    conn = request.connection
    conn.send(request.cmd_id, b"one", seq_num=request.seq_num)
    conn.send(request.cmd_id, b"two", seq_num=request.seq_num)

    async def later() -> None:
        await asyncio.sleep(0.05)
        conn.send(request.cmd_id, b"three", seq_num=request.seq_num, user_id=7)

    task = asyncio.ensure_future(later())
    _background.add(task)
    task.add_done_callback(_background.discard)


@app.handler(WHO)
async def who(request: Request) -> bytes:
    return f"{os.getpid()} {request.peer[0]}".encode()


@app.handler(BAD_RETURN)
def bad_return(request: Request) -> int:
    return 42


# A plain function that returns a coroutine: registered as a sync handler by mistake.
HIDDEN_ASYNC = 14
app.handler(HIDDEN_ASYNC)(lambda request: slow_echo(request))


@app.handler(STATUS)
def status(request: Request) -> Reply:
    return Reply(b"custom", status=1234)


TICKS = 10
_ticks = 0


@app.every(0.05)
async def tick() -> None:
    global _ticks
    _ticks += 1


@app.handler(TICKS)
async def ticks(request: Request) -> bytes:
    return str(_ticks).encode()


@app.on_startup
async def started() -> None:
    app.started = True  # type: ignore[attr-defined]


STARTED = 11


@app.handler(STARTED)
async def was_started(request: Request) -> bytes:
    return b"yes" if getattr(app, "started", False) else b"no"


@app.on_shutdown
async def stopping() -> None:
    directory = os.environ.get("PROBE_EVENTS_DIR")
    if directory:
        with open(os.path.join(directory, f"shutdown-{os.getpid()}"), "w") as f:
            f.write("clean")


def route(header, connection, workers: int) -> int:
    """Routing hook for tests: small user ids to worker 0, the rest to the last worker."""
    return 0 if header.user_id < 1000 else workers - 1


HANG = 12


@app.handler(HANG)
async def hang(request: Request) -> bytes:
    """Blocks the worker's event loop (a handler calling blocking code by mistake)."""
    import time

    time.sleep(60)
    return b"too late"


HANG_SYNC, CRASH = 15, 16


@app.handler(HANG_SYNC)
def hang_sync(request: Request) -> bytes:
    """The same in a sync handler: it runs inline, in the middle of its ring batch."""
    import time

    time.sleep(60)
    return b"too late"


@app.handler(CRASH)
def crash_now(request: Request) -> bytes:
    """A sync handler that kills its worker (as a crash in a C extension or an OOM kill
    would), noted in $PROBE_EVENTS_DIR first so a test can count how often it ran."""
    _record("crash", request.connection)
    os._exit(3)


if os.environ.get("PROBE_CRASH_AFTER"):

    @app.every(float(os.environ["PROBE_CRASH_AFTER"]))
    async def crash() -> None:
        os._exit(70)


def child_exited(role: str, index: int, pid: int, exitcode: int) -> None:
    """supervisor.on_child_exit hook for tests."""
    directory = os.environ.get("PROBE_EVENTS_DIR")
    if directory:
        with open(os.path.join(directory, "exits.log"), "a") as f:
            f.write(f"{role} {index} {pid} {exitcode}\n")


class Login(msgspec.Struct):
    name: str
    level: int = 1


class Welcome(msgspec.Struct):
    greeting: str
    level: int


LOGIN, LOGIN_REJECT = 20, 21


@app.handler(LOGIN, request=Login, reply=Welcome)
def login(request: Request) -> Welcome:
    return Welcome(greeting=f"hello {request.message.name}", level=request.message.level + 1)


@app.handler(LOGIN_REJECT, request=Login, reply=Welcome)
async def login_reject(request: Request) -> Reply:
    if request.message.level < 10:
        raise BadRequest("level too low")
    return Reply(Welcome(greeting="vip", level=request.message.level), status=7)


PEER, PING, PING_FAIL, PING_STARTED = 30, 31, 32, 33


@app.handler(PEER)
async def peer(request: Request) -> bytes:
    """The client address the handler sees: 'host port'."""
    return f"{request.peer[0]} {request.peer[1]}".encode()


@app.handler(PING, in_conn=True)
def ping(request: Request) -> bytes:
    """Answered in the conn process when reply order allows: 'pid host port body'."""
    return f"{os.getpid()} {request.peer[0]} {request.peer[1]} ".encode() + request.body


@app.handler(PING_FAIL, in_conn=True)
def ping_fail(request: Request) -> bytes:
    raise RuntimeError("deliberate in-conn failure for a test")


@app.handler(PING_STARTED, in_conn=True)
def ping_started(request: Request) -> bytes:
    """Start-up hooks run only in workers: 'pid yes|no'."""
    return f"{os.getpid()} {'yes' if getattr(app, 'started', False) else 'no'}".encode()


def admit(host: str, port: int) -> bool:
    """limits.accept_hook for tests: refuses 127.0.0.4, raises for 127.0.0.5."""
    if host == "127.0.0.5":
        raise RuntimeError("deliberate accept hook failure for a test")
    return host != "127.0.0.4"


CANCELLED = 13


@app.handler(CANCELLED)
async def awaits_a_cancelled_future(request: Request) -> bytes:
    """Awaits something another party cancelled: CancelledError reaches the handler."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    return await future


ZERO_COPY = 40
_previous_body: list = []


@app.handler(ZERO_COPY, zero_copy=True)
def zero_copy_echo(request: Request) -> bytes:
    """The body's type, whether the body this worker got last time was released once its
    handler returned, then the body itself."""
    state = b"first"
    if _previous_body:
        try:
            bytes(_previous_body[0])
            state = b"live"
        except ValueError:
            state = b"released"
    _previous_body[:] = [request.body]
    return b"%s %s " % (type(request.body).__name__.encode(), state) + request.body
