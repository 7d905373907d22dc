"""``edgelm control run`` as a real process with simulated devices on a real Mosquitto: a
``kill -9`` in the middle of a running rollout, and telemetry from a device to the REST API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from edgelm_control.store import Store
from tests.integration.control.conftest import until
from tests.integration.control.control_process import ControlProcess, write_config
from tests.integration.control.fleet import Fleet
from tests.integration.control.simdevice import SILENT, SUCCEED, Behaviour, SimDevice
from tests.mosquitto import Mosquitto


@pytest.fixture
def processes() -> Iterator[list[ControlProcess]]:
    started: list[ControlProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
async def devices() -> AsyncIterator[list[SimDevice]]:
    started: list[SimDevice] = []
    yield started
    for device in started:
        await device.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Api:
    """The REST API of one control plane process, with the operator's token."""

    def __init__(self, http: aiohttp.ClientSession, fleet: Fleet, url: str) -> None:
        self.http = http
        self.fleet = fleet
        self.url = url

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.fleet.token}"}
        async with self.http.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()

    async def push(self, name: str, version: str) -> None:
        plan = self.fleet.gguf_push(name, version)
        data = aiohttp.FormData()
        data.add_field("targets", plan.targets, filename="targets.json")
        for digest, blob in plan.blobs.items():
            data.add_field(digest, blob, filename=digest)
        status, body = await self.call("POST", "/api/v1/models", data=data)
        assert status == 201, body

    async def known(self, *device_ids: str) -> None:
        async def stored() -> bool:
            for device_id in device_ids:
                status, body = await self.call("GET", f"/api/v1/devices/{device_id}")
                if status != 200 or body["hardware_class"] is None:
                    return False
            return True

        await until(stored)

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/v1/rollouts/{rollout_id}")
        assert status == 200, body
        assert isinstance(body, dict)
        return body


async def start_process(config: Path, log: Path, processes: list[ControlProcess]) -> ControlProcess:
    process = ControlProcess(config, log)
    processes.append(process)
    return await asyncio.to_thread(process.wait_ready)


async def start_device(
    fleet: Fleet, device_id: str, port: int, devices: list[SimDevice], **kwargs: Any
) -> SimDevice:
    device = SimDevice(fleet.name, device_id, port, fleet.director_keys(), **kwargs)
    devices.append(device)
    return await device.start()


class TestKilledMidRollout:
    async def test_a_rollout_killed_after_its_first_wave_finishes_once_after_a_restart(
        self,
        fleet: Fleet,
        mosquitto: Mosquitto,
        tmp_path: Path,
        processes: list[ControlProcess],
        devices: list[SimDevice],
        http: aiohttp.ClientSession,
    ):
        """``kill -9`` after the canary wave's desired state went out and before any device
        reported: the restarted process gets the canary's reports (queued in its broker
        session), passes the wave, starts the next one, and completes. Every device got
        exactly one desired state, the one the store holds: none issued twice, none lost,
        and the canary's was not issued again."""
        # One process for the whole test: no decode worker to orphan when it is killed.
        config = write_config(fleet, mosquitto.port, ingest_decode_workers=0)
        first = await start_process(config, tmp_path / "first.log", processes)
        api = Api(http, fleet, first.url)
        await api.push("m", "1")
        ids = ["d-1", "d-2", "d-3", "d-4"]
        fleet_devices = [
            await start_device(
                fleet, i, mosquitto.port, devices, behaviour=Behaviour(outcome=SILENT)
            )
            for i in ids
        ]
        await api.known(*ids)
        body = {"model": "m@1", "selector": {"all": True}, "canary": "1"}
        status, rollout = await api.call("POST", "/api/v1/rollouts", json=body)
        assert status == 201, rollout
        await until(lambda: sum(len(d.desired) for d in fleet_devices) == 1)
        (canary,) = [d for d in fleet_devices if d.desired]
        issued = canary.desired[0]
        assert issued.rollout == rollout["id"]

        first.kill()  # SIGKILL, before any device reported
        assert first.proc.returncode == -9

        for device in fleet_devices:
            device.behaviour.outcome = SUCCEED
        await canary.apply(issued)  # reports while nobody is there: the broker queues them
        second = await start_process(config, tmp_path / "second.log", processes)
        api = Api(http, fleet, second.url)
        done: dict[str, Any] = {}

        async def completed() -> bool:
            nonlocal done
            done = await api.rollout(rollout["id"])
            return bool(done["state"] == "completed")

        await until(completed)
        assert {r["id"]: r["state"] for r in done["devices"]} == dict.fromkeys(ids, "succeeded")
        assert [w["verdict"] for w in done["waves"]] == ["passed", "passed"]
        await asyncio.to_thread(second.terminate)

        assert canary.desired == [issued]
        for device in fleet_devices:
            assert len(device.desired) == 1, (device.device_id, device.desired)
            assert device.desired[0].rollout == rollout["id"]
            assert device.refused == [], (device.device_id, device.refused)
        store = await Store.open(f"sqlite:///{fleet.control_dir / 'control.db'}", migrate=False)
        try:
            async with store.read() as conn:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT device_id, sequence, published_sequence, rollout_id"
                            " FROM desired_states ORDER BY device_id"
                        )
                    )
                ).all()
        finally:
            await store.close()
        held = {d.device_id: d.desired[0].sequence for d in fleet_devices}
        assert [tuple(r) for r in rows] == [(i, held[i], held[i], rollout["id"]) for i in ids]
        assert held[canary.device_id] == issued.sequence


TELEMETRY = "/api/v1/telemetry"


class TestTelemetryOverHttp:
    async def test_telemetry_a_device_publishes_is_returned_by_the_rest_api(
        self,
        fleet: Fleet,
        mosquitto: Mosquitto,
        tmp_path: Path,
        processes: list[ControlProcess],
        devices: list[SimDevice],
        http: aiohttp.ClientSession,
    ):
        """Telemetry published over MQTT is decoded (in the decode worker, as configured by
        default), stored, and returned per device, paged, and aggregated per class."""
        config = write_config(fleet, mosquitto.port)
        process = await start_process(config, tmp_path / "control.log", processes)
        api = Api(http, fleet, process.url)
        kiosk = await start_device(fleet, "kiosk-1", mosquitto.port, devices)
        other = await start_device(fleet, "other-1", mosquitto.port, devices, hardware_class="x86")
        await kiosk.send_telemetry(requests=7)
        await other.send_telemetry(requests=3)

        async def stored(count: int) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []

            async def enough() -> bool:
                nonlocal rows
                status, body = await api.call("GET", TELEMETRY)
                assert status == 200, body
                rows = body["data"]
                return len(rows) >= count

            await until(enough)
            return rows

        assert {r["device"] for r in await stored(2)} == {"kiosk-1", "other-1"}
        status, body = await api.call("GET", TELEMETRY, params={"device": "kiosk-1"})
        assert status == 200, body
        assert body["next_cursor"] is None
        (row,) = body["data"]
        assert {k: v for k, v in row.items() if k not in ("id", "received_at")} == {
            "device": "kiosk-1",
            "window_s": 10.0,
            "model": None,
            "requests": 7,
            "errors": 0,
            "tokens_per_s": {"p50": 40.0, "p90": 50.0},
            "ttft_ms": {"p50": 90.0, "p90": 120.0},
            "queue_depth": 0,
            "cpu_percent": 12.5,
            "memory_bytes": 1 << 28,
            "memory_total_bytes": 4 << 30,
            "disk_free_bytes": 10 << 30,
            "temperature_c": 45.0,
        }

        # Paged one row at a time, every row once, in the order they were stored.
        seen: list[int] = []
        params: dict[str, str] = {"limit": "1"}
        while True:
            status, body = await api.call("GET", TELEMETRY, params=params)
            assert status == 200, body
            seen += [r["id"] for r in body["data"]]
            if body["next_cursor"] is None:
                break
            params = {"limit": "1", "cursor": body["next_cursor"]}
        assert len(seen) == 2
        assert seen == sorted(seen)

        status, body = await api.call(
            "GET", TELEMETRY, params={"group_by": "hardware_class", "since": "0"}
        )
        assert status == 200, body
        groups = {a["group"]["hardware_class"]: a for a in body["data"]}
        assert {k: (g["count"], g["requests"]) for k, g in groups.items()} == {
            "pi5": (1, 7),
            "x86": (1, 3),
        }
        await asyncio.to_thread(process.terminate)

    async def test_a_bad_parameter_is_a_400_naming_it(
        self,
        fleet: Fleet,
        mosquitto: Mosquitto,
        tmp_path: Path,
        processes: list[ControlProcess],
        http: aiohttp.ClientSession,
    ):
        """Each malformed query parameter answers 400 with the JSON error naming it."""
        config = write_config(fleet, mosquitto.port, ingest_decode_workers=0)
        process = await start_process(config, tmp_path / "control.log", processes)
        api = Api(http, fleet, process.url)
        cases = [
            ({"since": "yesterday"}, "since"),
            ({"until": "1.5"}, "until"),
            ({"device": "bad/id"}, "device"),
            ({"limit": "0"}, "limit"),
            ({"limit": "1001"}, "limit"),
            ({"cursor": "!!"}, "cursor"),
            ({"group_by": "colour"}, "group_by"),
            ({"group_by": "model,model"}, "group_by"),
        ]
        for params, param in cases:
            status, body = await api.call("GET", TELEMETRY, params=params)
            assert status == 400, (params, status, body)
            assert set(body) == {"error"}, body
            error = body["error"]
            assert (error["code"], error["type"], error["param"]) == (
                "invalid_request",
                "invalid_request_error",
                param,
            ), (params, body)
            assert param in error["message"], body
        await asyncio.to_thread(process.terminate)

    async def test_an_integer_beyond_64_bits_is_a_400_not_a_500(
        self,
        fleet: Fleet,
        mosquitto: Mosquitto,
        tmp_path: Path,
        processes: list[ControlProcess],
        http: aiohttp.ClientSession,
    ):
        """``since`` must fit the stored milliseconds: a bigger number is the caller's
        mistake, a 400 naming it, not a server error."""
        config = write_config(fleet, mosquitto.port, ingest_decode_workers=0)
        process = await start_process(config, tmp_path / "control.log", processes)
        api = Api(http, fleet, process.url)
        try:
            status, body = await api.call("GET", TELEMETRY, params={"since": str(1 << 64)})
        finally:
            await asyncio.to_thread(process.terminate)
        assert status == 400, body
        assert body["error"]["param"] == "since", body
