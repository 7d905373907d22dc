"""Long-running parts of the agent (the job worker, fleet sync) run as supervised services.

A service is an object with a ``name`` and an ``async run()`` that runs until it is cancelled.
If ``run()`` raises, or returns, the supervisor logs why, counts it, and starts it again after
an exponential backoff with jitter, so a fault that persists (a full disk, a database that
cannot be written) costs a log line per backoff rather than a hot loop, and a fault that passes
heals without anyone restarting the agent. While a service is failing, the agent says so: it is
``degraded`` in ``/readyz`` and ``edgelm_service_up`` is 0 in ``/metrics``. Never silence.

Every service runs in one :class:`asyncio.TaskGroup`, started and stopped on one path: the
daemon cancels :meth:`Supervisor.run` at shutdown, whatever the services were doing, and
nothing a service raised can turn a clean shutdown into a crash.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

log = structlog.get_logger(__name__)

ServiceState = Literal["starting", "running", "restarting"]


class Service(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self) -> None:
        """Do the service's work until cancelled. Raising (or returning) means it failed."""
        ...


class ServiceReturned(Exception):  # a reason, logged; not an error for callers
    """A service's ``run()`` returned, which a long-running service must never do."""


@dataclass
class ServiceHealth:
    name: str
    state: ServiceState = "starting"
    restarts: int = 0
    #: Failures since the service last ran for ``healthy_after_s`` without failing.
    failure_streak: int = 0
    last_error: str | None = None
    running_since: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state != "restarting" and self.failure_streak == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "healthy": self.healthy,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class RestartPolicy:
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    #: A service that has run this long without failing is healthy again.
    healthy_after_s: float = 30.0

    def delay_s(self, streak: int) -> float:
        """Exponential backoff with full jitter: spreads restarts of several agents (and of
        several services) instead of synchronising them."""
        ceiling = min(self.backoff_max_s, self.backoff_min_s * 2 ** max(0, streak - 1))
        return random.uniform(self.backoff_min_s, max(self.backoff_min_s, ceiling))


class ServiceObserver(Protocol):
    def service_up(self, name: str, up: bool) -> None: ...
    def service_restarted(self, name: str) -> None: ...


class Supervisor:
    def __init__(
        self,
        services: list[Service],
        *,
        policy: RestartPolicy | None = None,
        observer: ServiceObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._services = services
        self._policy = policy or RestartPolicy()
        self._observer = observer
        self._clock = clock
        self._health = {s.name: ServiceHealth(s.name) for s in services}

    def health(self) -> list[ServiceHealth]:
        now = self._clock()
        for h in self._health.values():
            settled = h.running_since is not None and now - h.running_since
            if h.state == "running" and settled and settled >= self._policy.healthy_after_s:
                h.failure_streak = 0
        return list(self._health.values())

    @property
    def degraded(self) -> list[str]:
        """Names of the services that are failing now."""
        return [h.name for h in self.health() if not h.healthy]

    async def run(self) -> None:
        """Run every service until cancelled."""
        async with asyncio.TaskGroup() as group:
            for service in self._services:
                group.create_task(self._supervise(service), name=f"service-{service.name}")

    async def _supervise(self, service: Service) -> None:
        health = self._health[service.name]
        while True:
            health.state = "running"
            health.running_since = self._clock()
            self._notify_up(service.name, True)
            try:
                await service.run()
                raise ServiceReturned(f"{service.name} stopped on its own")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any fault of one service: restart it, never spread
                self._failed(health, exc)
            await asyncio.sleep(self._policy.delay_s(health.failure_streak))

    def _failed(self, health: ServiceHealth, exc: Exception) -> None:
        ran_s = self._clock() - (health.running_since or self._clock())
        if ran_s >= self._policy.healthy_after_s:
            health.failure_streak = 0
        health.failure_streak += 1
        health.restarts += 1
        health.state = "restarting"
        health.running_since = None
        health.last_error = f"{type(exc).__name__}: {exc}"
        self._notify_up(health.name, False)
        if self._observer is not None:
            self._observer.service_restarted(health.name)
        log.error(
            "service_failed",
            service=health.name,
            error=health.last_error,
            failure_streak=health.failure_streak,
            exc_info=exc,
        )

    def _notify_up(self, name: str, up: bool) -> None:
        if self._observer is not None:
            self._observer.service_up(name, up)
