"""Supervised services: a service that fails is restarted with backoff, and says so meanwhile."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.services import RestartPolicy, ServiceHealth, Supervisor

FAST = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.05, healthy_after_s=3600)


class Flaky:
    """Fails ``failures`` times, then runs until cancelled."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise OSError(28, "No space left on device")
        self.running.set()
        await asyncio.Event().wait()


class Returns:
    name = "returns"

    def __init__(self) -> None:
        self.starts = 0

    async def run(self) -> None:
        self.starts += 1


async def wait_for(condition, what: str) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.005)


class TestSupervisor:
    async def test_a_failing_service_is_restarted_until_it_runs(self):
        """Each failure restarts the service; once it runs, it keeps running."""
        service = Flaky(failures=3)
        supervisor = Supervisor([service], policy=FAST)
        task = asyncio.create_task(supervisor.run())
        try:
            await asyncio.wait_for(service.running.wait(), 30)
            assert service.starts == 4
            (health,) = supervisor.health()
            assert health.restarts == 3
            assert health.state == "running"
            assert health.last_error is not None
            assert "No space left" in health.last_error
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_failing_service_is_reported_degraded_until_it_has_run_a_while(self):
        """A failure streak marks the agent degraded; a long enough clean run clears it."""
        now = [0.0]
        service = Flaky(failures=1)
        policy = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.01, healthy_after_s=30)
        supervisor = Supervisor([service], policy=policy, clock=lambda: now[0])
        task = asyncio.create_task(supervisor.run())
        try:
            await asyncio.wait_for(service.running.wait(), 30)
            assert supervisor.degraded == ["flaky"]  # restarted, not yet proven healthy
            now[0] += 31
            assert supervisor.degraded == []
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_a_service_that_returns_counts_as_failed(self):
        """A long-running service must never return: that is a failure, and it restarts."""
        service = Returns()
        supervisor = Supervisor([service], policy=FAST)
        task = asyncio.create_task(supervisor.run())
        try:
            await wait_for(lambda: service.starts >= 3, "restarts")
            (health,) = supervisor.health()
            assert "stopped on its own" in (health.last_error or "")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_metrics_follow_the_service(self):
        """edgelm_service_up is 0 while a service waits to restart; restarts are counted."""
        metrics = AgentMetrics()
        service = Flaky(failures=2)
        supervisor = Supervisor([service], policy=FAST, observer=metrics)
        task = asyncio.create_task(supervisor.run())
        try:
            await asyncio.wait_for(service.running.wait(), 30)
            text = metrics.exposition().decode()
            assert 'edgelm_service_up{service="flaky"} 1.0' in text
            assert 'edgelm_service_restarts_total{service="flaky"} 2.0' in text
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def test_cancelling_the_supervisor_stops_every_service(self):
        """One stop path: cancelling run() ends all services and raises nothing else."""
        services = [Flaky(failures=0), Flaky(failures=0)]
        services[1].name = "other"
        supervisor = Supervisor(list(services), policy=FAST)
        task = asyncio.create_task(supervisor.run())
        await asyncio.wait_for(services[0].running.wait(), 30)
        await asyncio.wait_for(services[1].running.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class TestRestartPolicy:
    @pytest.mark.parametrize("streak", [1, 2, 5, 20])
    def test_backoff_grows_within_its_bounds(self, streak):
        """The delay is jittered, at least the minimum and never past the cap."""
        policy = RestartPolicy(backoff_min_s=1, backoff_max_s=60)
        delays = [policy.delay_s(streak) for _ in range(200)]
        assert all(1 <= d <= min(60, 2 ** (streak - 1)) for d in delays)

    def test_health_view(self):
        """A health record says whether the service is healthy, for /readyz."""
        health = ServiceHealth("jobs", state="restarting", failure_streak=1, restarts=1)
        assert health.as_dict()["healthy"] is False
        assert ServiceHealth("jobs", state="running").healthy
