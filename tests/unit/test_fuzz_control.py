"""Fuzzing the control plane's receiver: :meth:`Ingestor.accept` with hostile messages.

``accept`` is where every inbound message is decoded and dispatched: refused (logged with its
code, counted in ``edgelm_control_messages_refused{code}``, acknowledged to the broker), or
queued for the store. Telemetry is queued raw and decoded in batches
(:func:`~edgelm_control.fleet.decoder.decode_telemetry`), so a telemetry case also runs the
decoding step. No broker and no database: the link is a fake that records acknowledgements,
and the accepted messages go through the pure :func:`~edgelm_control.fleet.batch.build_batch`
that turns them into rows. For each case:

* no exception leaves ``accept`` or the telemetry decoding;
* a message :func:`~edgelm_protocol.decode` refuses is counted once under the refusal's
  code, acknowledged once, logged with the code and a reason that is safe to write, and not
  queued; one on another fleet's topic or on a channel the control plane sends on (``desired``,
  ``jobs``, ``ack``, ``announce``) is refused as ``not_my_topic``;
* a message that decodes is queued once, unacknowledged until stored, and becomes rows;
* after the case, a valid presence is still queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edgelm_control.clock import ManualClock
from edgelm_control.fleet.batch import build_batch
from edgelm_control.fleet.ingest import DURABLE_TYPES, Ingestor
from edgelm_control.metrics import ControlMetrics
from edgelm_protocol import (
    Ack,
    Announce,
    Body,
    Channel,
    DesiredDocument,
    MessageType,
    Presence,
    PresenceStatus,
    RemoteJob,
    Topic,
    decode,
    encode,
    new_envelope,
)
from edgelm_protocol.mqtt.messages import InboundMessage
from tests.unit.test_fuzz_mutations import (
    Case,
    count_case,
    fuzz_settings,
    hostile_cases,
    verdict,
)

FLEET, DEVICE, OTHER = "acme", "kiosk-1", "kiosk-2"
RECEIVED = frozenset({Channel.PRESENCE, Channel.STATE, Channel.TELEMETRY, Channel.EVENTS})


class FakeLink:
    """The part of :class:`~edgelm_control.fleet.link.FleetLink` that ``accept`` uses."""

    fleet = FLEET

    def __init__(self) -> None:
        self.acked: list[InboundMessage] = []

    def ack(self, message: InboundMessage) -> bool:
        self.acked.append(message)
        return True


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def ingestor() -> tuple[Ingestor, FakeLink, ControlMetrics]:
    link, metrics = FakeLink(), ControlMetrics()
    receiver = Ingestor(
        store=None,  # type: ignore[arg-type]  # accept() never stores
        link=link,  # type: ignore[arg-type]
        clock=ManualClock(),
        metrics=metrics,
        batch_max=100,
        flush_interval_s=0,
    )
    return receiver, link, metrics


def refused(metrics: ControlMetrics, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "edgelm_control_messages_refused_total", {"code": code}
    )
    return value or 0.0


def receive(loop: asyncio.AbstractEventLoop, receiver: Ingestor, message: InboundMessage) -> None:
    """What the service does with one message: accept it, and decode it if it is telemetry."""
    receiver.accept(message)
    if receiver._raw:
        loop.run_until_complete(receiver._decode_waiting())


def expected_code(topic: str, payload: bytes) -> str | None:
    """What the control plane must refuse ``payload`` on ``topic`` with, or ``None``."""
    try:
        parsed = Topic.parse(topic)
    except Exception:
        return "invalid_topic"
    if parsed.fleet != FLEET or parsed.channel not in RECEIVED:
        return "not_my_topic"
    return verdict(topic, payload)


def topics_for(message_type: MessageType) -> st.SearchStrategy[str]:
    """Mostly the type's topic for the sending device; also other devices', other fleets',
    the channels the control plane sends on, and junk."""
    own = Topic.for_type(FLEET, DEVICE, message_type).value
    elsewhere = st.sampled_from(
        [
            *(Topic.for_device(FLEET, DEVICE, c).value for c in Channel if c != Channel.ANNOUNCE),
            Topic.for_type(FLEET, OTHER, message_type).value,
            Topic.for_type("other", DEVICE, message_type).value,
            Topic.announce(FLEET).value,
            f"edgelm/v1/{FLEET}/dev/+/state",
            f"edgelm/v1/{FLEET}/dev/#",
            f"edgelm/v1/{FLEET}/dev/{DEVICE}/state/x",
            "$SYS/broker/uptime",
            "",
            "\ud800",
            "edgelm/v1/acme/dev/\x00/state",
        ]
    )
    return st.just(own) | st.just(own) | elsewhere | st.text(max_size=60)


def check_logged_safely(logs: Sequence[Mapping[str, Any]]) -> None:
    for entry in logs:
        for value in entry.values():
            str(value).encode("utf-8")  # a lone surrogate would break the log pipeline


def check_still_working(loop: asyncio.AbstractEventLoop, receiver: Ingestor, serial: int) -> None:
    before = len(receiver._pending)
    presence = Presence(PresenceStatus.ONLINE, "1.0")
    new_id = f"{serial:032x}"
    payload = encode(new_envelope(presence, sender=DEVICE, ts_ms=1, new_id=lambda: new_id))
    topic = Topic.for_device(FLEET, DEVICE, Channel.PRESENCE).value
    receive(loop, receiver, InboundMessage(topic, payload, qos=1))
    assert len(receiver._pending) == before + 1


@pytest.mark.parametrize("message_type", list(MessageType), ids=str)
@fuzz_settings(40)
@given(data=st.data())
def test_every_hostile_message_is_refused_once_and_ingest_goes_on(
    loop: asyncio.AbstractEventLoop, message_type: MessageType, data: st.DataObject
) -> None:
    """A few hostile messages of one type in a row: each is refused with its code or queued,
    as its verdict says; nothing raises; a valid presence is queued after them."""
    receiver, link, metrics = ingestor()
    admitted: set[str] = set()
    with capture_logs() as logs:
        for _ in range(data.draw(st.integers(1, 3))):
            case: Case = data.draw(hostile_cases(message_type, DEVICE, OTHER))
            topic = data.draw(topics_for(message_type))
            message = InboundMessage(topic, case.payload, qos=1)
            code = expected_code(topic, case.payload)
            if case.surely_invalid:
                assert code is not None, case.mutation
            acked, queued = len(link.acked), len(receiver._pending)
            count = refused(metrics, code) if code else 0.0
            count_case("control", message_type)
            receive(loop, receiver, message)
            event(f"{message_type}: {code or 'queued'}")
            if code is not None:
                assert refused(metrics, code) == count + 1, (code, case.mutation)
                assert link.acked[acked:] == [message]
                assert len(receiver._pending) == queued
                assert logs[-1]["code"] == code
                assert logs[-1]["reason"]
            else:
                envelope = decode(topic, case.payload)
                repeated = envelope.id in admitted
                admitted.add(envelope.id)
                if repeated and envelope.type not in DURABLE_TYPES:  # QoS 1 redelivery
                    assert link.acked[acked:] == [message]
                    assert len(receiver._pending) == queued
                else:  # queued until stored (events and results again: the store dedupes)
                    assert len(receiver._pending) == queued + 1
                    assert link.acked[acked:] == []
        check_logged_safely(logs)
    build_batch([pending.accepted for pending in receiver._pending], 1)  # the rows, too
    check_still_working(loop, receiver, data.draw(st.integers(1, 2**40)))


CONTROL_BODIES: dict[MessageType, Body] = {
    MessageType.ACK: Ack(ids=("a" * 32,)),
    MessageType.ANNOUNCE: Announce(timestamp_version=1),
    MessageType.DESIRED: DesiredDocument(signed={}, signatures=()),
    MessageType.JOB: RemoteJob(
        request={}, priority=0, ttl_s=None, metadata=None, max_attempts=1, wait_for_model=False
    ),
}


@pytest.mark.parametrize("message_type", list(CONTROL_BODIES), ids=str)
def test_what_the_control_plane_sends_is_not_taken_for_a_device_message(
    loop: asyncio.AbstractEventLoop, message_type: MessageType
) -> None:
    """Found by fuzzing: a valid ``ack``, ``desired`` or ``job`` from ``control`` on a device's
    topic was queued as if the device had sent it, so the device counted as seen. A broker that
    delivers retained messages nobody subscribed to (amqtt does) would do that with every
    retained desired state."""
    receiver, link, metrics = ingestor()
    envelope = new_envelope(CONTROL_BODIES[message_type], sender="control", ts_ms=1)
    topic = Topic.for_type(FLEET, DEVICE, message_type).value
    message = InboundMessage(topic, encode(envelope), qos=1)
    receive(loop, receiver, message)
    assert receiver._pending == []
    assert link.acked == [message]
    assert refused(metrics, "not_my_topic") == 1
