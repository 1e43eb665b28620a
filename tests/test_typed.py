"""Typed message bodies: msgspec Structs in handlers and in the client's typed call."""

from pathlib import Path

import msgspec
import pytest

from aserver import Status
from aserver.client import Client, ReplyError
from aserver.testing import ServerProcess

from probe_service import ECHO, LOGIN, LOGIN_REJECT, Login, Welcome

TESTS_DIR = str(Path(__file__).parent)


@pytest.mark.parametrize("body_format", ["msgpack", "json"])
async def test_typed_round_trip_and_bad_bodies(body_format: str) -> None:
    settings = {"workers": {"body_format": body_format}}
    with ServerProcess(handlers=["probe_service"], settings=settings, pythonpath=[TESTS_DIR]) as server:
        async with await Client.connect(*server.address) as client:
            welcome = await client.call_typed(LOGIN, Login(name="ann", level=4), Welcome, body_format=body_format)
            assert welcome == Welcome(greeting="hello ann", level=5)
            # The wire really carries the configured format.
            raw = await client.call(LOGIN, msgspec.json.encode({"name": "bo"}) if body_format == "json"
                                    else msgspec.msgpack.encode({"name": "bo"}))
            assert raw.status_code == 0
            decoded = (msgspec.json if body_format == "json" else msgspec.msgpack).decode(raw.body)
            assert decoded == {"greeting": "hello bo", "level": 2}
            # Undecodable and wrongly typed bodies: BAD_REQUEST, the connection lives on.
            for bad in (b"\xff\x00garbage", msgspec.msgpack.encode({"name": 5}), msgspec.json.encode({"level": 1})):
                reply = await client.call(LOGIN, bad, timeout=5)
                assert reply.status_code == Status.BAD_REQUEST
            with pytest.raises(ReplyError) as caught:
                await client.call_typed(LOGIN_REJECT, Login(name="x"), Welcome, body_format=body_format)
            assert caught.value.status == Status.BAD_REQUEST
            # A Reply whose body is a Struct keeps its status and is encoded.
            reply = await client.call(LOGIN_REJECT, (msgspec.json if body_format == "json" else msgspec.msgpack)
                                      .encode(Login(name="v", level=12)), timeout=5)
            assert reply.status_code == 7
            # Plain bytes handlers still work beside typed ones.
            assert (await client.call(ECHO, b"plain", timeout=5)).body == b"plain"
        server.wait_for_log(r"bad request cmd_id 20 .*body is not a valid Login")
        assert "Traceback" not in server.log_text()
