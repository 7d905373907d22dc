"""Fuzzing the agent's receiver: :meth:`SyncSession.on_message` with hostile messages.

Every message type, on every topic the session could be handed (its own inbound topics, the
other channels of its own device, another device's, another fleet's, junk), with the mutations
of ``test_fuzz_mutations.py``. For each case:

* no exception leaves ``on_message``;
* a message :func:`~edgelm_protocol.decode` refuses yields exactly ``[Dropped(code), AckInbound]``
  with the refusal's code and a non-empty reason; one on a topic the device does not subscribe
  to yields ``[Dropped("not_my_topic"), AckInbound]``;
* a message that decodes is acted on as its type says, and is acknowledged exactly once
  (a job by ``EnqueueJob``, which the shell acknowledges once the job is committed);
* after the case, the same session still processes valid messages (an ack, an announce, a
  signed desired state).

Signed desired states get their own case: the ``signed`` object is mutated and then signed
with the trusted key, so the fuzzing reaches the schema checks behind the signature.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, given
from hypothesis import strategies as st

from edgelm_agent.sync.session import (
    AckInbound,
    Action,
    ApplyDesired,
    DeleteOutbox,
    Dropped,
    EnqueueJob,
    Refresh,
    RefreshForKey,
    ReportEvent,
    SyncSession,
)
from edgelm_protocol import (
    Ack,
    Announce,
    DesiredDocument,
    DesiredState,
    MessageType,
    ProtocolError,
    TargetRef,
    encode,
    new_envelope,
    sign_desired,
)
from edgelm_protocol.signing import DirectorKeys, sign_canonical
from edgelm_protocol.topics import Channel, Topic
from tests.unit.protocol import strategies
from tests.unit.test_fuzz_mutations import (
    EDGE_VALUES,
    Case,
    Raw,
    count_case,
    dump,
    fuzz_settings,
    hostile_cases,
    to_bytes,
    verdict,
)

FLEET, DEVICE, OTHER = "acme", "kiosk-1", "kiosk-2"
NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
KEYS = DirectorKeys.from_pem(
    [
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ]
)
OWN_INBOUND = [Topic.for_device(FLEET, DEVICE, c).value for c in (Channel.DESIRED, Channel.JOBS)]
OWN_INBOUND += [Topic.for_device(FLEET, DEVICE, Channel.ACK).value, Topic.announce(FLEET).value]


def session() -> SyncSession:
    return SyncSession(fleet=FLEET, device=DEVICE, keys=KEYS, agent_version="0.1")


def topics_for(message_type: MessageType) -> st.SearchStrategy[str]:
    """Mostly the type's own topic for this device; also every other topic it could meet."""
    own = Topic.for_type(FLEET, DEVICE, message_type).value
    elsewhere = st.sampled_from(
        [
            *OWN_INBOUND,
            *(Topic.for_device(FLEET, DEVICE, c).value for c in Channel if c != Channel.ANNOUNCE),
            Topic.for_type(FLEET, OTHER, message_type).value,
            Topic.for_type("other", DEVICE, message_type).value,
            Topic.announce("other").value,
            f"edgelm/v1/{FLEET}/dev/+/desired",
            f"edgelm/v1/{FLEET}/dev/{DEVICE}/desired/",
            "edgelm/v2/acme/announce",
            "",
            "\ud800",
        ]
    )
    inbound = st.sampled_from(OWN_INBOUND)
    return st.just(own) | inbound | inbound | elsewhere | st.text(max_size=60)


def check_one_drop_or_acted(topic: str, payload: bytes, actions: list[Action], token: Any) -> None:
    """The receiver's answer to one message is exactly what its verdict calls for."""
    if topic not in OWN_INBOUND:
        assert [type(a) for a in actions] == [Dropped, AckInbound]
        assert isinstance(actions[0], Dropped)
        assert actions[0].code == "not_my_topic"
        assert actions[1] == AckInbound(token)
        return
    code = verdict(topic, payload)
    if code is not None:
        assert [type(a) for a in actions] == [Dropped, AckInbound], actions
        dropped = actions[0]
        assert isinstance(dropped, Dropped)
        assert (dropped.topic, dropped.code) == (topic, code)
        assert dropped.reason.strip()
        dropped.reason.encode("utf-8")  # safe to log: no lone surrogate from the payload
        assert actions[1] == AckInbound(token)
        return
    # Decoded: acknowledged exactly once, by the broker ack or by the job queue.
    acks = [a for a in actions if isinstance(a, AckInbound | EnqueueJob)]
    assert len(acks) == 1, actions
    assert acks[0].token is token
    drops = [a for a in actions if isinstance(a, Dropped)]
    if drops:  # only a desired state that does not verify, reported as an event as well
        assert topic.endswith("/desired")
        assert len(drops) == 1
        assert any(isinstance(a, ReportEvent) for a in actions)


def check_still_working(receiver: SyncSession, serial: int) -> None:
    """After whatever came before, valid messages are processed as usual."""
    ack_id = f"{serial:032x}"
    ack = encode(
        new_envelope(Ack(ids=("f" * 32,)), sender="control", ts_ms=1, new_id=lambda: ack_id)
    )
    token = object()
    assert receiver.on_message(OWN_INBOUND[2], ack, token, NOW) == [
        DeleteOutbox(("f" * 32,)),
        AckInbound(token),
    ]
    announce = encode(
        new_envelope(Announce(timestamp_version=serial + 1), sender="control", ts_ms=1)
    )
    assert receiver.on_message(OWN_INBOUND[3], announce, token, NOW) == [
        Refresh(serial + 1),
        AckInbound(token),
    ]


def signed_desired(sequence: int) -> bytes:
    state = DesiredState(
        fleet=FLEET,
        device=DEVICE,
        sequence=sequence,
        issued_at=NOW - 10,
        expires=NOW + 3600,
        rollout=None,
        target=TargetRef(path="models/tiny/1.0/model.gguf", length=1, sha256="ab" * 32),
    )
    body = DesiredDocument.from_json(sign_desired(state, KEY))
    return encode(new_envelope(body, sender="control", ts_ms=1))


@pytest.mark.parametrize("message_type", list(MessageType), ids=str)
@fuzz_settings(40)
@given(data=st.data())
def test_every_hostile_message_is_dropped_once_and_the_session_goes_on(
    message_type: MessageType, data: st.DataObject
) -> None:
    """A few hostile messages of one type in a row: each is answered as its verdict says,
    nothing raises, and valid messages are processed after them."""
    receiver = session()
    for _ in range(data.draw(st.integers(1, 3))):
        case: Case = data.draw(hostile_cases(message_type, DEVICE, OTHER))
        topic = data.draw(topics_for(message_type))
        token = object()
        count_case("agent", message_type)
        actions = receiver.on_message(topic, case.payload, token, NOW)
        dropped = [a.code for a in actions if isinstance(a, Dropped)]
        event(f"{message_type}: {dropped[0] if dropped else 'processed'}")
        if case.surely_invalid and topic in OWN_INBOUND:
            assert verdict(topic, case.payload) is not None, case.mutation
        check_one_drop_or_acted(topic, case.payload, actions, token)
    check_still_working(receiver, data.draw(st.integers(1, 2**40)))
    # And a desired state above anything applied so far is still applied.
    sequence = receiver.applied_sequence + 10**6
    if receiver.in_progress is not None:
        sequence += receiver.in_progress.sequence
    actions = receiver.on_message(OWN_INBOUND[0], signed_desired(sequence), object(), NOW)
    assert isinstance(actions[0], ApplyDesired), actions


@fuzz_settings(200)
@given(data=st.data())
def test_a_signed_but_malformed_desired_state_is_rejected_and_reported(
    data: st.DataObject,
) -> None:
    """The trusted key signs a ``signed`` object with one field broken: the session rejects
    it with a code, reports it, acknowledges it, and applies the next good one."""
    state = data.draw(strategies.desired_states(fleet=FLEET, device=DEVICE))
    signed: dict[str, Any] = state.to_json()
    key = data.draw(st.sampled_from([*signed, "extra", "target.path", "target.length"]))
    value = data.draw(
        st.sampled_from([v for v in EDGE_VALUES if not isinstance(v, Raw)])
        | strategies.hostile_json_values
    )
    if key.startswith("target."):
        if signed["target"] is None:
            signed["target"] = {"path": "a", "length": 1, "hashes": {"sha256": "ab" * 32}}
        signed["target"][key.removeprefix("target.")] = value
    else:
        signed[key] = value
    try:
        keyid, sig = sign_canonical(KEY, signed)
    except ProtocolError:  # floats, lone surrogates: canonical JSON cannot hold them
        keyid, sig = "ab" * 32, "cd" * 64
    document = {"signed": signed, "signatures": [{"keyid": keyid, "sig": sig}]}
    envelope = {"v": 1, "id": "e" * 32, "type": "desired", "from": "control", "ts_ms": 1}
    payload = to_bytes(dump({**envelope, "body": document}))
    receiver = session()
    token = object()
    count_case("agent signed", MessageType.DESIRED)
    actions = receiver.on_message(OWN_INBOUND[0], payload, token, NOW)
    assert actions[-1] == AckInbound(token)
    refresh = [a for a in actions if isinstance(a, RefreshForKey)]
    if refresh:
        # Signed by a key this device does not know (canonical JSON could not hold the value,
        # so no trusted key signed it): the shell refreshes, learns no key, retries once, and
        # the retry refuses it with a code.
        assert actions == [refresh[0], AckInbound(token)]
        assert keyid not in receiver.keys
        retried = receiver.retry_desired(refresh[0].topic, refresh[0].document, NOW)
        assert [a for a in retried if isinstance(a, RefreshForKey)] == []
        actions = [*retried, AckInbound(token)]
    dropped = [a.code for a in actions if isinstance(a, Dropped)]
    event(f"signed desired: {dropped[0] if dropped else 'applied or ignored'}")
    if not refresh:
        check_one_drop_or_acted(OWN_INBOUND[0], payload, actions, token)
    applied = [a for a in actions if isinstance(a, ApplyDesired)]
    if not applied:
        assert any(isinstance(a, Dropped) for a in actions) or actions == [AckInbound(token)]
    else:  # the mutation happened to be valid: it is a real desired state for this device
        assert applied[0].state.device == DEVICE
    check_still_working(receiver, 7)
    sequence = (receiver.in_progress.sequence if receiver.in_progress else 0) + 1
    if sequence > strategies.MAX_SAFE_INT:
        return
    actions = receiver.on_message(OWN_INBOUND[0], signed_desired(sequence), object(), NOW)
    assert isinstance(actions[0], ApplyDesired), actions
