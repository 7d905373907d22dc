"""What devices send, through a real broker into a running control plane.

Every inbound topic (presence, state, telemetry, events) gets malformed, oversized,
wrong-type, wrong-sender, unknown-version and duplicate messages: each is dropped with a log
line naming its code, and the control plane goes on serving the next valid message. Events
and results delivered twice are stored once and acknowledged both times.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from edgelm_control.store.schema import metadata
from edgelm_protocol import (
    Channel,
    EventKind,
    JobOutcome,
    JobResult,
    channel_payload_limit,
    new_message_id,
)
from tests.integration.control.conftest import Running, StartControl, until
from tests.integration.control.simdevice import SimDevice

INBOUND = [Channel.PRESENCE, Channel.STATE, Channel.TELEMETRY, Channel.EVENTS]
PRESENCE_BODY = {"status": "online", "agent_version": "1.0"}


async def count(control: Running, table: str) -> int:
    assert control.service.store is not None
    async with control.service.store.read() as conn:
        query = select(func.count()).select_from(metadata.tables[table])
        return int((await conn.execute(query)).scalar_one())


def envelope(kind: str, sender: str, body: dict[str, Any], **overrides: Any) -> bytes:
    document = {
        "v": 1,
        "id": new_message_id(),
        "type": kind,
        "from": sender,
        "ts_ms": 1,
        "body": body,
    } | overrides
    return json.dumps(document).encode()


def faults(device: str, channel: Channel) -> dict[str, bytes]:
    """One bad payload per fault for ``channel`` of ``device``, keyed by the code expected."""
    wrong_type = "presence" if channel is not Channel.PRESENCE else "telemetry"
    return {
        "malformed_message": b'{"v": 1, "id": "not json',
        "message_too_large": b"x" * (channel_payload_limit(channel) + 1),
        "topic_mismatch": envelope(wrong_type, device, PRESENCE_BODY),
        "unsupported_version": envelope("presence", device, PRESENCE_BODY, v=2),
    }


async def stored(control: Running, table: str, expected: int) -> None:
    async def reached() -> bool:
        return await count(control, table) >= expected

    await until(reached)


class TestRefusedMessages:
    @pytest.mark.parametrize("channel", INBOUND, ids=str)
    async def test_each_fault_is_dropped_with_its_code_and_serving_goes_on(
        self, start_control: StartControl, channel: Channel
    ):
        """Malformed, oversized, wrong-type and unknown-version messages on this topic are
        logged with their code and dropped; a valid message after them is stored."""
        control = await start_control()
        device = await control.device("kiosk-1")
        with capture_logs() as logs:
            for payload in faults("kiosk-1", channel).values():
                await device.publish_raw(channel, payload)
            await device.send_telemetry()
            await stored(control, "telemetry", 1)
        refused = [e for e in logs if e["event"] == "fleet_message_refused"]
        assert {e["code"] for e in refused} == set(faults("kiosk-1", channel))
        assert all(e["log_level"] == "warning" for e in refused)
        assert (await control.call("GET", "/healthz", auth=False))[0] == 200

    @pytest.mark.parametrize("channel", INBOUND, ids=str)
    async def test_a_message_claiming_another_sender_is_dropped(
        self, start_control: StartControl, channel: Channel
    ):
        """``from`` must be the topic's device: kiosk-1 cannot speak for kiosk-2."""
        control = await start_control()
        device = await control.device("kiosk-1")
        impostor = {
            Channel.PRESENCE: envelope("presence", "kiosk-2", PRESENCE_BODY),
            Channel.STATE: device.payload(device.state()).replace(b'"kiosk-1"', b'"kiosk-2"'),
            Channel.TELEMETRY: device.payload(device.telemetry()).replace(
                b'"kiosk-1"', b'"kiosk-2"'
            ),
            Channel.EVENTS: envelope(
                "job_result",
                "kiosk-2",
                {
                    "job_id": new_message_id(),
                    "state": "failed",
                    "metadata": None,
                    "result": None,
                    "error": None,
                },
            ),
        }[channel]
        with capture_logs() as logs:
            await device.publish_raw(channel, impostor)
            await device.send_telemetry()
            await stored(control, "telemetry", 1)
        codes = [e["code"] for e in logs if e["event"] == "fleet_message_refused"]
        assert codes == ["topic_mismatch"]
        assert (await control.call("GET", "/api/v1/devices/kiosk-2"))[0] == 404

    @pytest.mark.parametrize(
        "channel", [Channel.PRESENCE, Channel.STATE, Channel.TELEMETRY], ids=str
    )
    async def test_a_repeated_message_id_is_dropped_as_a_duplicate(
        self, start_control: StartControl, channel: Channel
    ):
        """The same message delivered again is dropped by its id, with a log line."""
        control = await start_control()
        device = await control.device("kiosk-1")
        payload = {
            Channel.PRESENCE: envelope("presence", "kiosk-1", PRESENCE_BODY),
            Channel.STATE: device.payload(device.state()),
            Channel.TELEMETRY: device.payload(device.telemetry()),
        }[channel]
        with capture_logs() as logs:
            await device.publish_raw(channel, payload)
            await device.publish_raw(channel, payload)
            await device.send_telemetry()
            expected = 2 if channel is Channel.TELEMETRY else 1
            await stored(control, "telemetry", expected)
        duplicates = [e for e in logs if e["event"] == "fleet_message_duplicate"]
        assert [e["message_id"] for e in duplicates] == [json.loads(payload)["id"]]
        assert await count(control, "telemetry") == expected


class TestDurableMessages:
    async def test_an_event_delivered_twice_is_stored_once_and_acked_both_times(
        self, start_control: StartControl
    ):
        """A device that resends an event (its ack was lost) gets a second ack; one row."""
        control = await start_control()
        device = await control.device("kiosk-1")
        message_id = await device.event(EventKind.DESIRED_REJECTED, None, reason="test")
        await until(lambda: device.acks[message_id] == 1)
        assert message_id not in device.outbox
        await device.publish_raw(Channel.EVENTS, device.sent[message_id])
        await until(lambda: device.acks[message_id] == 2)
        assert await count(control, "device_events") == 1

    async def test_a_result_delivered_twice_is_stored_once_and_acked_both_times(
        self, start_control: StartControl
    ):
        """A job result sent twice: one stored result, two acks."""
        control = await start_control()
        device = await control.device("kiosk-1")
        payload = device.payload(JobResult(job_id=new_message_id(), state=JobOutcome.FAILED))
        message_id = json.loads(payload)["id"]
        for expected in (1, 2):
            await device.publish_raw(Channel.EVENTS, payload)
            await until(partial(acked, device, message_id, expected))
        assert await count(control, "job_results") == 1

    async def test_presence_follows_the_will(self, start_control: StartControl):
        """A device that drops without a goodbye goes offline through its will."""
        control = await start_control()
        device = await control.device("kiosk-1")

        async def presence_is(value: str) -> bool:
            _, body = await control.call("GET", "/api/v1/devices/kiosk-1")
            return bool(body.get("presence") == value)

        await until(lambda: presence_is("online"))
        await device.stop(will=True)
        await until(lambda: presence_is("offline"))


def acked(device: SimDevice, message_id: str, times: int) -> bool:
    return device.acks[message_id] == times


class TestTelemetryDecoderProcess:
    async def test_telemetry_decoded_in_a_worker_is_checked_the_same_way(
        self, start_control: StartControl
    ):
        """With a decoding process, bad telemetry is still refused with its code, duplicates
        dropped, and good telemetry stored."""
        control = await start_control(ingest_decode_workers=1)
        device = await control.device("kiosk-1")
        good = device.payload(device.telemetry())
        with capture_logs() as logs:
            for payload in faults("kiosk-1", Channel.TELEMETRY).values():
                await device.publish_raw(Channel.TELEMETRY, payload)
            for _ in range(2):
                await device.publish_raw(Channel.TELEMETRY, good)
            for _ in range(20):
                await device.send_telemetry()
            await stored(control, "telemetry", 21)
        refused = {e["code"] for e in logs if e["event"] == "fleet_message_refused"}
        assert refused == set(faults("kiosk-1", Channel.TELEMETRY))
        assert await count(control, "telemetry") == 21
