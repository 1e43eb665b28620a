"""Typed message bodies: msgspec Structs in, Structs out, for handlers that ask for it.

    @app.handler(10, request=Login, reply=Welcome)
    def login(request: Request) -> Welcome:
        return Welcome(name=request.message.name)

The body format (MessagePack or JSON) is a setting (`workers.body_format`), the same for
every handler of a server; the client's typed call takes the same format.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from aserver.app import BadRequest, Handler, Reply, Request, callable_name

BodyFormat = Literal["msgpack", "json"]


def codecs(fmt: BodyFormat, message_type: Any) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    """(decode, encode) for one type in one format."""
    module = msgspec.msgpack if fmt == "msgpack" else msgspec.json
    decoder = module.Decoder(message_type)
    return decoder.decode, module.Encoder().encode


def typed_handler(fn: Handler, request_type: Any, reply_type: Any, fmt: BodyFormat) -> Handler:
    """Wrap `fn` so it sees `request.message` decoded and may return a Struct. The
    wrapper is async or sync as `fn` is, so a sync handler still runs inline."""
    decode = codecs(fmt, request_type)[0] if request_type is not None else None
    encode = codecs(fmt, reply_type if reply_type is not None else Any)[1]

    def decoded(request: Request) -> Request:
        if decode is not None:
            try:
                request.message = decode(request.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRequest(f"body is not a valid {request_type.__name__}: {exc}") from None
        return request

    def encoded(result: Any) -> Any:
        if result is None or isinstance(result, (bytes, bytearray, memoryview)) or inspect.iscoroutine(result):
            return result  # a coroutine here is refused by the reply path, with the reason
        if isinstance(result, Reply):
            body = result.body
            if isinstance(body, (bytes, bytearray, memoryview)):
                return result
            return Reply(encode(body), result.status)
        return encode(result)

    if inspect.iscoroutinefunction(fn):
        async def run(request: Request) -> Any:
            return encoded(await fn(decoded(request)))
    else:
        def run(request: Request) -> Any:
            return encoded(fn(decoded(request)))

    run.__qualname__ = callable_name(fn)
    return run
