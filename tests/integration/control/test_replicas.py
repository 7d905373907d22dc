"""Two control-plane replicas on one PostgreSQL and one broker, sharing the devices' traffic
through an MQTT shared subscription: a rollout driven by both issues each desired state once
and completes, because every step is a compare-and-set in the shared store."""

from __future__ import annotations

from tests.integration.control.conftest import StartControl, postgres_database, states, until
from tests.integration.control.test_rollouts import create, known, push


class TestTwoReplicas:
    async def test_a_rollout_driven_by_two_replicas_issues_each_desired_state_once(
        self, start_control: StartControl
    ):
        """Both replicas run the engine on the same rows; each device gets one desired
        state per wave start, and the rollout completes on both views."""
        async with postgres_database() as url:
            first = await start_control(db=url, replica="0", shared_group="cp")
            second = await start_control(db=url, replica="1", shared_group="cp")
            await push(first, "m", "1")
            devices = [await first.device(f"d-{i}") for i in range(6)]
            for device in devices:
                await device.send_state()  # live, since shared subscriptions get no retained
            await known(first, *(d.device_id for d in devices))
            rollout = await create(second, model="m@1", selector={"all": True}, canary="2")
            done = await first.wait_rollout(rollout["id"], lambda r: r["state"] == "completed")
            assert set(states(done).values()) == {"succeeded"}
            await until(lambda: all(d.active is not None for d in devices))
            for device in devices:
                assert len({s.sequence for s in device.desired}) == len(device.desired) == 1
            _, seen_by_other = await second.call("GET", f"/api/v1/rollouts/{rollout['id']}")
            assert seen_by_other["state"] == "completed"
            await first.stop()
            await second.stop()
