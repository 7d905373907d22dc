"""Long-running parts run supervised: a failure is logged and the part restarts with backoff.

A service is a name and an ``async`` function that runs until cancelled. If it raises (or
returns), the supervisor logs why, marks it down in ``/metrics``, waits an exponential
backoff with jitter and starts it again: a fault that persists costs a log line per backoff
rather than a hot loop, and one that passes heals without a restart of the process. All
services run in one :class:`asyncio.TaskGroup`, started and stopped on one path.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from edgelm_control.metrics import ControlMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Service:
    name: str
    run: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    min_s: float = 0.5
    max_s: float = 30.0

    def delay_s(self, failures: int) -> float:
        ceiling = min(self.max_s, self.min_s * 2 ** max(0, failures - 1))
        return random.uniform(self.min_s, max(self.min_s, ceiling))


class Supervisor:
    def __init__(
        self, services: list[Service], metrics: ControlMetrics, backoff: Backoff | None = None
    ) -> None:
        self._services = services
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self.failing: set[str] = set()

    async def run(self) -> None:
        """Run every service until cancelled."""
        async with asyncio.TaskGroup() as group:
            for service in self._services:
                group.create_task(self._supervise(service), name=f"service-{service.name}")

    async def _supervise(self, service: Service) -> None:
        failures = 0
        up = self._metrics.service_up.labels(service.name)
        while True:
            up.set(1)
            self.failing.discard(service.name)
            try:
                await service.run()
                raise RuntimeError(f"{service.name} stopped on its own")
            except asyncio.CancelledError:
                up.set(0)
                raise
            except Exception as exc:  # one service's fault: restart it, never spread
                failures += 1
                up.set(0)
                self.failing.add(service.name)
                delay_s = self._backoff.delay_s(failures)
                log.error(
                    "service_failed",
                    service=service.name,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    failures=failures,
                    retry_in_s=round(delay_s, 2),
                    exc_info=exc,
                )
            await asyncio.sleep(delay_s)
