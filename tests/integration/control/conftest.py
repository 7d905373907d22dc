"""Fixtures for the control plane's integration tests: databases, a fleet, a running control
plane (in this process, on a real Mosquitto), simulated devices and an HTTP client.

Every store test runs twice, on SQLite (a file in ``tmp_path``) and on PostgreSQL (the
server on 127.0.0.1:5432: each test creates a database with a unique name and drops it,
and never touches another database).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest

from edgelm_control.clock import Clock, ManualClock, SystemClock
from edgelm_control.service import ControlService
from edgelm_control.store import Store
from tests.integration.control.fleet import Fleet, make_fleet
from tests.integration.control.simdevice import Behaviour, SimDevice

if TYPE_CHECKING:
    from tests.mosquitto import Mosquitto


PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
DEADLINE_S = 60.0  # a safety net for slow machines, never a measurement


async def until(
    condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = DEADLINE_S
) -> None:
    """Wait until ``condition`` holds (polling); fail the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    name = f"edgelm_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(database="postgres", **PG)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        admin = await asyncpg.connect(database="postgres", **PG)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        async with postgres_database() as url:
            yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    yield opened
    await opened.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "fleet")


@dataclass
class Running:
    """A control plane running in this process."""

    service: ControlService
    task: asyncio.Task[None]
    fleet: Fleet
    clock: Clock
    http: aiohttp.ClientSession
    port: int
    devices: list[SimDevice] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.service.info is not None
        return f"http://127.0.0.1:{self.service.info.http_port}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.fleet.token}"}

    async def call(
        self, method: str, path: str, *, json: Any = None, auth: bool = True, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = self.auth() if auth else {}
        headers |= kwargs.pop("headers", {})
        async with self.http.request(
            method, self.url + path, json=json, headers=headers, **kwargs
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, DEADLINE_S)

    async def device(self, device_id: str, **kwargs: Any) -> SimDevice:
        """A simulated device of this fleet, started and online."""
        device = SimDevice(
            self.fleet.name, device_id, self.port, self.fleet.director_keys(), **kwargs
        )
        self.devices.append(device)
        return await device.start()

    async def step(self) -> None:
        """One pass of the rollout engine, now."""
        assert self.service.driver is not None
        await self.service.driver.step()

    async def wait_rollout(
        self, rollout_id: str, check: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal found
            status, found = await self.call("GET", f"/api/v1/rollouts/{rollout_id}")
            assert status == 200, found
            return check(found)

        await until(done)
        return found


def states(rollout: dict[str, Any]) -> dict[str, str]:
    return {row["id"]: row["state"] for row in rollout["devices"]}


StartControl = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_control(fleet: Fleet, mosquitto: Mosquitto) -> AsyncIterator[StartControl]:
    """Start control planes for one test (keyword arguments override control.toml keys;
    ``clock`` injects a clock); every one is stopped, and its devices too, afterwards."""
    running: list[Running] = []
    session = aiohttp.ClientSession()

    async def start(*, clock: Clock | None = None, **overrides: Any) -> Running:
        overrides.setdefault("broker_url", f"mqtt://127.0.0.1:{mosquitto.port}")
        config = fleet.config(**overrides)
        chosen = clock or SystemClock()
        service = ControlService(config, clock=chosen)
        task = asyncio.get_running_loop().create_task(service.run())
        ready = asyncio.ensure_future(service.ready.wait())
        await asyncio.wait({task, ready}, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # raises what stopped it
        assert service.info is not None, "the control plane did not get ready"
        assert service.link is not None
        await service.link.wait_connected()
        handle = Running(service, task, fleet, chosen, session, mosquitto.port)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for device in handle.devices:
            await device.stop()
        if not handle.task.done():
            await handle.stop()
    await session.close()


def manual_clock() -> ManualClock:
    """A clock that starts now and moves only when told (desired states stay valid)."""
    return ManualClock(SystemClock().now_ms())


__all__ = ["Behaviour", "Running", "StartControl", "manual_clock", "states", "until"]
