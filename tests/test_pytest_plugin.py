"""The pytest plugin, used the way a service's own tests would use it."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.aserver(handlers=["probe_service"], workers=2, pythonpath=[str(Path(__file__).parent)])


async def test_echo_through_the_plugin(aserver_client) -> None:
    assert (await aserver_client.call(1, b"three lines", user_id=3)).body == b"three lines"


async def test_the_server_fixture_is_shared_by_the_module(aserver, aserver_client) -> None:
    assert aserver.address[1] > 0
    assert len(aserver.child_pids("worker")) == 2
    assert (await aserver_client.call(7, b"")).body.split()[1] == b"127.0.0.1"
