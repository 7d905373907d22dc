"""The fleet link as the rest of the control plane sees it: a port, so tests can fake it.

The director, the rollout engine, remote jobs and the repository publish through
:class:`FleetPublisher`; the MQTT adapter (:class:`~edgelm_control.fleet.link.FleetLink`)
implements it. A publish returns once the broker has taken the message (PUBACK) and raises
an :class:`~edgelm_protocol.mqtt.MqttError` otherwise; callers keep what they could not
publish in the store and try again (on the next connection, or the next round).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from edgelm_protocol import Topic


class FleetPublisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def publish(self, topic: Topic, payload: bytes, *, retain: bool) -> None:
        """Publish at QoS 1; return on PUBACK."""
        ...


PUBLISH_CONCURRENCY = 64


async def bounded_gather(
    calls: Sequence[Coroutine[Any, Any, bool]], *, limit: int = PUBLISH_CONCURRENCY
) -> list[bool]:
    """Run publishes concurrently, at most ``limit`` at a time (each waits for a PUBACK, so
    a wave of 1,000 devices goes out in a few round trips rather than 1,000)."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Coroutine[Any, Any, bool]) -> bool:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))
