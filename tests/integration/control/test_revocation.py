"""Revoking a device in a running control plane: the route, what the device sends afterwards,
its rollouts, its remote jobs, its retained desired state, and ``edgelm fleet devices revoke``.

A real control plane runs in the test's event loop with its own Mosquitto; simulated devices
speak the real protocol. Nothing waits on a clock: each test polls for the state it expects
(bounded by a generous deadline), and checks that something did not happen by looking after a
later marker that went the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from edgelm_protocol import (
    Channel,
    EventKind,
    JobOutcome,
    JobResult,
    Presence,
    PresenceStatus,
    Topic,
)
from edgelm_protocol.mqtt import MqttClient, MqttSettings
from tests.integration.control.conftest import Running, StartControl, manual_clock, states, until
from tests.integration.control.simdevice import STOP_AT_INSTALLED, SUCCEED, Behaviour
from tests.integration.control.test_rollouts import create, known, push, wait_state, wait_states

DEADLINE_S = 60


async def refused(control: Running, code: str) -> float:
    """``edgelm_control_messages_refused_total{code}`` as the control plane exposes it."""
    status, body = await control.call("GET", "/metrics", auth=False)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f'edgelm_control_messages_refused_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


async def revoke(control: Running, device: str, **body: Any) -> dict[str, Any]:
    status, answer = await control.call("POST", f"/api/v1/devices/{device}/revoke", json=body)
    assert status in (200, 201), answer
    assert isinstance(answer, dict)
    return answer


class TestRevokeRoute:
    async def test_the_first_revocation_is_the_record_and_a_repeat_changes_nothing(
        self, start_control: StartControl
    ):
        """201 with the time and reason, then 200 with the same; the device list and the
        device show it; registering the id again is refused (a revoked id never returns)."""
        control = await start_control()
        await control.device("kiosk-1")
        await control.device("kiosk-2")
        await known(control, "kiosk-1", "kiosk-2")
        status, first = await control.call(
            "POST", "/api/v1/devices/kiosk-1/revoke", json={"reason": "stolen from site 4"}
        )
        assert status == 201, first
        assert first["device"] == "kiosk-1"
        assert first["reason"] == "stolen from site 4"
        assert first["created"] is True
        assert first["revoked_at"].endswith("Z")
        status, again = await control.call(
            "POST", "/api/v1/devices/kiosk-1/revoke", json={"reason": "other words"}
        )
        assert status == 200, again
        assert (again["revoked_at"], again["reason"], again["created"]) == (
            first["revoked_at"],
            "stolen from site 4",
            False,
        )
        status, page = await control.call("GET", "/api/v1/devices")
        assert {d["id"]: d["revoked_at"] for d in page["data"]} == {
            "kiosk-1": first["revoked_at"],
            "kiosk-2": None,
        }
        status, detail = await control.call("GET", "/api/v1/devices/kiosk-1")
        assert detail["revocation"] == {
            "revoked_at": first["revoked_at"],
            "reason": "stolen from site 4",
        }
        status, body = await control.call("POST", "/api/v1/devices", json={"id": "kiosk-1"})
        assert status == 409, body
        assert body["error"]["param"] == "id"
        assert "revoked" in body["error"]["message"]

    async def test_a_device_never_heard_from_can_be_revoked(self, start_control: StartControl):
        """Provisioned, never connected: revoked all the same, so its first message is refused."""
        control = await start_control()
        answer = await revoke(control, "kiosk-9")
        assert (answer["created"], answer["rollouts"], answer["jobs_cancelled"]) == (True, [], [])
        assert answer["desired_cleared"] is False
        assert answer["reason"] is None

    async def test_a_bad_request_names_what_is_wrong(self, start_control: StartControl):
        """A bad id, reason or body is a 400 naming it; no token is a 401; nothing is revoked."""
        control = await start_control()
        cases: list[tuple[str, Any, str]] = [
            ("kiosk-1", {"reason": 7}, "reason"),
            ("kiosk-1", {"reason": "line\nbreak"}, "reason"),
            ("kiosk-1", {"reason": ""}, "reason"),
            ("kiosk-1", {"reason": "x" * 501}, "reason"),
            ("kiosk-1", {"why": "x"}, "why"),
            ("kiosk-1", ["stolen"], "body"),
            ("control", {}, "id"),
            ("-dash", {}, "id"),
        ]
        for device, body, param in cases:
            status, answer = await control.call(
                "POST", f"/api/v1/devices/{device}/revoke", json=body
            )
            assert status == 400, (device, body, answer)
            assert answer["error"]["param"] == param, (device, body, answer)
        status, answer = await control.call("POST", "/api/v1/devices/kiosk-1/revoke", data=b"")
        assert status == 400
        assert answer["error"]["param"] == "body"
        status, answer = await control.call(
            "POST", "/api/v1/devices/kiosk-1/revoke", json={}, auth=False
        )
        assert status == 401
        assert (await revoke(control, "kiosk-1"))["created"] is True  # none of the above did


class TestWhatARevokedDeviceSends:
    async def test_everything_it_sends_is_refused_and_other_devices_are_stored(
        self, start_control: StartControl
    ):
        """After the revocation, kiosk-1's presence, state, telemetry, event and result are
        refused with device_revoked and leave no trace; kiosk-2's telemetry is stored."""
        control = await start_control()
        revoked = await control.device("kiosk-1")
        other = await control.device("kiosk-2")
        await known(control, "kiosk-1", "kiosk-2")
        await revoke(control, "kiosk-1")
        _, before = await control.call("GET", "/api/v1/devices/kiosk-1")
        await revoked.send_telemetry()
        await revoked.send_state()
        await revoked.publish(Presence(PresenceStatus.ONLINE, "sim-1.0"), retain=True)
        await revoked.emit(JobResult(job_id="f" * 32, state=JobOutcome.FAILED))
        await revoked.event(EventKind.INSTALLED, None, model="m@1")
        await other.send_telemetry()

        async def settled() -> bool:
            _, page = await control.call("GET", "/api/v1/telemetry", params={"device": "kiosk-2"})
            return bool(page["data"]) and await refused(control, "device_revoked") >= 5

        await until(settled)
        _, after = await control.call("GET", "/api/v1/devices/kiosk-1")
        assert after["last_seen"] == before["last_seen"]
        assert after["recent_events"] == before["recent_events"] == []
        assert after["recent_telemetry"] == before["recent_telemetry"] == []
        _, page = await control.call("GET", "/api/v1/telemetry", params={"device": "kiosk-1"})
        assert page["data"] == []


class TestRolloutsAndJobs:
    async def test_a_revoked_device_leaves_its_rollout_and_the_wave_passes_without_it(
        self, start_control: StartControl
    ):
        """kiosk-1 holds the wave (activating); revoked, its row is revoked, not eligible, and
        the wave passes on kiosk-2. Its late activation is refused and moves nothing; a new
        rollout for it alone selects nothing."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        slow = await control.device("kiosk-1", behaviour=Behaviour(outcome=STOP_AT_INSTALLED))
        await control.device("kiosk-2")
        await known(control, "kiosk-1", "kiosk-2")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_states(control, rollout["id"], {"kiosk-1": "activating", "kiosk-2": "succeeded"})
        answer = await revoke(control, "kiosk-1", reason="stolen")
        assert answer["rollouts"] == [rollout["id"]]
        assert answer["desired_cleared"] is True
        done = await wait_state(control, rollout["id"], "completed")
        assert states(done) == {"kiosk-1": "revoked", "kiosk-2": "succeeded"}
        row = next(r for r in done["devices"] if r["id"] == "kiosk-1")
        assert row["reason"] == "revoked: stolen"
        tally = done["waves"][0]["tally"]
        assert (tally["devices"], tally["eligible"], tally["succeeded"]) == (2, 1, 1)
        already = await refused(control, "device_revoked")
        slow.behaviour.outcome = SUCCEED
        await slow.apply(slow.desired[-1])  # it switched anyway and says so: refused

        async def activation_refused() -> bool:
            return await refused(control, "device_revoked") > already

        await until(activation_refused)
        await control.step()
        _, after = await control.call("GET", f"/api/v1/rollouts/{rollout['id']}")
        assert states(after) == {"kiosk-1": "revoked", "kiosk-2": "succeeded"}
        status, body = await control.call(
            "POST", "/api/v1/rollouts", json={"model": "m@1", "selector": {"devices": ["kiosk-1"]}}
        )
        assert status == 422, body
        assert body["error"]["code"] == "empty_selection"

    async def test_its_jobs_are_cancelled_and_its_desired_state_is_gone_from_the_broker(
        self, start_control: StartControl
    ):
        """The job it never answered is cancelled (the other device's result stands), its late
        result is refused, a new job cannot select it, and a client that subscribes to its
        retained desired state gets nothing while another device's is still served."""
        control = await start_control(clock=manual_clock())
        await push(control, "m", "1")
        quiet = await control.device("kiosk-1", behaviour=Behaviour(answer_jobs=False))
        await control.device("kiosk-2")
        await known(control, "kiosk-1", "kiosk-2")
        rollout = await create(control, model="m@1", selector={"all": True}, waves="rest")
        await wait_state(control, rollout["id"], "completed")
        status, job = await control.call(
            "POST",
            "/api/v1/jobs",
            json={"request": {"prompt": "hi", "max_tokens": 4}, "selector": {"all": True}},
        )
        assert status == 201, job

        async def job_states() -> dict[str, str]:
            _, found = await control.call("GET", f"/api/v1/jobs/{job['id']}")
            return {d["device"]: d["state"] for d in found["devices"]}

        async def answered() -> bool:
            return (await job_states()).get("kiosk-2") == "succeeded" and bool(quiet.jobs)

        await until(answered)
        answer = await revoke(control, "kiosk-1")
        assert answer["jobs_cancelled"] == [job["id"]]
        assert await job_states() == {"kiosk-1": "cancelled", "kiosk-2": "succeeded"}
        already = await refused(control, "device_revoked")
        job_message_id = quiet.jobs[0][0]
        await quiet.emit(JobResult(job_id=job_message_id, state=JobOutcome.SUCCEEDED))

        async def result_refused() -> bool:
            return await refused(control, "device_revoked") > already

        await until(result_refused)
        assert await job_states() == {"kiosk-1": "cancelled", "kiosk-2": "succeeded"}
        status, body = await control.call(
            "POST",
            "/api/v1/jobs",
            json={"request": {"prompt": "hi"}, "selector": {"devices": ["kiosk-1"]}},
        )
        assert status == 422, body
        assert await retained_desired(control, ["kiosk-1", "kiosk-2"]) == ["kiosk-2"]


async def retained_desired(control: Running, devices: list[str]) -> list[str]:
    """The devices whose retained desired state a new subscriber gets, subscribing to each in
    turn; the last device must have one (it marks the end of what the broker sends)."""
    settings = MqttSettings(
        host="127.0.0.1",
        port=control.port,
        client_id="observer",
        clean_start=True,
        session_expiry_s=0,
    )
    client = MqttClient(settings)
    await client.start()
    try:
        await asyncio.wait_for(client.wait_connected(), DEADLINE_S)
        topics = {
            Topic.for_device(control.fleet.name, d, Channel.DESIRED).value: d for d in devices
        }
        for topic in topics:
            await client.subscribe([(topic, 1)])
        found = []
        async with asyncio.timeout(DEADLINE_S):
            async for message in client.messages():
                client.ack(message)
                if message.payload:
                    found.append(topics[message.topic])
                if message.topic == list(topics)[-1]:
                    return found
        raise AssertionError("the message stream ended")
    finally:
        await client.stop()


class TestFleetCli:
    async def test_fleet_devices_revoke_prints_json_for_scripts_and_a_line_for_people(
        self, start_control: StartControl
    ):
        """`edgelm fleet devices revoke ID --json` prints the control plane's answer; without
        --json, one line says what happened; a second run says it was revoked before."""
        control = await start_control()
        first = await cli(control, "kiosk-1", "--reason", "lost", "--json")
        assert first.returncode == 0, first.stderr
        answer = json.loads(first.stdout)
        assert (answer["device"], answer["reason"], answer["created"]) == ("kiosk-1", "lost", True)
        again = await cli(control, "kiosk-1")
        assert again.returncode == 0, again.stderr
        assert again.stdout == ""
        assert "kiosk-1 was revoked before" in again.stderr
        bad = await cli(control, "kiosk/1", "--json")
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["error"]["reference"] == "invalid-device-id"


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


async def cli(control: Running, device: str, *args: str) -> CliResult:
    """``edgelm fleet devices revoke`` as a subprocess (the control plane runs in this loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgelm_cli",
        "fleet",
        "devices",
        "revoke",
        device,
        "--control",
        control.url,
        "--token",
        control.fleet.token,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE_S)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())
