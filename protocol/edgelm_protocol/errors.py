"""Errors raised by the wire contract, grouped by who is at fault.

::

    ProtocolError                  root: catch this to catch everything the package raises
    ├── InvalidId                  a fleet, device, message or rollout id breaks its pattern
    ├── InvalidKey                 director key material is not an Ed25519 public key
    ├── MessageRefused             a received (or about to be sent) message is not valid:
    │   │                          receivers log it with ``code`` and drop it, then keep going
    │   ├── InvalidTopic               the topic string is not one of the contract's topics
    │   ├── MessageTooLarge            the payload is over its size limit (checked before parsing)
    │   ├── MalformedMessage           not UTF-8, not strict JSON, or not the schema
    │   ├── UnsupportedVersion         ``v`` is a schema version this code does not know
    │   └── TopicMismatch              ``type`` or ``from`` disagrees with the topic
    ├── TargetRefused              a signed model target that cannot be run as it is
    │   ├── InvalidModelMetadata       ``custom["edgelm"]`` missing, of the wrong type, out of range
    │   ├── UnsafeTargetPath           a target or bundle member path that could escape a folder
    │   └── InvalidBundle              a bundle manifest that does not parse or contradicts itself
    └── DesiredStateRefused        a desired state the device must not act on
        ├── ForgedDesiredState         no signature verifies against a trusted director key
        ├── WrongDevice                signed for another fleet or another device
        ├── StaleDesiredState          sequence not above the last applied (replay, reorder)
        └── ExpiredDesiredState        expired at the reference time the caller gave

Every class has a ``code`` (snake_case) for logs and events, and the attributes a caller needs
(``field``, ``sequence``, ``limit_bytes`` ...), so nothing has to parse a message string.

Messages quote values that came off the wire through :func:`shown`: an attacker's string may hold
lone surrogates (which crash a UTF-8 log stream), control characters or megabytes, and an error
message must be safe to log as it is.
"""

from __future__ import annotations

from typing import ClassVar

_SHOWN_CHARS = 80


def shown(value: object) -> str:
    """``value`` as printable ASCII for an error message, cut to a readable length."""
    text = ascii(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}... ({len(text) - _SHOWN_CHARS} more characters)"


class ProtocolError(Exception):
    """Root of every error the package raises on purpose."""

    code: ClassVar[str] = "protocol_error"


class InvalidId(ProtocolError):
    """An identifier does not match its pattern.

    ``kind`` says which one, in snake_case: ``fleet_id``, ``device_id``, ``message_id``,
    ``rollout_id``, ``share_group``, ``model_name``, ``model_version`` or ``model``.
    """

    code = "invalid_id"

    def __init__(self, kind: str, value: object, expected: str) -> None:
        super().__init__(f"{kind.replace('_', ' ')} must be {expected}, got {shown(value)}")
        self.kind = kind
        self.value = value
        self.expected = expected


class InvalidKey(ProtocolError):
    """Key material given to :class:`~edgelm_protocol.signing.DirectorKeys` is unusable."""

    code = "invalid_key"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageRefused(ProtocolError):
    """A message is not valid. ``topic`` is where it came from, when known.

    Body validation runs without knowing the topic (bodies are values of their own), so
    :func:`~edgelm_protocol.envelope.decode` fills ``topic`` in before the error leaves it;
    the message string is built when it is shown, so it includes the topic either way.
    """

    code: ClassVar[str] = "message_refused"

    def __init__(self, reason: str, *, topic: str | None = None, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.topic = topic
        self.field = field

    def __str__(self) -> str:
        if self.topic is None:
            return self.reason
        return f"message on {shown(self.topic)}: {self.reason}"


class InvalidTopic(MessageRefused):
    """A topic string is not ``edgelm/v1/{fleet}/dev/{device}/{channel}`` nor ``.../announce``."""

    code = "invalid_topic"

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(reason, topic=topic)


class MessageTooLarge(MessageRefused):
    """The payload is larger than its type (or its channel) allows."""

    code = "message_too_large"

    def __init__(
        self, *, size_bytes: int, limit_bytes: int, what: str, topic: str | None = None
    ) -> None:
        super().__init__(
            f"a {what} payload must be at most {limit_bytes} bytes, got {size_bytes}", topic=topic
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class MalformedMessage(MessageRefused):
    """The payload is not UTF-8, not strict JSON, or does not match the schema of its type.

    ``field`` is the path of the offending value (``body.health.tokens_per_s``,
    ``body.installed[2].sha256``) when there is one, ``None`` for whole-payload faults.
    """

    code = "malformed_message"


class UnsupportedVersion(MessageRefused):
    """The envelope's ``v`` is an integer this code does not know (only 1 exists)."""

    code = "unsupported_version"

    def __init__(self, version: int, *, supported: int, topic: str | None = None) -> None:
        super().__init__(
            f"schema version must be {supported}, got {shown(version)}", topic=topic, field="v"
        )
        self.version = version
        self.supported = supported


class TopicMismatch(MessageRefused):
    """``type`` is not one the topic carries, or ``from`` is not the topic's sender."""

    code = "topic_mismatch"

    def __init__(
        self, *, field: str, expected: str, actual: object, topic: str | None = None
    ) -> None:
        super().__init__(
            f"{field} must be {expected}, got {shown(actual)}", topic=topic, field=field
        )
        self.expected = expected
        self.actual = actual


class TargetRefused(ProtocolError):
    """A signed target (or a bundle manifest it pins) is not one an agent can run."""

    code = "target_refused"


class InvalidModelMetadata(TargetRefused):
    code = "invalid_model_metadata"


class UnsafeTargetPath(TargetRefused):
    code = "unsafe_target_path"


class InvalidBundle(TargetRefused):
    code = "target_mismatch"


class DesiredStateRefused(ProtocolError):
    """A device must not act on this desired state. ``sequence`` is its sequence, when known."""

    code: ClassVar[str] = "desired_state_refused"

    def __init__(self, message: str, *, sequence: int | None = None) -> None:
        super().__init__(message)
        self.sequence = sequence


class ForgedDesiredState(DesiredStateRefused):
    """No signature verifies against a trusted director key.

    Covers a missing signature, a signature by an unknown key, a signature that claims a trusted
    keyid but was made with another key, and a signature over other bytes (a tampered payload).
    ``keyids`` lists the keyids the document claimed, for the operator to compare.
    """

    code = "forged_desired_state"

    def __init__(self, reason: str, *, keyids: tuple[str, ...]) -> None:
        super().__init__(f"desired state is not signed by a trusted director key: {reason}")
        self.reason = reason
        self.keyids = keyids


class WrongDevice(DesiredStateRefused):
    """Validly signed, but for another fleet or another device (a replay across devices)."""

    code = "wrong_device"

    def __init__(
        self, *, fleet: str, device: str, expected_fleet: str, expected_device: str, sequence: int
    ) -> None:
        super().__init__(
            f"desired state must be for {expected_fleet}/{expected_device}, "
            f"got {shown(fleet)}/{shown(device)}",
            sequence=sequence,
        )
        self.fleet = fleet
        self.device = device
        self.expected_fleet = expected_fleet
        self.expected_device = expected_device


class StaleDesiredState(DesiredStateRefused):
    """The sequence is not above the last applied one: a replay, a reorder or a duplicate."""

    code = "stale_desired_state"

    def __init__(self, *, sequence: int, last_applied: int) -> None:
        super().__init__(
            f"desired state sequence must be above the last applied {last_applied}, got {sequence}",
            sequence=sequence,
        )
        self.last_applied = last_applied


class ExpiredDesiredState(DesiredStateRefused):
    """Expired at the reference time given (``now``, integer Unix seconds)."""

    code = "expired_desired_state"

    def __init__(self, *, expires: int, now: int, sequence: int) -> None:
        super().__init__(
            f"desired state {sequence} expired at {expires}, the reference time is {now}",
            sequence=sequence,
        )
        self.expires = expires
        self.now = now
