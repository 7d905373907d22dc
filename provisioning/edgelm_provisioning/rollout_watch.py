"""Following one rollout until it ends: the event stream, and polling when the stream drops.

The control plane's ``GET /api/v1/events`` says *that* something changed; the rollout object
(``GET /api/v1/rollouts/{id}``) says *what* it is now. So the watcher treats events as
prompts to re-read the rollout, never as state of their own, which keeps it right whatever
an event's body holds, and makes a missed event harmless:

* the rollout is read once at the start, and once more as soon as the stream is open (what
  happened in between is not in the stream);
* every event that may concern this rollout (its own ``rollout`` events, and ``device``
  events that name no other rollout) marks the view stale; a burst of events costs one read
  per ``min_interval_s``;
* with the stream up, the rollout is still re-read every ``safety_refresh_s``;
* if the stream cannot be opened, drops or goes silent, the watcher polls every
  ``poll_interval_s`` until the end;
* a read that fails for want of a connection is retried (up to ``max_read_failures`` in a
  row); any other error ends the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.errors import (
    ControlPlaneError,
    ControlProtocolError,
    ControlUnreachable,
)
from edgelm_provisioning.sse import ServerSentEvent


class FeedMode(StrEnum):
    CONNECTING = "connecting"
    STREAM = "stream"
    POLLING = "polling"


@dataclass(frozen=True)
class WatchSettings:
    poll_interval_s: float = 2.0
    safety_refresh_s: float = 15.0
    min_interval_s: float = 0.25
    max_read_failures: int = 5


Snapshot = dict[str, Any]
ShowSnapshot = Callable[[Snapshot, FeedMode], None]


def concerns(event: ServerSentEvent, rollout_id: str) -> bool:
    """Whether an event may change what rollout ``rollout_id`` looks like."""
    if event.event not in ("rollout", "device"):
        return False
    try:
        data = json.loads(event.data)
    except ValueError:
        return True  # cannot tell: re-reading costs one request
    if not isinstance(data, Mapping):
        return True
    named = data.get("rollout") or data.get("rollout_id")
    if event.event == "rollout":
        return rollout_id in (data.get("id"), named)
    return named in (None, rollout_id)


class RolloutWatcher:
    def __init__(
        self,
        client: ControlClient,
        rollout_id: str,
        show: ShowSnapshot,
        settings: WatchSettings | None = None,
    ) -> None:
        self.client = client
        self.rollout_id = rollout_id
        self.show = show
        self.settings = settings or WatchSettings()
        self.mode = FeedMode.CONNECTING
        self._stale = asyncio.Event()

    async def run(self, done: Callable[[Snapshot], bool]) -> Snapshot:
        """Show every new snapshot; return the first one ``done`` accepts."""
        snapshot = await self._read()
        self.show(snapshot, self.mode)
        if done(snapshot):
            return snapshot
        follower = asyncio.create_task(self._follow_stream())
        try:
            while True:
                wait_s = (
                    self.settings.poll_interval_s
                    if self.mode is FeedMode.POLLING
                    else self.settings.safety_refresh_s
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):  # not wait_for: it can swallow a cancel
                        await self._stale.wait()
                self._stale.clear()
                snapshot = await self._read()
                self.show(snapshot, self.mode)
                if done(snapshot):
                    return snapshot
                await asyncio.sleep(self.settings.min_interval_s)  # lets a burst coalesce
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _follow_stream(self) -> None:
        def opened() -> None:
            self.mode = FeedMode.STREAM
            self._stale.set()

        try:
            async for event in self.client.events(on_open=opened):
                if concerns(event, self.rollout_id):
                    self._stale.set()
        except ControlPlaneError:
            pass  # not there, dropped or silent: polling takes over
        self.mode = FeedMode.POLLING
        self._stale.set()

    async def _read(self) -> Snapshot:
        failures = 0
        while True:
            try:
                snapshot = await self.client.get(f"/rollouts/{self.rollout_id}")
            except ControlUnreachable:
                failures += 1
                if failures >= self.settings.max_read_failures:
                    raise
                await asyncio.sleep(self.settings.poll_interval_s)
                continue
            if not isinstance(snapshot, dict):
                raise ControlProtocolError(
                    "the rollout came back as something other than an object",
                    url=self.client.url(f"/rollouts/{self.rollout_id}"),
                )
            return snapshot
