"""Hand items from a worker thread to the event loop, in batches.

The loop is woken only when its consumer is waiting. Items that arrive while it is busy (writing
the previous token to a socket, say) are picked up with the next batch at no extra cost. On a
2-core device every wake-up of the loop thread takes CPU from the runtime's own threads, so
fewer wake-ups is more tokens per second.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventPipe(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        """From any thread."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def take(self) -> list[T]:
        """From the loop: every item put since the last call, waiting for at least one."""
        with self._lock:
            if not self._items:
                self._waiter = self._loop.create_future()
            waiter = self._waiter
        if waiter is not None:
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None
        with self._lock:
            items, self._items = self._items, []
        return items
