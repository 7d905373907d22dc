"""The envelope codec: every message on every topic, to and from bytes.

::

    {"v": 1, "id": "7f0c9a3e5b2d4c1a9e8f7a6b5c4d3e2f", "type": "event",
     "from": "kiosk-17", "ts_ms": 1795344276123, "body": {...}}

:func:`decode` runs the checks cheapest and most general first, so a flood of junk costs little:

1. the topic is one of ours                                       :class:`InvalidTopic`
2. the payload fits the largest type the channel carries,
   before any parsing                                              :class:`MessageTooLarge`
3. strict UTF-8 JSON (see :mod:`~edgelm_protocol.strict_json`)    :class:`MalformedMessage`
4. ``v`` is 1, checked before the other keys, since another
   version may have other keys                                     :class:`UnsupportedVersion`
5. exactly the six keys, ``id`` a message id, ``type`` known      :class:`MalformedMessage`
6. ``type`` is one the topic carries; ``from`` is the topic's
   device (device channels) or ``control`` (control channels)     :class:`TopicMismatch`
7. the payload fits its own type's limit                          :class:`MessageTooLarge`
8. the body matches its type's schema                             :class:`MalformedMessage`

Every refusal is a :class:`MessageRefused` with ``topic`` set: receivers log ``code`` and drop
the message. ``from`` is checked against the topic because the broker's ACL lets a device
publish only under its own ``dev/{device}/``: the topic is the authenticated sender, ``from`` is
only a claim. ``ts_ms`` is the sender's clock, informational, and never trusted.

:func:`encode` runs the same checks on the way out (the body is read back through its own
``from_json``), so whatever one side sends, the other accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from edgelm_protocol.bodies import BODY_CLASSES, Body
from edgelm_protocol.errors import (
    MalformedMessage,
    MessageRefused,
    MessageTooLarge,
    TopicMismatch,
    UnsupportedVersion,
)
from edgelm_protocol.ids import (
    CONTROL_SENDER,
    check_message_id,
    check_sender,
    new_message_id,
)
from edgelm_protocol.schema import MAX_SAFE_INT, ObjectReader, check_integer
from edgelm_protocol.strict_json import (
    JSONObject,
    check_tree,
    dumps_compact,
    json_kind,
    loads_strict,
)
from edgelm_protocol.topics import (
    CHANNEL_FOR_TYPE,
    CHANNELS,
    Channel,
    Direction,
    MessageType,
    Topic,
)

SCHEMA_VERSION = 1
ENVELOPE_KEYS = ("v", "id", "type", "from", "ts_ms", "body")

_KIB = 1024
MAX_PAYLOAD_BYTES: Mapping[MessageType, int] = MappingProxyType(
    {
        MessageType.PRESENCE: 1 * _KIB,
        MessageType.STATE: 16 * _KIB,
        MessageType.TELEMETRY: 16 * _KIB,
        MessageType.EVENT: 16 * _KIB,
        MessageType.JOB_RESULT: 256 * _KIB,
        MessageType.DESIRED: 8 * _KIB,
        MessageType.JOB: 256 * _KIB,
        MessageType.ACK: 64 * _KIB,
        MessageType.ANNOUNCE: 1 * _KIB,
    }
)
"""Largest payload (the whole envelope, in bytes) for each type."""


def channel_payload_limit(channel: Channel) -> int:
    """Largest payload a channel may carry: the limit of its largest type.

    This is what :func:`decode` checks before parsing, when the type is not known yet; the
    ``events`` channel carries 16 KiB events and 256 KiB job results, so it allows 256 KiB
    until the envelope says which it is.
    """
    return max(MAX_PAYLOAD_BYTES[message_type] for message_type in CHANNELS[channel].types)


@dataclass(frozen=True)
class Envelope:
    """One message. ``sender`` is the wire's ``from``; ``type`` follows from the body's class.

    Construction checks the id and sender; :func:`encode` checks the rest.
    """

    id: str
    sender: str
    ts_ms: int
    body: Body

    def __post_init__(self) -> None:
        check_message_id(self.id)
        check_sender(self.sender)
        check_integer(self.ts_ms, "ts_ms")

    @property
    def type(self) -> MessageType:
        return self.body.TYPE

    def to_json(self) -> JSONObject:
        return {
            "v": SCHEMA_VERSION,
            "id": self.id,
            "type": self.type.value,
            "from": self.sender,
            "ts_ms": self.ts_ms,
            "body": self.body.to_json(),
        }


def new_envelope(
    body: Body, *, sender: str, ts_ms: int, new_id: Callable[[], str] = new_message_id
) -> Envelope:
    """A new envelope for ``body``, with a fresh id.

    The caller reads its clock and passes ``ts_ms``; ``new_id`` defaults to ``uuid4().hex`` and
    is injected in tests so that ids are predictable.
    """
    return Envelope(id=new_id(), sender=sender, ts_ms=ts_ms, body=body)


def encode(envelope: Envelope) -> bytes:
    """The payload bytes for ``envelope``, or the error a receiver would raise for them.

    Also refuses a sender that cannot send this type (a device's ``ack``, the control plane's
    ``presence``): the receiver would refuse it as a :class:`TopicMismatch`.
    """
    direction = CHANNELS[CHANNEL_FOR_TYPE[envelope.type]].direction
    from_device = direction is Direction.DEVICE_TO_CONTROL
    if from_device == (envelope.sender == CONTROL_SENDER):
        expected = "a device id" if from_device else repr(CONTROL_SENDER)
        raise TopicMismatch(
            field="from", expected=f"{expected} for {envelope.type}", actual=envelope.sender
        )
    document = envelope.to_json()
    check_tree(document)
    type(envelope.body).from_json(document["body"])
    payload = dumps_compact(document)
    limit = MAX_PAYLOAD_BYTES[envelope.type]
    if len(payload) > limit:
        raise MessageTooLarge(size_bytes=len(payload), limit_bytes=limit, what=envelope.type)
    return payload


def decode(topic: Topic | str, payload: bytes) -> Envelope:
    """The envelope in ``payload``, received on ``topic``, or a :class:`MessageRefused`."""
    received = topic if isinstance(topic, Topic) else Topic.parse(topic)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    try:
        return _decode(received, bytes(payload))
    except MessageRefused as exc:
        exc.topic = received.value
        raise


def _decode(topic: Topic, payload: bytes) -> Envelope:
    limit = channel_payload_limit(topic.channel)
    if len(payload) > limit:
        raise MessageTooLarge(
            size_bytes=len(payload), limit_bytes=limit, what=f"{topic.channel} channel"
        )
    document = loads_strict(payload)
    if not isinstance(document, dict):
        raise MalformedMessage(f"the payload must be a JSON object, got {json_kind(document)}")
    _check_version(document)
    reader = ObjectReader(document, "", ENVELOPE_KEYS)
    message_id = reader.identifier("id", check_message_id)
    message_type = reader.choice("type", MessageType)
    spec = topic.spec
    if message_type not in spec.types:
        allowed = " or ".join(sorted(spec.types))
        raise TopicMismatch(
            field="type",
            expected=f"{allowed} on the {topic.channel} channel",
            actual=message_type.value,
        )
    sender = document["from"]
    if spec.direction is Direction.DEVICE_TO_CONTROL:
        if sender != topic.device:
            raise TopicMismatch(
                field="from", expected=f"the topic's device {topic.device!r}", actual=sender
            )
    elif sender != CONTROL_SENDER:
        raise TopicMismatch(field="from", expected=f"{CONTROL_SENDER!r}", actual=sender)
    limit = MAX_PAYLOAD_BYTES[message_type]
    if len(payload) > limit:
        raise MessageTooLarge(size_bytes=len(payload), limit_bytes=limit, what=message_type)
    return Envelope(
        id=message_id,
        sender=reader.identifier("from", check_sender),
        ts_ms=reader.integer("ts_ms", maximum=MAX_SAFE_INT),
        body=BODY_CLASSES[message_type].from_json(reader.raw("body"), "body"),
    )


def _check_version(document: JSONObject) -> None:
    if "v" not in document:
        raise MalformedMessage("the envelope is missing v (the schema version)", field="v")
    version = document["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise MalformedMessage("v must be an integer schema version", field="v")
    if version != SCHEMA_VERSION:
        raise UnsupportedVersion(version, supported=SCHEMA_VERSION)
