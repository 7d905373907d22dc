"""An in-process hub of fleet changes, for the server-sent-events stream.

The engine, the ingest path and remote jobs publish small change notices (``device``,
``rollout``, ``job``) after they commit; each SSE client subscribes and gets every notice
from then on. A client that falls ``queue_max`` notices behind is cut off (its stream ends
with an ``error`` event) rather than letting one slow reader hold memory for everyone; it
reconnects and reads the current state from the REST API.

Notices are hints, not the record: the store is. A replica only sees its own changes, so a
dashboard behind a load balancer should re-read state it cares about when a notice comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

KINDS = frozenset({"device", "rollout", "job"})


@dataclass(frozen=True)
class Notice:
    kind: str
    data: dict[str, Any]


class Lagging(Exception):  # ends one subscription; not an error of the control plane
    """The subscriber fell too far behind and was cut off."""


class Ended(Exception):  # ends one subscription; not an error of the control plane
    """The hub was closed: the server is stopping."""


class Subscription:
    def __init__(self, hub: FleetHub, queue_max: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[Notice | None] = asyncio.Queue(maxsize=queue_max)
        self.lagging = False
        self.ended = False

    def offer(self, notice: Notice) -> None:
        if self.lagging or self.ended:
            return
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self.lagging = True
            self._put_end()

    def end(self) -> None:
        """No more notices: the subscriber's next read after the queued ones returns None
        for good (``ended``)."""
        if not self.ended:
            self.ended = True
            self._put_end()

    def _put_end(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # make room for the end mark
        self._queue.put_nowait(None)

    async def next(self, timeout_s: float) -> Notice | None:
        """The next notice, or None after ``timeout_s`` (time for a heartbeat).

        Raises :class:`Lagging` once the subscriber was cut off, and :class:`Ended` once the
        hub was closed.
        """
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel
                notice = await self._queue.get()
        except TimeoutError:
            return None
        if notice is None:
            self._queue.put_nowait(None)  # keep the end mark for any later read
            if self.lagging:
                raise Lagging("the stream fell too far behind; reconnect and re-read the state")
            raise Ended("the control plane is stopping; reconnect in a moment")
        return notice

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hub._subscribers.discard(self)


class FleetHub:
    def __init__(self, queue_max: int = 1000) -> None:
        self._queue_max = queue_max
        self._subscribers: set[Subscription] = set()
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self._queue_max)
        self._subscribers.add(subscription)
        if self._closed:
            subscription.end()
        return subscription

    def close(self) -> None:
        """End every subscription (the server is stopping); later ones end at once."""
        self._closed = True
        for subscription in list(self._subscribers):
            subscription.end()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in KINDS:
            raise ValueError(f"a notice kind must be one of {sorted(KINDS)}, got {kind!r}")
        notice = Notice(kind, data)
        for subscription in list(self._subscribers):
            subscription.offer(notice)

    async def stream(self, timeout_s: float) -> AsyncIterator[Notice | None]:
        """Notices (None for a quiet ``timeout_s``) until cancelled or cut off."""
        async with self.subscribe() as subscription:
            while True:
                yield await subscription.next(timeout_s)
