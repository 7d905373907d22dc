"""The envelope codec: encode and decode, the checks in order, and fuzzing on every topic."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import count
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm_protocol import (
    Ack,
    Announce,
    Channel,
    Envelope,
    Event,
    EventKind,
    InvalidId,
    InvalidTopic,
    MalformedMessage,
    MessageRefused,
    MessageTooLarge,
    MessageType,
    Presence,
    PresenceStatus,
    ProtocolError,
    RemoteJob,
    Topic,
    TopicMismatch,
    UnsupportedVersion,
    channel_payload_limit,
    decode,
    encode,
    new_envelope,
)
from tests.unit.protocol import strategies

ID = "7f0c9a3e5b2d4c1a9e8f7a6b5c4d3e2f"
EVENTS = Topic.for_device("acme", "kiosk-17", Channel.EVENTS)
PRESENCE = Topic.for_device("acme", "kiosk-17", Channel.PRESENCE)
JOBS = Topic.for_device("acme", "kiosk-17", Channel.JOBS)


def event_document(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "v": 1,
        "id": ID,
        "type": "event",
        "from": "kiosk-17",
        "ts_ms": 1795344276123,
        "body": Event(seq=1, kind=EventKind.INSTALLED, model="smollm2@1.0").to_json(),
    }
    value.update(changes)
    return value


def payload_of(document: object) -> bytes:
    return json.dumps(document).encode()


def refused(topic: Topic | str, payload: bytes) -> MessageRefused:
    with pytest.raises(MessageRefused) as caught:
        decode(topic, payload)
    return caught.value


class TestEnvelope:
    def test_type_follows_the_body(self) -> None:
        """An envelope's type is its body's, so the two cannot disagree."""
        envelope = Envelope(id=ID, sender="control", ts_ms=0, body=Announce(3))
        assert envelope.type is MessageType.ANNOUNCE

    @given(bad=strategies.bad_ids())
    def test_bad_senders_are_refused(self, bad: str) -> None:
        """A sender with a wildcard, separator or control character cannot build an envelope."""
        with pytest.raises(InvalidId):
            Envelope(id=ID, sender=bad, ts_ms=0, body=Announce(3))

    @pytest.mark.parametrize("message_id", ["", ID.upper(), ID + "0", "not-hex" * 5])
    def test_bad_ids_are_refused(self, message_id: str) -> None:
        """The id must be 32 lower-case hex characters."""
        with pytest.raises(InvalidId):
            Envelope(id=message_id, sender="control", ts_ms=0, body=Announce(3))

    @pytest.mark.parametrize("ts_ms", [-1, True, 1.5, 2**53])
    def test_bad_timestamps_are_refused(self, ts_ms: object) -> None:
        """ts_ms is a non-negative integer in the JSON-safe range."""
        with pytest.raises(MalformedMessage):
            Envelope(id=ID, sender="control", ts_ms=ts_ms, body=Announce(3))  # type: ignore[arg-type]


class TestNewEnvelope:
    def test_injected_ids_make_envelopes_deterministic(self) -> None:
        """With an id factory and a time passed in, the same calls give the same envelopes."""

        def ids() -> Iterator[str]:
            return (f"{n:032x}" for n in count(1))

        first, second = ids(), ids()
        body = Presence(status=PresenceStatus.ONLINE, agent_version="0.1.0")
        made = [
            new_envelope(body, sender="kiosk-17", ts_ms=5, new_id=lambda: next(first)),
            new_envelope(body, sender="kiosk-17", ts_ms=5, new_id=lambda: next(first)),
        ]
        again = new_envelope(body, sender="kiosk-17", ts_ms=5, new_id=lambda: next(second))
        assert made[0] == again
        assert [envelope.id for envelope in made] == [f"{1:032x}", f"{2:032x}"]

    def test_default_ids_are_fresh(self) -> None:
        """Without injection every envelope gets its own uuid4 hex id."""
        body = Announce(1)
        assert new_envelope(body, sender="control", ts_ms=0).id != (
            new_envelope(body, sender="control", ts_ms=0).id
        )


class TestEncode:
    def test_wire_form_is_compact_utf8_json(self) -> None:
        """Exactly the six keys, no whitespace, non-ASCII text as UTF-8."""
        envelope = Envelope(
            id=ID, sender="kiosk-17", ts_ms=9, body=Presence(PresenceStatus.ONLINE, "0.1-ü")
        )
        assert encode(envelope) == (
            b'{"v":1,"id":"7f0c9a3e5b2d4c1a9e8f7a6b5c4d3e2f","type":"presence",'
            b'"from":"kiosk-17","ts_ms":9,"body":{"status":"online","agent_version":"0.1-\xc3\xbc"}}'
        )

    def test_invalid_bodies_are_refused_before_sending(self) -> None:
        """A sender runs the receiver's checks: a priority of 500 never leaves."""
        envelope = Envelope(id=ID, sender="control", ts_ms=0, body=RemoteJob({}, priority=500))
        with pytest.raises(MalformedMessage) as caught:
            encode(envelope)
        assert caught.value.field == "body.priority"

    def test_lone_surrogates_are_refused_before_sending(self) -> None:
        """A body holding a lone surrogate is refused by path, not by a UnicodeEncodeError."""
        body = RemoteJob({"messages": [{"content": "hi \ud800"}]})
        with pytest.raises(MalformedMessage, match="lone surrogate") as caught:
            encode(Envelope(id=ID, sender="control", ts_ms=0, body=body))
        assert caught.value.field == "body.request.messages[0].content"

    def test_oversized_payloads_are_refused_before_sending(self) -> None:
        """A 300 KiB job is over the 256 KiB limit for jobs."""
        body = RemoteJob({"prompt": "x" * 300_000})
        with pytest.raises(MessageTooLarge) as caught:
            encode(Envelope(id=ID, sender="control", ts_ms=0, body=body))
        assert caught.value.limit_bytes == 256 * 1024

    @pytest.mark.parametrize(
        ("sender", "body"),
        [("kiosk-17", Ack((ID,))), ("control", Presence(PresenceStatus.ONLINE, "1"))],
    )
    def test_senders_must_match_the_direction(self, sender: str, body: Ack | Presence) -> None:
        """A device cannot encode an ack and the control plane cannot encode a presence."""
        with pytest.raises(TopicMismatch) as caught:
            encode(Envelope(id=ID, sender=sender, ts_ms=0, body=body))
        assert caught.value.field == "from"


class TestDecode:
    @pytest.mark.parametrize("message_type", list(MessageType))
    @given(data=st.data())
    def test_round_trip_for_every_type(
        self, message_type: MessageType, data: st.DataObject
    ) -> None:
        """decode(topic, encode(envelope)) gives the envelope back, for every body type."""
        topic, envelope = data.draw(strategies.addressed_envelopes(message_type))
        assert decode(topic, encode(envelope)) == envelope
        assert decode(topic.value, encode(envelope)) == envelope

    def test_errors_carry_the_topic(self) -> None:
        """Every refusal says which topic the message came in on."""
        error = refused(EVENTS, b"{")
        assert error.topic == EVENTS.value
        assert str(error).startswith(f"message on '{EVENTS.value}'")

    def test_unknown_topics_are_refused(self) -> None:
        """A payload on a foreign topic is refused before it is read."""
        error = refused("edgelm/v1/acme/dev/kiosk-17/reboot", payload_of(event_document()))
        assert isinstance(error, InvalidTopic)

    def test_size_is_checked_before_parsing(self) -> None:
        """A payload over the channel's limit is refused without being parsed as JSON."""
        error = refused(PRESENCE, b"\xff" * 1025)
        assert isinstance(error, MessageTooLarge)
        assert (error.size_bytes, error.limit_bytes) == (1025, 1024)

    def test_events_channel_allows_job_result_size_until_the_type_is_known(self) -> None:
        """The events channel takes 256 KiB before parsing, then the event's own 16 KiB."""
        assert channel_payload_limit(Channel.EVENTS) == 256 * 1024
        padded = b"{" + b" " * 20_000 + payload_of(event_document())[1:]
        error = refused(EVENTS, padded)
        assert isinstance(error, MessageTooLarge)
        assert error.limit_bytes == 16 * 1024

    def test_unknown_versions_have_their_own_error(self) -> None:
        """v 2 is UnsupportedVersion even when the rest is v2-shaped."""
        error = refused(EVENTS, payload_of({"v": 2, "whatever": "v2 looks like"}))
        assert isinstance(error, UnsupportedVersion)
        assert (error.version, error.code) == (2, "unsupported_version")

    @pytest.mark.parametrize("version", ["1", True, 1.0, None])
    def test_versions_must_be_integers(self, version: object) -> None:
        """A version that is not an integer is malformed, not unsupported."""
        error = refused(EVENTS, payload_of(event_document(v=version)))
        assert isinstance(error, MalformedMessage)
        assert error.field == "v"

    def test_missing_and_unknown_keys_are_refused(self) -> None:
        """The envelope has exactly six keys."""
        document = event_document()
        del document["ts_ms"]
        assert refused(EVENTS, payload_of(document)).field == "ts_ms"
        assert refused(EVENTS, payload_of(event_document(extra=1))).field == "extra"

    def test_type_must_be_one_the_topic_carries(self) -> None:
        """A presence on the events topic is a TopicMismatch."""
        document = event_document(type="presence", body={"status": "online", "agent_version": "1"})
        error = refused(EVENTS, payload_of(document))
        assert isinstance(error, TopicMismatch)
        assert (error.field, error.actual) == ("type", "presence")

    def test_unknown_types_are_malformed(self) -> None:
        """A type the protocol does not define is refused by field."""
        assert refused(EVENTS, payload_of(event_document(type="reboot"))).field == "type"

    def test_device_messages_must_come_from_the_topic_device(self) -> None:
        """kiosk-18 cannot speak on kiosk-17's topic, even if the broker let it publish."""
        error = refused(EVENTS, payload_of(event_document(**{"from": "kiosk-18"})))
        assert isinstance(error, TopicMismatch)
        assert (error.field, error.actual) == ("from", "kiosk-18")

    def test_control_messages_must_come_from_control(self) -> None:
        """A job claiming to come from a device is refused."""
        document = {
            "v": 1, "id": ID, "type": "job", "from": "kiosk-17", "ts_ms": 0,
            "body": RemoteJob({"prompt": "hi"}).to_json(),
        }  # fmt: skip
        error = refused(JOBS, payload_of(document))
        assert isinstance(error, TopicMismatch)
        document["from"] = "control"
        assert decode(JOBS, payload_of(document)).body == RemoteJob({"prompt": "hi"})

    @given(bad=strategies.bad_ids())
    def test_bad_sender_ids_are_refused(self, bad: str) -> None:
        """A from with a wildcard, separator or control character never decodes."""
        with pytest.raises(MessageRefused):
            decode(EVENTS, payload_of(event_document(**{"from": bad})))

    def test_body_errors_name_their_path_under_body(self) -> None:
        """body.seq, not seq, so the log says where in the message the fault is."""
        body = Event(seq=1, kind=EventKind.INSTALLED).to_json() | {"seq": -1}
        error = refused(EVENTS, payload_of(event_document(body=body)))
        assert error.field == "body.seq"
        assert error.topic == EVENTS.value

    def test_duplicate_keys_are_refused(self) -> None:
        """A second "from" cannot override the first."""
        payload = payload_of(event_document())[:-1] + b', "from": "kiosk-18"}'
        assert "duplicate key 'from'" in refused(EVENTS, payload).reason

    def test_non_object_payloads_are_refused(self) -> None:
        """A JSON array is not an envelope."""
        assert "must be a JSON object" in refused(EVENTS, b"[1]").reason

    def test_memoryview_payloads_are_read(self) -> None:
        """A buffer from the network layer decodes like bytes."""
        payload = payload_of(event_document())
        assert decode(EVENTS, memoryview(payload)) == decode(EVENTS, payload)  # type: ignore[arg-type]

    def test_str_payloads_are_a_caller_error(self) -> None:
        """Passing text instead of bytes is a TypeError, not a wire error."""
        with pytest.raises(TypeError):
            decode(EVENTS, "{}")  # type: ignore[arg-type]


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[Topic, object]:
    """A valid envelope document with one field replaced, removed or added, on any topic."""
    topic, envelope = draw(strategies.addressed_envelopes())
    document: dict[str, Any] = envelope.to_json()
    body = document["body"]
    # The body first: hypothesis prefers early choices, and the body is where the deep checks are.
    target = draw(st.sampled_from([body, document]))
    if target:
        key = draw(st.sampled_from(list(target)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            target[key] = draw(strategies.hostile_json_values)
        elif action == "delete":
            del target[key]
        else:
            target[draw(st.text(max_size=8))] = draw(strategies.hostile_json_values)
    if draw(st.booleans()):
        topic = draw(strategies.topics())
    return topic, document


def assert_decodes_or_refuses(topic: Topic, payload: bytes) -> None:
    """decode returns an Envelope or raises a ProtocolError; anything else fails the test."""
    try:
        outcome: Envelope | ProtocolError = decode(topic, payload)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.code
        assert str(outcome).isascii()
    else:
        assert decode(topic, encode(outcome)) == outcome  # what decodes also re-encodes


class TestDecodeFuzz:
    @settings(max_examples=300)
    @given(topic=strategies.topics(), payload=st.binary(max_size=4096))
    def test_arbitrary_bytes(self, topic: Topic, payload: bytes) -> None:
        """Any bytes on any topic decode or raise a ProtocolError, never anything else."""
        assert_decodes_or_refuses(topic, payload)

    @settings(max_examples=300)
    @given(topic=strategies.topics(), value=strategies.hostile_json_values)
    def test_arbitrary_json_values(self, topic: Topic, value: object) -> None:
        """Any JSON text (NaN, surrogate escapes included) on any topic decodes or refuses."""
        assert_decodes_or_refuses(topic, json.dumps(value).encode())

    @settings(max_examples=300)
    @given(case=mutated_documents())
    def test_near_valid_envelopes(self, case: tuple[Topic, object]) -> None:
        """Valid envelopes with one field broken reach the deep checks and still only refuse."""
        topic, document = case
        assert_decodes_or_refuses(topic, json.dumps(document).encode())
