"""Keeps perf/ working: a tiny benchmark against both real servers. No timing asserts."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))

import bench
import loadgen


@pytest.mark.parametrize("server_name", ["reference", "aserver"])
def test_bench_run_verifies_every_reply(server_name: str, tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(bench.SETTINGS_TOML.format(workers=1))
    opts = bench.Options(duration=0.4, warmup=0.1, connections=4, depths=[4], body=64, quiet_wait=0)
    result = bench.run_one(server_name, 4, opts, settings)
    assert result["requests"] > 0
    assert result["errors"] == 0, result["error_samples"]


def test_loadgen_two_processes_and_summary(tmp_path: Path) -> None:
    port = bench.free_port()
    with bench.reference_server(port):
        cfg = loadgen.LoadConfig(port=port, connections=4, depth=2, body=100, duration=0.3,
                                 warmup=0.1, processes=2)
        result = loadgen.run(cfg)
    assert result["requests"] > 0
    assert result["errors"] == 0, result["error_samples"]
    assert "req/s" in loadgen.format_result(result)


def test_loadgen_counts_bad_replies() -> None:
    """A reply differing from its request in one field is counted and described."""
    ring, count = loadgen.build_ring(1, 5, 8, 2, loadgen.random.Random(1))
    pkt = loadgen.HEADER_SIZE + 8
    assert count >= 4 and len(ring) == count * pkt
    bad = bytearray(ring[:pkt])
    bad[10] = 3  # status_code 3
    assert "status 3 != 0" in loadgen.describe_mismatch(bytes(bad), ring[:pkt])
    assert loadgen.ring_slice(ring, len(ring) - 2, 4) == ring[-2:] + ring[:2]


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


async def test_load_protocol_verifies_stream() -> None:
    """Good replies (in any split) pipeline new requests; a reordered pair is two errors."""
    ring, _ = loadgen.build_ring(1, 5, 8, 2, loadgen.random.Random(2))
    pkt = loadgen.HEADER_SIZE + 8
    stats = loadgen.Stats()
    proto = loadgen.LoadProtocol(ring, pkt, 2, stats, asyncio.get_running_loop().create_future())
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written == [ring[: 2 * pkt]]
    proto.data_received(ring[:5])
    proto.data_received(ring[5:pkt])
    assert proto.completed == 1 and transport.written[-1] == ring[2 * pkt : 3 * pkt]
    proto.data_received(ring[2 * pkt : 3 * pkt] + ring[pkt : 2 * pkt])  # replies swapped
    assert stats.errors == 2 and transport.closed
    assert "seq_num" in stats.error_samples[0]
