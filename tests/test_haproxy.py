"""Scale-out behind a real HAProxy: two aserver instances with PROXY protocol v2 and
health checks behind one TCP frontend. Handlers must see the real client address; when
one instance stops, clients reconnecting through HAProxy are served by the other.

HAProxy comes from the OS packages (.ci/run installs it). Without it this test fails:
the deployment it checks is the documented way to outgrow one machine.
"""

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from netclient import connect_from, local_port

from aserver.testing import ServerProcess

from conftest import TESTS_DIR
from probe_service import ECHO, PEER, WHO

CLIENT_IP = "127.0.0.3"  # not HAProxy's own address, so a leak of the proxy's address shows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_config(frontend: int, backends: list[int]) -> str:
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{port} send-proxy-v2 check inter 200ms fall 2 rise 1"
        for i, port in enumerate(backends, start=1)
    )
    return f"""global
    maxconn 2000

defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1

frontend fe
    bind 127.0.0.1:{frontend}
    default_backend be

backend be
    balance roundrobin
{servers}
"""


def start_haproxy(config: Path) -> subprocess.Popen:
    binary = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if binary is None:
        pytest.fail("haproxy is not installed: `apt-get install -y haproxy` (.ci/run installs it before the tests)")
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"haproxy rejected its config:\n{check.stdout}{check.stderr}"
    return subprocess.Popen([binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                            stderr=(config.parent / "haproxy.log").open("w"))


async def wait_until_serving(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = await connect_from(("127.0.0.1", port), CLIENT_IP)
            try:
                await client.call(ECHO, b"up?", timeout=1)
                return
            finally:
                await client.close()
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def session(port: int, calls: int) -> tuple[int, str]:
    """One client through HAProxy: pipelined echoes, then the peer check. Returns (pid
    of the worker that served it, the peer its handler saw)."""
    client = await connect_from(("127.0.0.1", port), CLIENT_IP)
    try:
        bodies = [b"load %d" % i for i in range(calls)]
        replies = await client.call_many([(ECHO, body, 0) for body in bodies], timeout=10)
        assert [r.body for r in replies] == bodies
        who = int((await client.call(WHO, timeout=5)).body.split()[0])
        seen = (await client.call(PEER, timeout=5)).body.decode()
        assert seen == f"{CLIENT_IP} {local_port(client)}", "the handler must see the client's own address"
        return who, seen
    finally:
        await client.close()


async def test_two_instances_behind_haproxy(tmp_path: Path) -> None:
    settings = {"proxy_protocol": {"enabled": True, "trusted": ["127.0.0.1/32"]}}
    instances = [
        ServerProcess(handlers=["probe_service"], workers=1, settings=settings, pythonpath=[TESTS_DIR]).start()
        for _ in range(2)
    ]
    haproxy = None
    try:
        worker_of = {}
        for n, instance in enumerate(instances):
            for pid in instance.child_pids("worker").values():
                worker_of[pid] = n
        frontend = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(frontend, [instance.address[1] for instance in instances]))
        haproxy = start_haproxy(config)
        await wait_until_serving(frontend)

        # Load through HAProxy: 40 concurrent clients, 50 pipelined requests each.
        results = await asyncio.gather(*(session(frontend, 50) for _ in range(40)))
        served = [worker_of[who] for who, _ in results]
        assert set(served) == {0, 1}, f"round robin should reach both instances: {served}"

        # Stop instance 0; clients reconnecting through HAProxy land on instance 1.
        await asyncio.to_thread(instances[0].stop)
        results = await asyncio.gather(*(session(frontend, 20) for _ in range(20)))
        assert {worker_of[who] for who, _ in results} == {1}
        # Once the health checks mark it down, no connection even tries it.
        await asyncio.sleep(0.6)
        results = await asyncio.gather(*(session(frontend, 20) for _ in range(10)))
        assert {worker_of[who] for who, _ in results} == {1}
        assert haproxy.poll() is None, (tmp_path / "haproxy.log").read_text()
    finally:
        if haproxy is not None:
            haproxy.terminate()
            try:
                haproxy.wait(5)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait()
        for instance in instances:
            instance.stop()
