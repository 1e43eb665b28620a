"""The queue of connections with work, shared by a worker's consumer tasks.

asyncio.Queue looks up the running loop on every get(), and on CPython 3.11 that costs a
getpid() system call: one per request at low pipelining. This one is bound to its loop
once and does only what the consumers need.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadyQueue(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[T] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled consumer left it behind
                waiter.set_result(None)
                return

    async def get(self) -> T:
        items = self._items
        while not items:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter
        return items.popleft()
