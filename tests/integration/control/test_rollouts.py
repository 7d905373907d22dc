"""Every rollout semantic of docs/fleet.md ("Rollouts"), with simulated devices on a real broker.

The control plane runs with a :class:`~edgelm_control.clock.ManualClock`: time moves only when
a test says so, so a seven-day expiry or a half-hour timeout is a step, not a wait, and no
test depends on how fast this machine is.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from structlog.testing import capture_logs

from edgelm_control.clock import ManualClock
from edgelm_control.rollouts.driver import SETTLE_S
from edgelm_control.store.events import insert_events
from tests.integration.control.conftest import Running, StartControl, manual_clock, states, until
from tests.integration.control.simdevice import (
    FAIL_ACTIVATION,
    SILENT,
    STOP_AT_DOWNLOAD,
    STOP_AT_INSTALLED,
    SUCCEED,
    Behaviour,
    SimDevice,
)
from tests.mosquitto import Mosquitto

TIMEOUT_S = 60
EXPIRY_S = 600


async def push(control: Running, name: str, version: str) -> None:
    plan = control.fleet.gguf_push(name, version)
    data = aiohttp.FormData()
    data.add_field("targets", plan.targets, filename="targets.json")
    for digest, blob in plan.blobs.items():
        data.add_field(digest, blob, filename=digest)
    status, body = await control.call("POST", "/api/v1/models", data=data)
    assert status == 201, body


async def known(control: Running, *device_ids: str) -> None:
    """Wait until the control plane has stored these devices' state."""

    async def stored() -> bool:
        for device_id in device_ids:
            status, body = await control.call("GET", f"/api/v1/devices/{device_id}")
            if status != 200 or body["hardware_class"] is None:
                return False
        return True

    await until(stored)


async def create(control: Running, **request: Any) -> dict[str, Any]:
    body = {
        "device_timeout_s": TIMEOUT_S,
        "pending_expiry_s": EXPIRY_S,
        **request,
    }
    status, rollout = await control.call("POST", "/api/v1/rollouts", json=body)
    assert status == 201, rollout
    assert isinstance(rollout, dict)
    return rollout


async def wait_states(
    control: Running, rollout_id: str, expected: dict[str, str]
) -> dict[str, Any]:
    return await control.wait_rollout(rollout_id, lambda r: states(r) == expected)


async def wait_state(control: Running, rollout_id: str, state: str) -> dict[str, Any]:
    return await control.wait_rollout(rollout_id, lambda r: r["state"] == state)


async def advance(control: Running, seconds: float) -> None:
    assert isinstance(control.clock, ManualClock)
    control.clock.advance(seconds)
    await control.step()


async def fleet_on(control: Running, name: str, version: str, *devices: SimDevice) -> None:
    """Every device runs ``name@version`` through a first rollout (so it has a previous model)."""
    await push(control, name, version)
    rollout = await create(
        control,
        model=f"{name}@{version}",
        selector={"devices": [d.device_id for d in devices]},
        waves="rest",
    )
    await wait_state(control, rollout["id"], "completed")


class TestSuccess:
    async def test_a_device_succeeds_when_it_runs_the_model_not_when_it_downloaded_it(
        self, start_control: StartControl
    ):
        """Installed is not success: the row waits in activating, and the wave with it; only
        the activation (health check passed) counts."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        slow = await control.device("a-slow", behaviour=Behaviour(outcome=STOP_AT_INSTALLED))
        await control.device("b-fast")
        await known(control, "a-slow", "b-fast")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        found = await wait_states(
            control, rollout["id"], {"a-slow": "activating", "b-fast": "succeeded"}
        )
        assert found["state"] == "running"
        assert found["waves"][0]["verdict"] is None
        slow.behaviour.outcome = SUCCEED
        await slow.apply(slow.desired[-1])
        done = await wait_state(control, rollout["id"], "completed")
        assert states(done) == {"a-slow": "succeeded", "b-fast": "succeeded"}
        assert done["waves"][0]["verdict"] == "passed"
        health = {r["id"]: r["health"] for r in done["devices"]}
        assert health["b-fast"] == {"tokens_per_s": 50.0, "ttft_ms": 100.0}

    async def test_waves_run_in_order_canary_first(self, start_control: StartControl):
        """The canary's devices get the model first; the rest only once it passed."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        canary = await control.device("a-canary", behaviour=Behaviour(outcome=STOP_AT_INSTALLED))
        rest = [await control.device(f"b-{i}") for i in range(3)]
        await known(control, "a-canary", *(d.device_id for d in rest))
        rollout = await create(control, model="m@1", selector={"all": True}, canary="1")
        assert [w["devices"] for w in rollout["waves"]] == [
            ["a-canary"],
            ["b-0", "b-1", "b-2"],
        ]
        await wait_states(
            control,
            rollout["id"],
            {"a-canary": "activating", "b-0": "waiting", "b-1": "waiting", "b-2": "waiting"},
        )
        assert all(not d.desired for d in rest)
        canary.behaviour.outcome = SUCCEED
        await canary.apply(canary.desired[-1])
        done = await wait_state(control, rollout["id"], "completed")
        assert set(states(done).values()) == {"succeeded"}

    async def test_pause_between_waves_waits_for_the_operator_after_the_canary(
        self, start_control: StartControl
    ):
        """With pause_between_waves the canary's pass pauses the rollout: the next wave's
        devices are not told until the operator resumes, and then the rollout completes."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-canary")
        rest = [await control.device(f"b-{i}") for i in range(2)]
        await known(control, "a-canary", *(d.device_id for d in rest))
        rollout = await create(
            control, model="m@1", selector={"all": True}, canary="1", pause_between_waves=True
        )
        assert rollout["settings"]["pause_between_waves"] is True
        held = await wait_state(control, rollout["id"], "paused")
        assert held["current_wave"] == 1
        assert held["waves"][0]["verdict"] == "passed"
        assert states(held) == {"a-canary": "succeeded", "b-0": "waiting", "b-1": "waiting"}
        await advance(control, TIMEOUT_S * 2)  # time alone never starts the next wave
        assert all(not d.desired for d in rest)
        status, _ = await control.call("POST", f"/api/v1/rollouts/{rollout['id']}/resume")
        assert status == 200
        done = await wait_state(control, rollout["id"], "completed")
        assert set(states(done).values()) == {"succeeded"}

    async def test_pause_between_waves_must_be_a_boolean(self, start_control: StartControl):
        """A string where a boolean belongs is a 400 naming the setting, not a truthy yes."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        body = {"model": "m@1", "selector": {"all": True}, "pause_between_waves": "yes"}
        status, error = await control.call("POST", "/api/v1/rollouts", json=body)
        assert status in (400, 422), error
        assert "pause_between_waves" in str(error)


class TestOfflineDevices:
    async def test_an_offline_device_stays_pending_expires_and_updates_when_it_returns(
        self, start_control: StartControl
    ):
        """An offline device does not hold the rollout: it completes listing it pending; the
        device expires later, and still gets the model when it comes back."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-online")
        status, _ = await control.call(
            "POST", "/api/v1/devices", json={"id": "b-away", "hardware_class": "pi5"}
        )
        assert status == 201
        await known(control, "a-online")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        done = await wait_state(control, rollout["id"], "completed")
        assert states(done) == {"a-online": "succeeded", "b-away": "pending"}
        assert done["pending"] == ["b-away"]
        await advance(control, EXPIRY_S + 1)
        expired = await wait_states(
            control, rollout["id"], {"a-online": "succeeded", "b-away": "expired"}
        )
        assert expired["state"] == "completed"
        returning = await control.device("b-away")  # its desired state was retained
        await until(lambda: returning.active is not None)
        back = await wait_states(
            control, rollout["id"], {"a-online": "succeeded", "b-away": "succeeded"}
        )
        assert back["state"] == "completed"

    async def test_a_canary_waits_for_its_offline_device_then_fails_when_none_can_report(
        self, start_control: StartControl
    ):
        """A canary whose only device is away waits (a success is needed), and fails with
        no_canary_reported once that device has expired."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.call(
            "POST", "/api/v1/devices", json={"id": "a-away", "hardware_class": "pi5"}
        )
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await control.step()
        still = await wait_state(control, rollout["id"], "running")
        assert states(still) == {"a-away": "pending"}
        await advance(control, EXPIRY_S + 1)
        halted = await wait_state(control, rollout["id"], "halted")
        assert halted["waves"][0]["code"] == "no_canary_reported"


class TestFailures:
    async def test_an_online_silent_device_times_out_and_fails_the_wave(
        self, start_control: StartControl
    ):
        """A notified, online device silent past device_timeout_s is timed_out: a failure
        that halts the rollout (on_failure pause); resume accepts the wave and moves on."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-silent", behaviour=Behaviour(outcome=SILENT))
        await control.device("b-next")
        await known(control, "a-silent", "b-next")
        rollout = await create(control, model="m@1", selector={"all": True}, canary="1")
        await wait_states(control, rollout["id"], {"a-silent": "pending", "b-next": "waiting"})
        await advance(control, TIMEOUT_S - 1)
        assert states(await wait_state(control, rollout["id"], "running"))["a-silent"] == "pending"
        await advance(control, 2)
        halted = await wait_state(control, rollout["id"], "halted")
        assert states(halted) == {"a-silent": "timed_out", "b-next": "waiting"}
        assert halted["waves"][0]["verdict"] == "failed"
        assert halted["waves"][0]["code"] == "failure_threshold"
        status, resumed = await control.call("POST", f"/api/v1/rollouts/{rollout['id']}/resume")
        assert status == 200
        assert resumed["waves"][0]["verdict"] == "accepted"
        done = await wait_state(control, rollout["id"], "completed")
        assert states(done)["b-next"] == "succeeded"

    async def test_a_failing_canary_pauses_the_rollout_and_the_rest_never_start(
        self, start_control: StartControl
    ):
        """The canary fails its health check on the device: the rollout halts by itself and
        the other devices never get the model."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-canary", behaviour=Behaviour(outcome=FAIL_ACTIVATION))
        others = [await control.device(f"b-{i}") for i in range(2)]
        await known(control, "a-canary", "b-0", "b-1")
        rollout = await create(control, model="m@1", selector={"all": True}, canary="1")
        halted = await wait_state(control, rollout["id"], "halted")
        assert states(halted) == {"a-canary": "failed", "b-0": "waiting", "b-1": "waiting"}
        row = next(r for r in halted["devices"] if r["id"] == "a-canary")
        assert "health check" in row["reason"]
        assert all(not d.desired for d in others)

    async def test_a_failing_canary_aborts_the_rollout_when_asked(
        self, start_control: StartControl
    ):
        """on_failure abort: the rollout fails, waiting devices are cancelled."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-canary", behaviour=Behaviour(outcome=FAIL_ACTIVATION))
        await control.device("b-0")
        await known(control, "a-canary", "b-0")
        rollout = await create(
            control, model="m@1", selector={"all": True}, canary="1", on_failure="abort"
        )
        failed = await wait_state(control, rollout["id"], "failed")
        assert states(failed) == {"a-canary": "failed", "b-0": "cancelled"}

    async def test_a_slower_model_fails_the_health_gate(self, start_control: StartControl):
        """The new model's tokens/s on its class is held to the previous model's: 20 against
        a baseline of 50 with a 20% margin fails the wave, naming the class and figures."""
        control = await start_control(clock=manual_clock())
        device = await control.device("a-pi")
        await known(control, "a-pi")
        await fleet_on(control, "m", "1", device)
        device.behaviour.tokens_per_s = 20.0
        await push(control, "m", "2")
        rollout = await create(
            control, model="m@2", selector={"all": True}, waves="rest", health_margin=0.2
        )
        assert rollout["baselines"] == {"pi5": {"tokens_per_s": 50.0, "ttft_ms": 100.0}}
        halted = await wait_state(control, rollout["id"], "halted")
        wave = halted["waves"][0]
        assert wave["code"] == "health"
        assert "pi5" in wave["reason"]
        assert "20.0 tokens/s" in wave["reason"]


class TestBlindControlPlane:
    async def test_a_broker_outage_longer_than_the_device_timeout_fails_nothing(
        self, start_control: StartControl, mosquitto: Mosquitto
    ):
        """While the plane cannot reach the broker it cannot hear devices, so their silence
        is not theirs: no device times out, no wave is decided; after the outage the device
        reports and the rollout completes."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        slow = await control.device("a-slow", behaviour=Behaviour(outcome=STOP_AT_INSTALLED))
        await known(control, "a-slow")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_states(control, rollout["id"], {"a-slow": "activating"})
        link = control.service.link
        assert link is not None
        mosquitto.stop()
        await until(lambda: not link.connected)
        await advance(control, TIMEOUT_S * 3)  # far past the device timeout, while blind
        status, blind = await control.call("GET", f"/api/v1/rollouts/{rollout['id']}")
        assert status == 200
        assert (blind["state"], states(blind)) == ("running", {"a-slow": "activating"})
        mosquitto.start()
        await link.wait_connected()
        await control.step()  # the plane sees again: silence counts from now
        await advance(control, SETTLE_S + 1)
        await advance(control, TIMEOUT_S - SETTLE_S - 5)
        _, seeing = await control.call("GET", f"/api/v1/rollouts/{rollout['id']}")
        assert states(seeing) == {"a-slow": "activating"}
        slow.behaviour.outcome = SUCCEED
        await slow.apply(slow.desired[-1])
        done = await wait_state(control, rollout["id"], "completed")
        assert states(done) == {"a-slow": "succeeded"}

    async def test_silence_after_the_outage_still_times_out(
        self, start_control: StartControl, mosquitto: Mosquitto
    ):
        """Blindness pauses the clocks, it does not switch them off: a device that stays
        silent for the whole timeout after the plane sees again is timed_out."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-silent", behaviour=Behaviour(outcome=SILENT))
        await known(control, "a-silent")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_states(control, rollout["id"], {"a-silent": "pending"})
        link = control.service.link
        assert link is not None
        mosquitto.stop()
        await until(lambda: not link.connected)
        await advance(control, TIMEOUT_S * 3)
        mosquitto.start()
        await link.wait_connected()

        async def back_online() -> bool:
            _, device = await control.call("GET", "/api/v1/devices/a-silent")
            return bool(device["presence"] == "online")

        await until(back_online)  # timed_out is for online devices; offline ones expire
        await control.step()
        await advance(control, TIMEOUT_S + SETTLE_S)
        halted = await wait_state(control, rollout["id"], "halted")
        assert states(halted) == {"a-silent": "timed_out"}


class TestAbort:
    async def test_abort_with_devices_in_every_state(self, start_control: StartControl):
        """Waiting and pending devices are cancelled, a download in flight is cancelled,
        devices that switched (or were switching) roll back to the model they ran before."""
        control = await start_control(clock=manual_clock())
        names = ["a-done", "b-activating", "c-downloading", "d-away", "e-waiting"]
        devices = {n: await control.device(n) for n in names}
        await known(control, *names)
        await fleet_on(control, "m", "1", *devices.values())
        await devices["d-away"].stop()
        devices["b-activating"].behaviour.outcome = STOP_AT_INSTALLED
        devices["c-downloading"].behaviour.outcome = STOP_AT_DOWNLOAD
        await push(control, "m", "2")
        rollout = await create(control, model="m@2", selector={"all": True}, waves="4,rest")
        await wait_states(
            control,
            rollout["id"],
            {
                "a-done": "succeeded",
                "b-activating": "activating",
                "c-downloading": "downloading",
                "d-away": "pending",
                "e-waiting": "waiting",
            },
        )
        status, aborted = await control.call("POST", f"/api/v1/rollouts/{rollout['id']}/abort")
        assert status == 200
        assert aborted["state"] == "aborted"
        final = await wait_states(
            control,
            rollout["id"],
            {
                "a-done": "rolled_back",
                "b-activating": "rolled_back",
                "c-downloading": "cancelled",
                "d-away": "cancelled",
                "e-waiting": "cancelled",
            },
        )
        assert final["state"] == "aborted"
        for name in ("a-done", "b-activating", "c-downloading"):
            active = devices[name].active
            assert active is not None
            assert active.key == "m@1"
        assert not devices["e-waiting"].desired[1:]  # the second rollout never reached it
        status, again = await control.call("POST", f"/api/v1/rollouts/{rollout['id']}/abort")
        assert status == 409
        assert again["error"]["code"] == "rollout_state_conflict"

    async def test_aborting_a_first_rollout_releases_its_devices(self, start_control: StartControl):
        """Devices that ran no model of the fleet: the abort cannot name a previous model,
        so it sends a signed release. A device that switched unloads the model (it ran none
        before); rows end rolled_back, not stuck in rolling_back."""
        control = await start_control(clock=manual_clock())
        devices = {n: await control.device(n) for n in ("a-switched", "b-switched")}
        await known(control, *devices)
        await push(control, "m", "1")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_states(control, rollout["id"], {"a-switched": "succeeded",
                                                   "b-switched": "succeeded"})  # fmt: skip
        status, _ = await control.call("POST", f"/api/v1/rollouts/{rollout['id']}/abort")
        assert status == 200
        final = await wait_states(
            control, rollout["id"], {"a-switched": "rolled_back", "b-switched": "rolled_back"}
        )
        assert final["state"] == "aborted"
        for device in devices.values():
            release = device.desired[-1]
            assert release.target is None
            assert release.rollout == rollout["id"]
            assert device.active is None


class TestSupersede:
    async def test_a_newer_rollout_supersedes_a_stuck_one(self, start_control: StartControl):
        """A device stuck in an older rollout is taken over by a newer one: the old row is
        superseded and the new model runs; nothing waits behind the stuck rollout."""
        control = await start_control(clock=manual_clock())
        stuck = await control.device("a-stuck", behaviour=Behaviour(outcome=STOP_AT_DOWNLOAD))
        await known(control, "a-stuck")
        await push(control, "m", "1")
        await push(control, "m", "2")
        old = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_states(control, old["id"], {"a-stuck": "downloading"})
        stuck.behaviour.outcome = SUCCEED
        new = await create(control, model="m@2", selector={"all": True}, waves="rest")
        await wait_state(control, new["id"], "completed")
        old_now = await wait_states(control, old["id"], {"a-stuck": "superseded"})
        row = old_now["devices"][0]
        assert row["reason"] == f"superseded by {new['id']}"
        assert stuck.active is not None
        assert stuck.active.key == "m@2"


class TestLateJoiners:
    async def test_a_device_enrolled_after_the_rollout_gets_its_model(
        self, start_control: StartControl
    ):
        """A new device matching a completed rollout's selector joins its last wave and
        runs the model; one that does not match stays out."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        await control.device("a-berlin", labels={"site": "berlin"})
        await known(control, "a-berlin")
        rollout = await create(
            control, model="m@1", selector={"labels": {"site": "berlin"}}, canary="1"
        )
        await wait_state(control, rollout["id"], "completed")
        late = await control.device("b-berlin", labels={"site": "berlin"})
        elsewhere = await control.device("c-paris", labels={"site": "paris"})
        done = await wait_states(
            control, rollout["id"], {"a-berlin": "succeeded", "b-berlin": "succeeded"}
        )
        assert {r["id"]: r["wave"] for r in done["devices"]}["b-berlin"] == 0
        assert late.active is not None
        assert late.active.key == "m@1"
        await known(control, "c-paris")
        assert not elsewhere.desired


class TestRestart:
    async def test_a_restart_mid_rollout_resumes_without_restarting_a_wave(
        self, start_control: StartControl
    ):
        """Stopped while its second wave runs, a new control plane on the same store goes on
        from there: no wave starts again, no desired state is issued again, and the
        rollout completes when the last device reports."""
        clock = manual_clock()
        control = await start_control(clock=clock)
        await push(control, "m", "1")
        await control.device("a-canary")
        await control.device("b-fast")
        slow = await control.device("c-slow", behaviour=Behaviour(outcome=STOP_AT_DOWNLOAD))
        await known(control, "a-canary", "b-fast", "c-slow")
        rollout = await create(control, model="m@1", selector={"all": True}, canary="1")
        before = await wait_states(
            control,
            rollout["id"],
            {"a-canary": "succeeded", "b-fast": "succeeded", "c-slow": "downloading"},
        )
        _, devices_before = await control.call("GET", "/api/v1/devices")
        sequences = {d["id"]: await _sequence(control, d["id"]) for d in devices_before["data"]}
        await control.stop()
        again = await start_control(clock=clock)
        slow.behaviour.outcome = SUCCEED
        await slow.apply(slow.desired[-1])
        done = await wait_state(again, rollout["id"], "completed")
        assert [w["started_at"] for w in done["waves"]] == [
            w["started_at"] for w in before["waves"]
        ]
        assert {d: await _sequence(again, d) for d in sequences} == sequences
        assert set(states(done).values()) == {"succeeded"}


async def _sequence(control: Running, device_id: str) -> int:
    _, body = await control.call("GET", f"/api/v1/devices/{device_id}")
    return int(body["desired"]["sequence"])


class TestRobustness:
    async def test_an_event_the_engine_cannot_apply_is_logged_and_the_rest_go_on(
        self, start_control: StartControl
    ):
        """A stored event that breaks the engine (here a kind no protocol version has) is
        logged and set aside; the reports after it still move their rows."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        device = await control.device("a-1", behaviour=Behaviour(outcome=SILENT))
        await known(control, "a-1")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: len(device.desired) == 1)
        store = control.service.store
        assert store is not None
        async with store.write() as conn:
            await insert_events(
                conn,
                [
                    {
                        "message_id": "f" * 32, "device_id": "a-1", "seq": 99, "kind": "bogus",
                        "model": "m@1", "desired_sequence": None, "rollout_id": rollout["id"],
                        "reason": None, "health_tokens_per_s": None, "health_ttft_ms": None,
                        "progress_done_bytes": None, "progress_total_bytes": None,
                        "sent_ms": 0, "received_ms": 0, "processed_ms": None,
                    }
                ],
            )  # fmt: skip
        with capture_logs() as logs:
            await control.step()
            device.behaviour.outcome = SUCCEED
            await device.apply(device.desired[-1])
            await wait_state(control, rollout["id"], "completed")
        assert [e["message_id"] for e in logs if e["event"] == "rollout_report_failed"] == [
            "f" * 32
        ]
