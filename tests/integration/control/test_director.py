"""The director and the fleet link around it: re-signing before expiry, republishing what a
broker outage left unpublished, and shared subscriptions for several replicas."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from edgelm_control.errors import ConfigError
from edgelm_control.service import ControlService
from edgelm_control.store.desired import get_desired
from edgelm_protocol import Channel, Topic
from edgelm_protocol.mqtt import InboundMessage, MqttClient, MqttSettings
from tests.integration.control.conftest import StartControl, manual_clock, until
from tests.integration.control.fleet import Fleet
from tests.integration.control.test_rollouts import create, known, push
from tests.mosquitto import Mosquitto

DAY_S = 86400


class TestResigning:
    async def test_an_assignment_is_resigned_before_it_expires(self, start_control: StartControl):
        """Close to its expiry, a device's current desired state is signed again: a new
        sequence and a later expiry for the same target and rollout, retained for it."""
        clock = manual_clock()
        control = await start_control(clock=clock, maintenance_interval_s=3600)
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: len(device.desired) == 1)
        first = device.desired[0]
        director = control.service.director
        assert director is not None
        assert await director.resign_expiring(before_s=2 * DAY_S) == 0
        clock.advance(5 * DAY_S + 60)  # less than two days left of seven
        assert await director.resign_expiring(before_s=2 * DAY_S) == 1
        await until(lambda: len(device.desired) == 2)
        again = device.desired[1]
        assert again.sequence > first.sequence
        assert (again.target, again.rollout) == (first.target, rollout["id"])
        assert again.expires > first.expires


class TestRepublishing:
    async def test_desired_states_issued_while_the_broker_is_down_go_out_on_reconnect(
        self, start_control: StartControl, mosquitto
    ):
        """A wave started with the broker stopped is stored; its desired states are published
        when the control plane connects again, and the device gets its model."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        mosquitto.stop()
        link = control.service.link
        assert link is not None
        await until(lambda: not link.connected)
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        status, body = await control.call("GET", "/api/v1/devices/a-1")
        assert status == 200
        assert body["desired"]["published"] is False
        mosquitto.start()
        await until(lambda: device.active is not None)
        done = await control.wait_rollout(rollout["id"], lambda r: r["state"] == "completed")
        assert done["devices"][0]["state"] == "succeeded"


@contextlib.asynccontextmanager
async def observer(
    port: int, name: str, filters: Sequence[str]
) -> AsyncIterator[list[InboundMessage]]:
    """A fresh client (clean start, no session) subscribed to ``filters``: the messages it
    receives, retained ones first, in the order the broker sent them."""
    client = MqttClient(
        MqttSettings(
            host="127.0.0.1",
            port=port,
            client_id=name,
            clean_start=True,
            session_expiry_s=0,
            manual_ack=False,
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
        )
    )
    received: list[InboundMessage] = []

    async def collect() -> None:
        async for message in client.messages():
            received.append(message)

    await client.start()
    task = asyncio.get_running_loop().create_task(collect())
    try:
        await client.wait_connected()
        await client.subscribe([(f, 1) for f in filters])
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.stop()


class TestBrokerThatLostItsState:
    async def test_a_restarted_broker_without_persistence_gets_the_desired_states_again(
        self, start_control: StartControl, mosquitto: Mosquitto, fleet: Fleet
    ):
        """The broker restarts without persistence: its retained messages and the control
        plane's session are gone. On the connection without a session the control plane
        publishes every device's current desired state again, retained, byte for byte, so a
        device connecting afterwards finds it (and the one connected ignores the copy)."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: device.active is not None)
        store = control.service.store
        assert store is not None
        async with store.read() as conn:
            record = await get_desired(conn, "a-1")
        assert record is not None
        assert record.document is not None
        assert record.published
        desired = Topic.for_device(fleet.name, "a-1", Channel.DESIRED).value
        announce = Topic.announce(fleet.name).value
        async with observer(mosquitto.port, "before", [desired]) as before:
            await until(lambda: len(before) == 1)
        assert before[0].payload == record.document.encode()

        mosquitto.restart()  # a new process on the same port, with nothing retained

        # The control plane publishes the announcement after the desired states (one task,
        # each publish awaiting its PUBACK): once it is here, so is what came before it.
        async with observer(mosquitto.port, "sync", [desired, announce]) as synced:
            await until(lambda: any(m.topic == announce for m in synced))
            assert [m.payload for m in synced if m.topic == desired] == [record.document.encode()]
        async with observer(mosquitto.port, "after", [desired]) as after:
            await until(lambda: len(after) == 1)
        assert after[0].retain
        assert after[0].payload == record.document.encode()
        async with store.read() as conn:
            again = await get_desired(conn, "a-1")
        assert again is not None
        assert (again.sequence, again.document, again.published) == (
            record.sequence,
            record.document,
            True,
        )
        assert [d.sequence for d in device.desired] == [record.sequence]


class TestSharedSubscriptions:
    async def test_a_replica_with_a_share_group_receives_the_fleet(
        self, start_control: StartControl
    ):
        """With shared_group set, the replica subscribes as $share/{group}/... and stores
        what devices send (retained messages are not for shared subscriptions: the live
        ones are)."""
        control = await start_control(shared_group="cp")
        link = control.service.link
        assert link is not None
        assert all(f.value.startswith("$share/cp/edgelm/v1/acme/dev/+/") for f in link.filters)
        device = await control.device("a-1")
        await device.send_state()
        await known(control, "a-1")


class TestStartRefusals:
    async def test_a_missing_repository_is_a_config_error(self, fleet: Fleet, tmp_path: Path):
        """Without fleet-init's repository the control plane refuses to start, saying why."""
        config = fleet.config(repository_dir=str(tmp_path / "nowhere"))
        with pytest.raises(ConfigError, match="fleet-init"):
            await ControlService(config).run()
