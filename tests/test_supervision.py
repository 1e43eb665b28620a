"""Crash recovery, several conn processes, hung workers, reload, graceful stop, operations."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from load import Load, LoadResult

from aserver import Status
from aserver.client import Client
from aserver.testing import ServerProcess

from probe_service import CRASH, ECHO, HANG, HANG_SYNC

TESTS_DIR = str(Path(__file__).parent)


def _probe_server(**kwargs) -> ServerProcess:
    kwargs.setdefault("handlers", ["probe_service"])
    kwargs.setdefault("pythonpath", [TESTS_DIR])
    return ServerProcess(**kwargs)


async def _served_within(server: ServerProcess, seconds: float) -> float:
    """Time until a fresh client gets a correct echo (fails after `seconds`)."""
    start = time.monotonic()
    while True:
        try:
            async with await Client.connect(*server.address) as client:
                if (await client.call(ECHO, b"back?", timeout=1)).body == b"back?":
                    return time.monotonic() - start
        except (OSError, TimeoutError):
            pass
        assert time.monotonic() - start < seconds, server.log_text()
        await asyncio.sleep(0.02)


async def _kill_worker_0_under(server: ServerProcess, load: Load) -> LoadResult:
    """Kill worker 0 half a second into `load`; its result once the worker is back."""
    load.start()
    await asyncio.sleep(0.5)
    workers = server.child_pids("worker")
    os.kill(workers[0], signal.SIGKILL)
    server.wait_for_children("worker", 2, exclude={workers[0]})
    assert await _served_within(server, 2.0) < 2.0
    await asyncio.sleep(0.5)
    result = await load.stop()
    server.wait_for_log(r"worker 0 \(pid \d+\) was killed by SIGKILL")
    server.wait_for_log(r"worker 0 is back")
    return result


async def test_worker_killed_under_load_loses_nothing() -> None:
    with _probe_server(workers=2) as server:
        result = await _kill_worker_0_under(server, Load(server.address, clients=12, depth=16))
    assert result.wrong == []
    assert result.disconnects == 0 and result.timeouts == 0
    assert result.ok > 1000


async def test_worker_killed_while_replies_refer_to_its_requests_loses_nothing() -> None:
    """The shipped echo (zero_copy) with 16 KiB bodies: replies go by reference to the
    request ring, whose room the conn process frees only after sending them. A worker
    killed in the middle: every reply is still its own request's bytes, or WORKER_LOST."""
    with ServerProcess(workers=2, settings={"ring": {"size": 1024 * 1024},
                                            "server": {"max_packet_size": 64 * 1024}}) as server:
        result = await _kill_worker_0_under(server, Load(server.address, clients=12, depth=8, body_size=16384))
    assert result.wrong == []
    assert result.disconnects == 0 and result.timeouts == 0
    assert result.ok > 500


async def test_killing_one_conn_process_closes_only_its_clients(tmp_path: Path) -> None:
    with _probe_server(workers=2, settings={"server": {"conn_processes": 2}},
                       env={"PROBE_EVENTS_DIR": str(tmp_path)}) as server:
        conns = server.wait_for_children("conn", 2)
        clients = [await Client.connect(*server.address) for _ in range(40)]
        for client in clients:
            assert (await client.call(ECHO, b"hi", timeout=5)).body == b"hi"
        os.kill(conns[0], signal.SIGKILL)
        await asyncio.sleep(0.5)
        closed = [c for c in clients if c.closed]
        alive = [c for c in clients if not c.closed]
        assert closed and alive  # the kernel spread the clients over both processes
        for client in alive:
            assert (await client.call(ECHO, b"still", timeout=5)).body == b"still"
        # Each worker ran on_disconnect for exactly the dead process's clients.
        closed_ports = {str(c._transport.get_extra_info("sockname")[1]) for c in closed}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            per_worker = [
                {line.split()[3] for line in f.read_text().splitlines() if line.startswith("disconnect")}
                for f in tmp_path.glob("*.log")
            ]
            if len(per_worker) == 2 and all(ports == closed_ports for ports in per_worker):
                break
            await asyncio.sleep(0.05)
        assert per_worker == [closed_ports, closed_ports]
        server.wait_for_children("conn", 2, exclude={conns[0]})
        server.wait_for_log(r"conn 0 is back")
        for _ in range(10):  # new connections are accepted (by either process)
            async with await Client.connect(*server.address) as late:
                assert (await late.call(ECHO, b"new", timeout=5)).body == b"new"
        for client in alive:
            await client.close()


@pytest.mark.parametrize("hang", [HANG, HANG_SYNC], ids=["async", "sync"])
async def test_hung_worker_is_killed_and_replaced(hang: int) -> None:
    settings = {"supervisor": {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}}
    with _probe_server(settings=settings) as server:
        worker = server.child_pids("worker")[0]
        async with await Client.connect(*server.address) as client:
            reply = await client.call(hang, b"", timeout=10)
            assert reply.status_code == Status.WORKER_LOST
            assert (await client.call(ECHO, b"after", timeout=10)).body == b"after"
        assert worker not in server.child_pids("worker").values()
        server.wait_for_log(r"worker 0 \(pid \d+\) did not answer heartbeats")


async def test_a_request_that_kills_its_worker_is_answered_and_never_run_again(tmp_path: Path) -> None:
    """A sync handler runs inside its ring batch. If it kills the worker, the batch counts
    as taken: WORKER_LOST for it, never a replay to the replacement (which would run it
    again, and again, until the crash-loop guard stopped the whole server)."""
    settings = {"supervisor": {"max_restarts": 3, "restart_window": 60}}
    with _probe_server(settings=settings, env={"PROBE_EVENTS_DIR": str(tmp_path)}) as server:
        clients = [await Client.connect(*server.address) for _ in range(20)]
        try:
            for client in clients:  # every connection opened in the first worker
                assert (await client.call(ECHO, b"hi", timeout=5)).body == b"hi"
            reply = await clients[0].call(CRASH, b"", timeout=10)
            assert reply.status_code == Status.WORKER_LOST
            server.wait_for_log(r"worker 0 is back")
            for client in clients:
                assert (await client.call(ECHO, b"after", timeout=10)).body == b"after"
        finally:
            for client in clients:
                await client.close()
        crashes = [line for f in tmp_path.glob("*.log") for line in f.read_text().splitlines()
                   if line.startswith("crash")]
        assert len(crashes) == 1
        assert server.process.poll() is None


def test_crash_loop_stops_the_server() -> None:
    settings = {"supervisor": {"max_restarts": 2, "restart_window": 60}}
    server = _probe_server(settings=settings, env={"PROBE_CRASH_AFTER": "0.3"}).start()
    try:
        server.process.wait(30)
    finally:
        code = server.stop()
    assert code == 1
    assert "crash loop, stopping the server" in server.log_text()


def test_second_instance_is_refused(tmp_path: Path) -> None:
    pid_file = str(tmp_path / "one.pid")
    with ServerProcess(settings={"supervisor": {"pid_file": pid_file}}) as first:
        second = ServerProcess(settings={"supervisor": {"pid_file": pid_file}})
        with pytest.raises(RuntimeError):
            second.start()
        assert f"already running, pid {first.pid}" in second.log_text()
        assert second.process.returncode == 1
        assert Path(pid_file).read_text().strip() == str(first.pid)
    assert not Path(pid_file).exists()


def test_status_stop_and_exit_hook(tmp_path: Path) -> None:
    settings_path = tmp_path / "settings.toml"
    pid_file = tmp_path / "s.pid"
    settings_path.write_text(
        f'[server]\nbind = "127.0.0.1:0"\nname = "st"\n[workers]\ncount = 2\n'
        f'[supervisor]\npid_file = "{pid_file}"\non_child_exit = "probe_service:child_exited"\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.getcwd()]),
               PROBE_EVENTS_DIR=str(tmp_path))
    server = subprocess.Popen([sys.executable, "-m", "aserver", "--settings", str(settings_path)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if "aserver ready" in line:
                break
        cli = [sys.executable, "-m", "aserver"]
        status = subprocess.run([*cli, "status", "--settings", str(settings_path)], env=env,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith(f"aserver[st] supervisor pid {server.pid}")
        assert lines[2].split()[:3] == ["role", "index", "pid"]
        roles = sorted(line.split()[0] + line.split()[1] for line in lines[3:])
        assert roles == ["conn0", "worker0", "worker1"]
        stop = subprocess.run([*cli, "stop", "--settings", str(settings_path)], env=env,
                              capture_output=True, text=True, timeout=30)
        assert stop.returncode == 0 and f"pid {server.pid}" in stop.stdout
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    exits = sorted((tmp_path / "exits.log").read_text().split("\n")[:-1])
    assert [line.split()[:2] for line in exits] == [["conn", "0"], ["worker", "0"], ["worker", "1"]]
    missing = subprocess.run([sys.executable, "-m", "aserver", "status", "--settings", str(settings_path)],
                             env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "not running" in missing.stderr


async def test_sigterm_under_load_answers_everything_received() -> None:
    with _probe_server(workers=2) as server:
        load = Load(server.address, clients=10, depth=16).start()
        await asyncio.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.process.wait, 30)
        result = await load.stop()
        assert server.process.returncode == 0, server.log_text()
        # A call either came back correct, or its connection was closed before the
        # server read it; nothing came back wrong and nothing was left unanswered.
        assert result.wrong == [] and result.worker_lost == 0 and result.timeouts == 0
        assert result.ok > 500
        assert "unanswered" not in server.log_text()


RELOADABLE = '''
from aserver import App, Request
app = App()

@app.handler(1)
async def echo(request: Request) -> bytes:
    return b"VERSION" + request.body
'''


async def test_reload_under_load_drops_nothing_and_runs_new_code(tmp_path: Path) -> None:
    (tmp_path / "reloadable.py").write_text(RELOADABLE.replace("VERSION", "v1:"))
    with ServerProcess(handlers=["reloadable"], workers=2, pythonpath=[str(tmp_path)]) as server:
        load = Load(server.address, clients=8, depth=16, prefix_len=3).start()
        await asyncio.sleep(0.5)
        (tmp_path / "reloadable.py").write_text(RELOADABLE.replace("VERSION", "v2:"))
        server.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(server.wait_for_log, r"reload complete", 30)
        await asyncio.sleep(0.3)
        before = load.result.ok
        await asyncio.sleep(0.3)
        result = await load.stop()
        assert result.wrong == [] and result.worker_lost == 0
        assert result.disconnects == 0 and result.timeouts == 0, server.log_text()
        assert result.bodies == {b"v1:", b"v2:"}
        assert result.ok > before
        async with await Client.connect(*server.address) as client:
            assert (await client.call(ECHO, b"x", timeout=5)).body == b"v2:x"


async def test_reload_with_broken_code_keeps_the_old_workers(tmp_path: Path) -> None:
    (tmp_path / "reloadable.py").write_text(RELOADABLE.replace("VERSION", "v1:"))
    with ServerProcess(handlers=["reloadable"], pythonpath=[str(tmp_path)]) as server:
        (tmp_path / "reloadable.py").write_text("this is not python(")
        server.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(server.wait_for_log, r"reload failed, keeping the running workers", 30)
        async with await Client.connect(*server.address) as client:
            assert (await client.call(ECHO, b"x", timeout=5)).body == b"v1:x"
        settings = server.settings_path.read_text().replace("[workers]", '[workers]\nbogus = 1')
        server.settings_path.write_text(settings)
        server.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(server.wait_for_log, r"reload refused.*workers.bogus: unknown key", 30)


def test_sigterm_to_the_process_group_is_one_graceful_stop(tmp_path: Path) -> None:
    """timeout(1) and `kill -TERM -PGID` signal the supervisor and its children at once:
    that is one stop request, answered gracefully, not a "second signal"."""
    settings_path = tmp_path / "settings.toml"
    settings_path.write_text(f'[server]\nbind = "127.0.0.1:0"\n[supervisor]\npid_file = "{tmp_path}/g.pid"\n')
    server = subprocess.Popen([sys.executable, "-m", "aserver", "--settings", str(settings_path)],
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = []
    for line in server.stderr:
        log.append(line)
        if "aserver ready" in line:
            break
    os.killpg(server.pid, signal.SIGTERM)
    log += server.stderr.readlines()
    assert server.wait(30) == 0, "".join(log)
    assert "stopping at once" not in "".join(log)


async def test_a_worker_restarted_after_a_reload_serves() -> None:
    with _probe_server() as server:
        server.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(server.wait_for_log, r"reload complete", 30)
        os.kill(server.child_pids("worker")[0], signal.SIGKILL)
        await asyncio.to_thread(server.wait_for_log, r"worker 0 is back", 30)
        async with await Client.connect(*server.address) as client:
            assert (await client.call(ECHO, b"after", timeout=5)).body == b"after"


async def test_a_worker_killed_during_a_reload_leaves_one_consumer() -> None:
    with _probe_server() as server:
        old = server.child_pids("worker")[0]
        server.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.05)
        os.kill(old, signal.SIGKILL)
        await asyncio.to_thread(server.wait_for_log, r"reload complete", 30)
        await asyncio.sleep(0.5)
        assert len(server.child_pids("worker")) == 1
        load = Load(server.address, clients=4, depth=16).start()
        await asyncio.sleep(1.0)
        result = await load.stop()
        assert result.wrong == [] and result.timeouts == 0 and result.ok > 100


async def test_restarts_survive_the_death_of_aiomultiprocess_manager() -> None:
    with _probe_server() as server:
        known = set(server.child_pids("worker").values()) | set(server.child_pids("conn").values())
        # The other children: aiomultiprocess's manager and multiprocessing's resource tracker.
        manager = [pid for pid in server.children() if pid not in known
                   and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(manager) == 1
        os.kill(manager[0], signal.SIGKILL)
        os.kill(server.child_pids("worker")[0], signal.SIGKILL)
        await asyncio.to_thread(server.wait_for_log, r"worker 0 is back", 30)
        assert "manager process is gone" in server.log_text()
        async with await Client.connect(*server.address) as client:
            assert (await client.call(ECHO, b"alive", timeout=5)).body == b"alive"
