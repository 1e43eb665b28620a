"""Handlers answered inside the conn process (the original's shmq_pushed): heartbeats and
pings that need no hop to a worker.

Order rule: a connection's replies keep request order. So a packet is answered here only
while nothing of that connection is outstanding at a worker and no earlier packet of the
same read went to one; otherwise it goes to the worker like any other (the worker runs the
same function, registered there too). Replies made here are queued behind any worker
replies not yet written, and written with them once per loop iteration.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from aserver.app import BadRequest, ConnHandler, Request, Status, callable_name, reply_parts
from aserver.protocol import HEADER_SIZE, PacketCodec

if TYPE_CHECKING:
    from aserver.conn.client_protocol import ClientProtocol

log = logging.getLogger("aserver.conn")


def load_conn_handlers(modules: list[str], config: dict) -> dict[int, ConnHandler]:
    """Import the handler modules (their module-level code runs; start-up hooks do not)
    and return their in-conn handlers. A module that fails to import here only disables
    answering in conn: the workers import it too and report the failure."""
    from aserver.worker.process import load_app

    try:
        app = load_app(modules, config)
    except Exception:
        log.warning("handler modules could not be imported in the conn process: every request goes to a worker",
                    exc_info=True)
        return {}
    return dict(app.conn_handlers)


class InConnAnswerer:
    def __init__(self, handlers: dict[int, ConnHandler], codec: PacketCodec, stats: Counter[str]) -> None:
        self.handlers = handlers
        self._unpack = codec.header.unpack_from
        self._pack = codec.header.pack
        self._stats = stats

    def answer_leading(
        self, conn: ClientProtocol, run: bytes | bytearray | memoryview
    ) -> tuple[list[bytes], int, int]:
        """Answer the packets at the head of `run` that have an in-conn handler. Returns
        their replies, the byte offset where the rest of the run starts, and how many."""
        handlers = self.handlers
        unpack = self._unpack
        replies: list[bytes] = []
        pos = count = 0
        size = len(run)
        while pos < size:
            pkg_len, seq, cmd, status, user = unpack(run, pos)
            fn = handlers.get(cmd)
            if fn is None:
                break
            body = bytes(run[pos + HEADER_SIZE : pos + pkg_len])
            reply = self._run(conn, fn, seq, cmd, status, user, body)
            if reply is not None:
                replies.append(reply)
            pos += pkg_len
            count += 1
        return replies, pos, count

    def _run(self, conn: ClientProtocol, fn: ConnHandler, seq: int, cmd: int, status: int, user: int,
             body: bytes) -> bytes | None:
        try:
            result = fn(Request(seq, cmd, status, user, body, conn.info))  # type: ignore[arg-type]
            if result is None:
                return None
            out, out_status = (result, 0) if type(result) is bytes else reply_parts(result)
        except BadRequest as exc:
            log.warning("bad request cmd_id %d seq %d from %s:%s: %s; replied BAD_REQUEST",
                        cmd, seq, conn.info.peer[0], conn.info.peer[1], exc)
            out, out_status = b"", Status.BAD_REQUEST
        except Exception:
            self._stats["in_conn_handler_errors"] += 1
            log.exception("in-conn handler %s failed on cmd_id %d seq %d from %s:%s; replied HANDLER_ERROR",
                          callable_name(fn), cmd, seq, conn.info.peer[0], conn.info.peer[1])
            out, out_status = b"", Status.HANDLER_ERROR
        return self._pack(HEADER_SIZE + len(out), seq, cmd, out_status, user) + bytes(out)
