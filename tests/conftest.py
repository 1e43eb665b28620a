import os
from pathlib import Path

import pytest

from aserver.testing import ServerProcess

TESTS_DIR = str(Path(__file__).parent)
MAX_PACKET = 64 * 1024


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("events")


@pytest.fixture(scope="module")
def server(events_dir: Path):
    """Two workers running the probe service."""
    with ServerProcess(
        handlers=["probe_service"],
        workers=2,
        settings={"server": {"max_packet_size": MAX_PACKET}, "ring": {"size": 1024 * 1024}},
        pythonpath=[TESTS_DIR],
        env={"PROBE_EVENTS_DIR": str(events_dir)},
    ) as running:
        yield running
    os.environ.pop("PROBE_EVENTS_DIR", None)
