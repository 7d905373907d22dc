"""The director and the fleet link around it: re-signing before expiry, republishing what a
broker outage left unpublished, and shared subscriptions for several replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm_control.errors import ConfigError
from edgelm_control.service import ControlService
from tests.integration.control.conftest import StartControl, manual_clock, until
from tests.integration.control.fleet import Fleet
from tests.integration.control.test_rollouts import create, known, push

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
