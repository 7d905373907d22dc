"""``edgelm control run`` as a real process: a clean stop, and a crash between storing and
acknowledging (``kill -9``) that loses nothing and stores nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from edgelm_control.store import Store
from edgelm_protocol import EventKind
from tests.integration.control.conftest import until
from tests.integration.control.control_process import ControlProcess, write_config
from tests.integration.control.fleet import Fleet
from tests.integration.control.simdevice import SimDevice
from tests.mosquitto import Mosquitto


@pytest.fixture
def processes() -> Iterator[list[ControlProcess]]:
    started: list[ControlProcess] = []
    yield started
    for process in started:
        process.kill()


class TestCleanStop:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    def test_a_signal_stops_the_process_cleanly_with_exit_0(
        self,
        fleet: Fleet,
        mosquitto: Mosquitto,
        tmp_path: Path,
        processes: list[ControlProcess],
        sig: signal.Signals,
    ):
        """SIGTERM and SIGINT stop the control plane in order, and it exits 0."""
        config = write_config(fleet, mosquitto.port)
        process = ControlProcess(config, tmp_path / "control.log")
        processes.append(process)
        process.wait_ready()
        process.proc.send_signal(sig)
        assert process.wait() == 0
        assert '"event": "control_stopped"' in process.log()

    def test_a_bad_config_exits_2_with_the_reason(
        self, fleet: Fleet, tmp_path: Path, processes: list[ControlProcess]
    ):
        """A config error stops the start with exit 2 and names the setting."""
        config = tmp_path / "bad.toml"
        config.write_text('fleet = "acme"\nhttp = "nowhere"\n')
        process = ControlProcess(config, tmp_path / "control.log")
        processes.append(process)
        assert process.wait() == 2
        assert "http" in process.log()
        assert "HOST:PORT" in process.log()


class TestCrashBetweenStoreAndAck:
    async def test_a_killed_control_plane_gets_the_message_again_and_stores_it_once(
        self, fleet: Fleet, mosquitto: Mosquitto, tmp_path: Path, processes: list[ControlProcess]
    ):
        """Killed with SIGKILL after the commit and before any ack: after a restart the
        broker (and the device's outbox) deliver the event again, it is stored once, and the
        device finally gets its ack."""
        config = write_config(fleet, mosquitto.port)
        crashing = ControlProcess(
            config,
            tmp_path / "first.log",
            env={"EDGELM_CONTROL_TEST_CRASH_POINT": "ingest.after_commit"},
        )
        processes.append(crashing)
        await asyncio.to_thread(crashing.wait_ready)
        device = SimDevice(fleet.name, "kiosk-1", mosquitto.port, fleet.director_keys())
        await device.start()
        try:
            # The device's presence and state are the first batch: the process dies there.
            assert await asyncio.to_thread(crashing.wait) == -signal.SIGKILL
            message_id = await device.event(EventKind.DESIRED_REJECTED, None, reason="once")
            await asyncio.sleep(0.2)  # nobody is there to store or ack it
            assert device.acks[message_id] == 0
            restarted = ControlProcess(config, tmp_path / "second.log")
            processes.append(restarted)
            await asyncio.to_thread(restarted.wait_ready)
            await until(lambda: device.acks[message_id] >= 1)
        finally:
            await device.stop()
        await asyncio.to_thread(restarted.terminate)
        store = await Store.open(f"sqlite:///{fleet.control_dir / 'control.db'}", migrate=False)
        try:
            async with store.read() as conn:
                events = (await conn.execute(text("SELECT count(*) FROM device_events"))).scalar()
                devices = (await conn.execute(text("SELECT count(*) FROM devices"))).scalar()
        finally:
            await store.close()
        assert (events, devices) == (1, 1)
        assert '"event": "crash_point_reached"' in crashing.log()

    async def test_an_event_stored_just_before_the_kill_is_acked_after_the_restart(
        self, fleet: Fleet, mosquitto: Mosquitto, tmp_path: Path, processes: list[ControlProcess]
    ):
        """The event itself is in the batch that was committed when the process died: the
        redelivery finds it stored, stores nothing, and acknowledges it."""
        config = write_config(fleet, mosquitto.port)
        first = ControlProcess(config, tmp_path / "first.log")
        processes.append(first)
        await asyncio.to_thread(first.wait_ready)
        device = SimDevice(fleet.name, "kiosk-1", mosquitto.port, fleet.director_keys())
        await device.start()
        try:
            await asyncio.sleep(0.3)  # presence and state stored
            await asyncio.to_thread(first.terminate)
            crashing = ControlProcess(
                config,
                tmp_path / "second.log",
                env={"EDGELM_CONTROL_TEST_CRASH_POINT": "ingest.after_commit"},
            )
            processes.append(crashing)
            await asyncio.to_thread(crashing.wait_ready)
            message_id = await device.event(EventKind.DESIRED_REJECTED, None, reason="once")
            assert await asyncio.to_thread(crashing.wait) == -signal.SIGKILL
            assert device.acks[message_id] == 0
            third = ControlProcess(config, tmp_path / "third.log")
            processes.append(third)
            await asyncio.to_thread(third.wait_ready)
            await until(lambda: device.acks[message_id] >= 1)
            await asyncio.to_thread(third.terminate)
        finally:
            with contextlib.suppress(Exception):
                await device.stop()
        store = await Store.open(f"sqlite:///{fleet.control_dir / 'control.db'}", migrate=False)
        try:
            async with store.read() as conn:
                rows = (await conn.execute(text("SELECT message_id FROM device_events"))).all()
        finally:
            await store.close()
        assert [r[0] for r in rows] == [message_id]
