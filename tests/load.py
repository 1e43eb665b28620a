"""A verifying pipelined load for lifecycle tests: every request must come back either
correct or as a documented error; nothing may go missing."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from aserver import Status
from aserver.client import Client


@dataclass
class LoadResult:
    ok: int = 0
    worker_lost: int = 0
    wrong: list = field(default_factory=list)
    disconnects: int = 0
    timeouts: int = 0
    bodies: set = field(default_factory=set)  # distinct reply body prefixes seen


class Load:
    def __init__(self, address: tuple[str, int], clients: int = 8, depth: int = 16, cmd_id: int = 1,
                 reconnect: bool = False, prefix_len: int = 0, body_size: int = 0) -> None:
        self.address = address
        self.clients = clients
        self.depth = depth
        self.cmd_id = cmd_id
        self.reconnect = reconnect
        self.prefix_len = prefix_len  # reply = prefix + request body (reload test)
        self.body_size = body_size  # bodies padded to this size (0: as short as they come)
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._counter = itertools.count()

    def start(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._run(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> LoadResult:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.result

    async def _run(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                client = await Client.connect(*self.address)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            try:
                while not self._stop.is_set():
                    await self._batch(client, index)
            except ConnectionError:
                self.result.disconnects += 1
                if not self.reconnect:
                    return
            finally:
                await client.close()

    async def _batch(self, client: Client, index: int) -> None:
        bodies = [f"{index}:{next(self._counter)}:".encode() for _ in range(self.depth)]
        if self.body_size:  # each its own bytes throughout, so a reply of reused memory shows
            bodies = [(body * (self.body_size // len(body) + 1))[: self.body_size] for body in bodies]
        try:
            replies = await client.call_many([(self.cmd_id, b, index) for b in bodies], timeout=15)
        except TimeoutError:
            self.result.timeouts += 1
            raise ConnectionError("timed out") from None
        for body, reply in zip(bodies, replies, strict=True):
            if reply.status_code == Status.WORKER_LOST:
                self.result.worker_lost += 1
            elif reply.status_code == 0 and reply.body[self.prefix_len :] == body and reply.user_id == index:
                self.result.ok += 1
                self.result.bodies.add(reply.body[: self.prefix_len])
            else:
                self.result.wrong.append((body, reply))
