"""The sync session, driven without sockets or clocks: messages in, actions out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.jobs.outbox import MessageKind, OutboxMessage
from edgelm_agent.sync.session import (
    AckInbound,
    ApplyDesired,
    DeleteOutbox,
    Dropped,
    EnqueueJob,
    Publish,
    PublishState,
    Refresh,
    RefreshForKey,
    ReportEvent,
    Subscribe,
    SyncSession,
)
from edgelm_protocol import (
    Ack,
    DesiredDocument,
    DesiredState,
    Event,
    EventKind,
    JobResult,
    Presence,
    PresenceStatus,
    RemoteJob,
    TargetRef,
    decode,
    encode,
    new_envelope,
    sign_desired,
)
from edgelm_protocol.bodies import Announce
from edgelm_protocol.signing import DirectorKeys
from edgelm_protocol.topics import Channel, Topic

FLEET, DEVICE = "acme", "kiosk-1"
NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
TARGET = TargetRef(path="models/tiny/1.0/model.gguf", length=1234, sha256="ab" * 32)


def keys(key: Ed25519PrivateKey = KEY) -> DirectorKeys:
    return DirectorKeys.from_pem(
        [
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ]
    )


def session(**kwargs: Any) -> SyncSession:
    return SyncSession(fleet=FLEET, device=DEVICE, keys=keys(), agent_version="0.1", **kwargs)


def topic(channel: Channel, device: str = DEVICE) -> str:
    return Topic.for_device(FLEET, device, channel).value


def desired(
    sequence: int,
    *,
    device: str = DEVICE,
    fleet: str = FLEET,
    expires: int = NOW + 3600,
    key: Ed25519PrivateKey = KEY,
) -> bytes:
    state = DesiredState(
        fleet=fleet,
        device=device,
        sequence=sequence,
        issued_at=NOW - 10,
        expires=expires,
        rollout="ro-1",
        target=TARGET,
    )
    body = DesiredDocument.from_json(sign_desired(state, key))
    return encode(new_envelope(body, sender="control", ts_ms=NOW * 1000))


def from_control(body: Any) -> bytes:
    return encode(new_envelope(body, sender="control", ts_ms=NOW * 1000))


def message(kind: MessageKind, body: dict[str, Any], seq: int = 1) -> OutboxMessage:
    return OutboxMessage(seq=seq, id=f"{seq:032x}", kind=kind, body=body, created_at=NOW)


RESULT: dict[str, Any] = {
    "job_id": "a" * 32,
    "state": "succeeded",
    "metadata": None,
    "result": {},
    "error": None,
}
EVENT = {
    "kind": "activated",
    "model": "tiny@1.0",
    "desired_sequence": 3,
    "rollout": None,
    "reason": None,
    "health": {"tokens_per_s": 40.0, "ttft_ms": 12.5},
    "progress": None,
}
TELEMETRY = {
    "window_s": 60.0,
    "model": None,
    "requests": 0,
    "errors": 0,
    "tokens_per_s": {"p50": None, "p90": None},
    "ttft_ms": {"p50": None, "p90": None},
    "queue_depth": 0,
    "cpu_percent": None,
    "memory_bytes": None,
    "memory_total_bytes": None,
    "disk_free_bytes": None,
    "temperature_c": None,
}


class TestConnection:
    def test_connecting_subscribes_says_online_and_publishes_state(self):
        """On connect: subscribe to desired, jobs, ack and announce; presence online, retained."""
        s = session()
        subscribe, presence, state = s.on_connected(NOW * 1000)
        assert isinstance(subscribe, Subscribe)
        assert {f for f, _ in subscribe.filters} == {
            topic(Channel.DESIRED),
            topic(Channel.JOBS),
            topic(Channel.ACK),
            Topic.announce(FLEET).value,
        }
        assert isinstance(presence, Publish)
        assert presence.retain
        body = decode(presence.topic, presence.payload).body
        assert isinstance(body, Presence)
        assert body.status == "online"
        assert isinstance(state, PublishState)


class TestDesiredStates:
    def test_a_valid_desired_state_is_applied_and_acknowledged(self):
        """Signed by the director, for this device, newer, unexpired: apply it."""
        s = session()
        apply, ack = s.on_message(topic(Channel.DESIRED), desired(1), "t", NOW)
        assert isinstance(apply, ApplyDesired)
        assert apply.state.sequence == 1
        assert ack == AckInbound("t")

    def test_the_retained_copy_of_what_was_applied_is_ignored_quietly(self):
        """The broker replays the retained desired state at every connect: nothing happens."""
        s = session(applied_sequence=4)
        assert s.on_message(topic(Channel.DESIRED), desired(4), "t", NOW) == [AckInbound("t")]

    def test_a_newer_state_supersedes_the_one_in_progress(self):
        """Latest wins: a newer sequence is applied while an older one is still running."""
        s = session()
        s.on_message(topic(Channel.DESIRED), desired(1), "t", NOW)
        (apply, _) = s.on_message(topic(Channel.DESIRED), desired(2), "u", NOW)
        assert isinstance(apply, ApplyDesired)
        assert apply.state.sequence == 2
        assert s.in_progress is not None
        assert s.in_progress.sequence == 2

    @pytest.mark.parametrize(
        ("payload", "code"),
        [
            (lambda: desired(3, key=Ed25519PrivateKey.generate()), "forged_desired_state"),
            (lambda: desired(2), "stale_desired_state"),  # replayed: older than applied 3
            (lambda: desired(5, device="kiosk-2"), "wrong_device"),
            (lambda: desired(5, fleet="other"), "wrong_device"),
            (lambda: desired(5, expires=NOW - 1), "expired_desired_state"),
        ],
    )
    def test_attacks_are_refused_reported_and_acknowledged(self, payload, code):
        """A forged, replayed, misdirected or expired desired state is never applied; the
        refusal is reported to the control plane and the message is acknowledged."""
        s = session(applied_sequence=3)
        actions = s.on_message(topic(Channel.DESIRED), payload(), "t", NOW)
        for ask in [a for a in actions if isinstance(a, RefreshForKey)]:
            # An unknown key is looked for in a refreshed root first; no root names it here.
            actions = [*s.retry_desired(ask.topic, ask.document, NOW), *actions[1:]]
        assert not any(isinstance(a, ApplyDesired) for a in actions)
        [dropped] = [a for a in actions if isinstance(a, Dropped)]
        assert dropped.code == code
        [report] = [a for a in actions if isinstance(a, ReportEvent)]
        assert report.kind == EventKind.DESIRED_REJECTED
        assert code in (report.reason or "")
        assert actions[-1] == AckInbound("t")
        assert s.in_progress is None

    def test_expiry_is_judged_at_the_last_known_good_time_when_the_clock_fell_back(self):
        """A Pi without an RTC boots in 1970: a state issued after the last one applied, but
        expired before it was, is refused as expired, not applied on the strength of the
        wrong clock."""
        s = session(applied_sequence=3)
        s.on_message(topic(Channel.DESIRED), desired(4), "t", NOW)
        s.on_desired_done(4, issued_at=NOW, now_s=NOW)
        assert s.known_good_s == NOW
        old_but_unseen = desired(5, expires=NOW - 5)  # expired before the last one was issued
        actions = s.on_message(topic(Channel.DESIRED), old_but_unseen, "t", 0)  # clock at 1970
        [dropped] = [a for a in actions if isinstance(a, Dropped)]
        assert dropped.code == "expired_desired_state"
        assert s.in_progress is None

    def test_a_state_from_a_director_clock_far_ahead_moves_known_good_a_day_at_most(self):
        """One state signed a year in the future must not make every later, correctly dated
        state look expired: the last-known-good time moves a day past our clock at most."""
        s = session()
        s.on_desired_done(4, issued_at=NOW + 365 * 86400, now_s=NOW)
        assert s.known_good_s == NOW + 86400
        actions = s.on_message(
            topic(Channel.DESIRED), desired(5, expires=NOW + 7 * 86400), "t", NOW
        )
        assert isinstance(actions[0], ApplyDesired)

    def test_a_release_is_applied_like_any_desired_state(self):
        """A signed state with no target reaches the shell (which undoes the rollout)."""
        state = DesiredState(FLEET, DEVICE, 9, NOW - 10, NOW + 60, "ro-1", None)
        payload = from_control(DesiredDocument.from_json(sign_desired(state, KEY)))
        actions = session().on_message(topic(Channel.DESIRED), payload, "t", NOW)
        assert actions == [ApplyDesired(state), AckInbound("t")]

    def test_done_moves_the_applied_sequence(self):
        """After a desired state is done, its replay is ignored and an older one refused."""
        s = session()
        s.on_message(topic(Channel.DESIRED), desired(7), "t", NOW)
        s.on_desired_done(7)
        assert s.applied_sequence == 7
        assert s.in_progress is None
        assert s.on_message(topic(Channel.DESIRED), desired(7), "t", NOW) == [AckInbound("t")]


class TestInbound:
    def test_a_remote_job_is_left_unacknowledged_for_the_shell(self):
        """A job is handed over to be committed; the shell acknowledges it after the commit."""
        s = session()
        job = RemoteJob(request={"model": "m", "prompt": "p"})
        actions = s.on_message(topic(Channel.JOBS), from_control(job), "t", NOW)
        [enqueue] = actions
        assert isinstance(enqueue, EnqueueJob)
        assert enqueue.job == job
        assert enqueue.token == "t"

    def test_an_ack_deletes_the_messages_it_names(self):
        """The control plane's ack removes exactly the messages it names from the outbox."""
        s = session()
        ids = ("1" * 32, "2" * 32)
        actions = s.on_message(topic(Channel.ACK), from_control(Ack(ids=ids)), "t", NOW)
        assert actions == [DeleteOutbox(ids), AckInbound("t")]

    def test_a_duplicate_is_acknowledged_and_not_acted_on(self):
        """QoS 1 may deliver twice: the second copy only gets acknowledged."""
        s = session()
        payload = from_control(Announce(timestamp_version=3))
        topic_name = Topic.announce(FLEET).value
        assert s.on_message(topic_name, payload, "t", NOW) == [Refresh(3), AckInbound("t")]
        assert s.on_message(topic_name, payload, "u", NOW) == [AckInbound("u")]

    @given(payload=st.binary(max_size=600), channel=st.sampled_from(list(Channel)))
    def test_nothing_received_raises(self, payload, channel):
        """Whatever bytes arrive on whatever topic, the session answers with actions, ending
        with the message's acknowledgement unless it is a job to commit."""
        s = session()
        name = Topic.announce(FLEET).value if channel == Channel.ANNOUNCE else topic(channel)
        actions = s.on_message(name, payload, "t", NOW)
        assert actions
        assert isinstance(actions[-1], AckInbound | EnqueueJob)

    @given(document=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8)))
    def test_malformed_json_on_every_inbound_topic_is_dropped(self, document):
        """A JSON object that is not an envelope is dropped with a reason and acknowledged."""
        s = session()
        for channel in (Channel.DESIRED, Channel.JOBS, Channel.ACK):
            actions = s.on_message(topic(channel), json.dumps(document).encode(), "t", NOW)
            assert isinstance(actions[0], Dropped)
            assert actions[-1] == AckInbound("t")

    def test_another_devices_messages_are_dropped_and_acknowledged(self):
        """A broker that misroutes (amqtt replays other clients' retained messages) cannot
        make this device act on, or even reject, another device's desired state."""
        s = session()
        actions = s.on_message(topic(Channel.DESIRED, "kiosk-other"), desired(1), "t", NOW)
        assert [type(a) for a in actions] == [Dropped, AckInbound]
        assert isinstance(actions[0], Dropped)
        assert actions[0].code == "not_my_topic"
        assert s.in_progress is None

    def test_a_valid_message_of_a_type_devices_do_not_take_is_still_acknowledged(self):
        """A well-formed presence delivered on our own topic (we never subscribe to it) is
        dropped and acknowledged, so it does not hold an in-flight slot for ever."""
        s = SyncSession(fleet=FLEET, device=DEVICE, keys=keys(), agent_version="0.1")
        presence_topic = topic(Channel.PRESENCE)
        s._inbound_topics = s._inbound_topics | {presence_topic}
        payload = s.presence(PresenceStatus.ONLINE, NOW * 1000)
        actions = s.on_message(presence_topic, payload, "t", NOW)
        assert [type(a) for a in actions] == [Dropped, AckInbound]
        assert isinstance(actions[0], Dropped)
        assert actions[0].code == "unexpected_type"


class TestOutbound:
    def test_nothing_is_sent_while_disconnected(self):
        """Offline, the outbox just waits."""
        s = session()
        assert s.on_outbox([message(MessageKind.RESULT, RESULT)], NOW) == []

    def test_each_kind_goes_to_its_topic_with_the_outbox_id(self):
        """Results and events go on events, telemetry on telemetry; the envelope id is the
        outbox message's id, which the control plane acknowledges."""
        s = session()
        s.on_connected(NOW * 1000)
        batch = [
            message(MessageKind.RESULT, RESULT, 1),
            message(MessageKind.EVENT, EVENT, 2),
            message(MessageKind.TELEMETRY, TELEMETRY, 3),
        ]
        sent = s.on_outbox(batch, NOW)
        assert [p.topic for p in sent if isinstance(p, Publish)] == [
            topic(Channel.EVENTS),
            topic(Channel.EVENTS),
            topic(Channel.TELEMETRY),
        ]
        envelopes = [decode(p.topic, p.payload) for p in sent if isinstance(p, Publish)]
        assert [e.id for e in envelopes] == [m.id for m in batch]
        event = envelopes[1].body
        assert isinstance(event, Event)
        assert event.seq == 2  # the event's sequence is the outbox's

    def test_durable_messages_wait_for_the_control_planes_ack_then_go_again(self):
        """A result is not resent before the ack timeout, is resent after it, and goes only
        when an ack names it; telemetry goes on PUBACK."""
        s = session(ack_timeout_s=30)
        s.on_connected(NOW * 1000)
        result = message(MessageKind.RESULT, RESULT, 1)
        telemetry = message(MessageKind.TELEMETRY, TELEMETRY, 2)
        assert len(s.on_outbox([result, telemetry], NOW)) == 2
        assert s.on_published(result) == []
        assert s.on_published(telemetry) == [DeleteOutbox((telemetry.id,))]
        assert s.on_outbox([result], NOW + 10) == []
        assert len(s.on_outbox([result], NOW + 31)) == 1

    def test_a_reconnect_sends_unacknowledged_messages_again(self):
        """After a reconnect everything still in the outbox goes again at once."""
        s = session()
        s.on_connected(NOW * 1000)
        result = message(MessageKind.RESULT, RESULT, 1)
        s.on_outbox([result], NOW)
        s.on_disconnected()
        s.on_connected(NOW * 1000)
        assert len(s.on_outbox([result], NOW + 1)) == 1

    def test_a_result_too_large_for_a_message_still_reports_how_the_job_ended(self):
        """A result over the protocol's limit is sent as a failure naming the reason."""
        s = session()
        s.on_connected(NOW * 1000)
        huge = {**RESULT, "result": {"text": "x" * 300_000}}
        [publish] = s.on_outbox([message(MessageKind.RESULT, huge, 1)], NOW)
        assert isinstance(publish, Publish)
        body = decode(publish.topic, publish.payload).body
        assert isinstance(body, JobResult)
        assert body.state == "failed"
        assert body.error is not None
        assert body.error.code == "result_too_large"

    def test_a_message_that_can_never_be_sent_does_not_block_the_rest(self):
        """A stored event the protocol refuses is dropped (and logged); the next one goes."""
        s = session()
        s.on_connected(NOW * 1000)
        broken = message(MessageKind.EVENT, {**EVENT, "kind": "nonsense"}, 1)
        good = message(MessageKind.EVENT, EVENT, 2)
        actions = s.on_outbox([broken, good], NOW)
        assert isinstance(actions[0], Dropped)
        assert actions[1] == DeleteOutbox((broken.id,))
        assert isinstance(actions[2], Publish)
