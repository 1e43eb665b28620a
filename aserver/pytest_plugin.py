"""pytest plugin (registered as the `aserver` pytest11 entry point): a real server for a
service's tests in three lines.

    pytestmark = pytest.mark.aserver(handlers=["myservice.handlers"], workers=2)

    async def test_login(aserver_client):
        assert (await aserver_client.call(1, b"hi")).body == b"hi"

`aserver` (module scope) is the running ServerProcess, started from the marker's keyword
arguments (those of aserver.testing.ServerProcess); `aserver_client` is a connected
aserver.client.Client, closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from aserver.client import Client
from aserver.testing import ServerProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "aserver(**options): options for the `aserver` fixture's server (see aserver.testing.ServerProcess)"
    )


@pytest.fixture(scope="module")
def aserver(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    marker = request.node.get_closest_marker("aserver")
    options = dict(marker.kwargs) if marker else {}
    with ServerProcess(**options) as server:
        yield server


@pytest_asyncio.fixture
async def aserver_client(aserver: ServerProcess) -> AsyncIterator[Client]:
    client = await Client.connect(*aserver.address)
    try:
        yield client
    finally:
        await client.close()
