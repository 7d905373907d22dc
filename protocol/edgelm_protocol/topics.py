"""Topics as frozen, validated values, and what each channel carries.

Every topic lives under ``edgelm/v1/{fleet}/``::

    edgelm/v1/{fleet}/dev/{device}/{channel}     one device's channel (see CHANNELS)
    edgelm/v1/{fleet}/announce                   the control plane to every device of the fleet

A :class:`Topic` can only hold valid ids and a known channel, so code that has one never builds
a wildcard or another device's topic by accident (aiomqtt's ``Topic`` is the model). The version
is part of the topic, not only of the envelope: a future ``v2`` fleet gets its own subscriptions
instead of feeding v1 receivers messages they must refuse one by one.

:data:`CHANNELS` is docs/protocol.md's topic table as data (direction, QoS, retained, envelope
types), so the agent, the control plane and the broker ACL generator read one source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from edgelm_protocol.errors import InvalidId, InvalidTopic
from edgelm_protocol.ids import check_device_id, check_fleet_id, check_share_group

TOPIC_ROOT = "edgelm/v1"


class MessageType(StrEnum):
    """The envelope's ``type``: which body schema the message carries."""

    PRESENCE = "presence"
    STATE = "state"
    TELEMETRY = "telemetry"
    EVENT = "event"
    JOB_RESULT = "job_result"
    DESIRED = "desired"
    JOB = "job"
    ACK = "ack"
    ANNOUNCE = "announce"


class Channel(StrEnum):
    """The last topic level. ``ANNOUNCE`` is fleet-wide; every other channel is per device."""

    PRESENCE = "presence"
    STATE = "state"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    DESIRED = "desired"
    JOBS = "jobs"
    ACK = "ack"
    ANNOUNCE = "announce"


class Direction(StrEnum):
    """Who publishes on a channel. It decides what an envelope's ``from`` must be."""

    DEVICE_TO_CONTROL = "device_to_control"
    CONTROL_TO_DEVICE = "control_to_device"
    CONTROL_TO_FLEET = "control_to_fleet"


@dataclass(frozen=True)
class ChannelSpec:
    """One row of the topic table (docs/protocol.md)."""

    direction: Direction
    qos: int
    retained: bool
    types: frozenset[MessageType]

    @property
    def device_scoped(self) -> bool:
        """Whether the topic names a device (everything but ``announce``)."""
        return self.direction is not Direction.CONTROL_TO_FLEET


def _row(direction: Direction, *, retained: bool, types: set[MessageType]) -> ChannelSpec:
    # Every channel is QoS 1: at-least-once plus dedupe by message id. QoS 2 would cost a
    # second round trip per message and still not survive a broker restarted without persistence.
    return ChannelSpec(direction=direction, qos=1, retained=retained, types=frozenset(types))


_UP = Direction.DEVICE_TO_CONTROL
_DOWN = Direction.CONTROL_TO_DEVICE

CHANNELS: Mapping[Channel, ChannelSpec] = MappingProxyType(
    {
        # Retained, so a control-plane replica that starts sees every device's last word; the
        # MQTT will publishes an ``offline`` presence when the device drops.
        Channel.PRESENCE: _row(_UP, retained=True, types={MessageType.PRESENCE}),
        Channel.STATE: _row(_UP, retained=True, types={MessageType.STATE}),
        Channel.TELEMETRY: _row(_UP, retained=False, types={MessageType.TELEMETRY}),
        Channel.EVENTS: _row(
            _UP, retained=False, types={MessageType.EVENT, MessageType.JOB_RESULT}
        ),
        # Retained, so a device whose session expired still gets its latest desired state.
        Channel.DESIRED: _row(_DOWN, retained=True, types={MessageType.DESIRED}),
        Channel.JOBS: _row(_DOWN, retained=False, types={MessageType.JOB}),
        Channel.ACK: _row(_DOWN, retained=False, types={MessageType.ACK}),
        Channel.ANNOUNCE: _row(
            Direction.CONTROL_TO_FLEET, retained=True, types={MessageType.ANNOUNCE}
        ),
    }
)

_ROOT_LEVELS = TOPIC_ROOT.split("/")
_DEVICE_CHANNELS = frozenset(
    channel.value for channel, spec in CHANNELS.items() if spec.device_scoped
)

CHANNEL_FOR_TYPE: Mapping[MessageType, Channel] = MappingProxyType(
    {message_type: channel for channel, spec in CHANNELS.items() for message_type in spec.types}
)
"""Each type travels on exactly one channel, so a sender picks the topic from the body."""


@dataclass(frozen=True)
class Topic:
    """A topic the contract defines. ``device`` is ``None`` exactly for ``announce``.

    Build with :meth:`for_device`, :meth:`announce` or :meth:`for_type`, or :meth:`parse` a
    received topic string; construction validates, so an instance is always publishable.
    """

    fleet: str
    channel: Channel
    device: str | None = None

    def __post_init__(self) -> None:
        check_fleet_id(self.fleet)
        if not isinstance(self.channel, Channel):
            raise TypeError(f"channel must be a Channel, got {type(self.channel).__name__}")
        if self.spec.device_scoped:
            check_device_id(self.device)
        elif self.device is not None:
            raise InvalidTopic(self.value, f"the {self.channel} topic names no device")

    @classmethod
    def for_device(cls, fleet: str, device: str, channel: Channel) -> Topic:
        """``edgelm/v1/{fleet}/dev/{device}/{channel}``."""
        return cls(fleet=fleet, channel=channel, device=device)

    @classmethod
    def announce(cls, fleet: str) -> Topic:
        """``edgelm/v1/{fleet}/announce``."""
        return cls(fleet=fleet, channel=Channel.ANNOUNCE)

    @classmethod
    def for_type(cls, fleet: str, device: str | None, message_type: MessageType) -> Topic:
        """The topic that carries ``message_type`` (``device`` is ignored for ``announce``)."""
        channel = CHANNEL_FOR_TYPE[message_type]
        return cls(
            fleet=fleet, channel=channel, device=device if CHANNELS[channel].device_scoped else None
        )

    @classmethod
    def parse(cls, value: str) -> Topic:
        """Parse a received topic string, or raise :class:`InvalidTopic` saying what is wrong."""
        if not isinstance(value, str):
            raise InvalidTopic(ascii(value), f"a topic must be a str, got {type(value).__name__}")
        levels = value.split("/")
        if levels[:2] != _ROOT_LEVELS:
            raise InvalidTopic(value, f"a topic must start with {TOPIC_ROOT}/")
        if len(levels) == 4 and levels[3] == Channel.ANNOUNCE:
            fleet, channel, device = levels[2], Channel.ANNOUNCE, None
        elif len(levels) == 6 and levels[3] == "dev":
            fleet, device = levels[2], levels[4]
            if levels[5] not in _DEVICE_CHANNELS:
                raise InvalidTopic(value, f"unknown device channel {levels[5]!a}")
            channel = Channel(levels[5])
        else:
            raise InvalidTopic(
                value,
                f"a topic must be {TOPIC_ROOT}/{{fleet}}/dev/{{device}}/{{channel}} or "
                f"{TOPIC_ROOT}/{{fleet}}/announce",
            )
        try:
            return cls(fleet=fleet, channel=channel, device=device)
        except InvalidId as exc:
            raise InvalidTopic(value, str(exc)) from exc

    @property
    def spec(self) -> ChannelSpec:
        return CHANNELS[self.channel]

    @property
    def value(self) -> str:
        """The topic string to publish to."""
        if self.device is None:
            return f"{TOPIC_ROOT}/{self.fleet}/{self.channel}"
        return f"{TOPIC_ROOT}/{self.fleet}/dev/{self.device}/{self.channel}"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TopicFilter:
    """The control plane's subscription to one channel of every device in a fleet.

    ``edgelm/v1/{fleet}/dev/+/{channel}``, or with ``share_group`` the MQTT 5 shared
    subscription ``$share/{group}/edgelm/v1/{fleet}/dev/+/{channel}`` that spreads the devices'
    traffic over several control-plane replicas. Brokers do not send retained messages to shared
    subscriptions; that is fine because the store keeps the last presence and state.

    Devices subscribe to exact topics (their own ``desired``, ``jobs``, ``ack`` and the fleet's
    ``announce``), never to filters, so ``announce`` has no filter.
    """

    fleet: str
    channel: Channel
    share_group: str | None = None

    def __post_init__(self) -> None:
        check_fleet_id(self.fleet)
        if not isinstance(self.channel, Channel) or not CHANNELS[self.channel].device_scoped:
            raise InvalidTopic(
                f"{TOPIC_ROOT}/{self.fleet}/{self.channel}",
                "a filter covers a per-device channel; subscribe to announce as a Topic",
            )
        if self.share_group is not None:
            check_share_group(self.share_group)

    @property
    def value(self) -> str:
        """The filter string to subscribe with."""
        plain = f"{TOPIC_ROOT}/{self.fleet}/dev/+/{self.channel}"
        return plain if self.share_group is None else f"$share/{self.share_group}/{plain}"

    def matches(self, topic: Topic) -> bool:
        """Whether a message on ``topic`` is delivered through this filter."""
        return topic.fleet == self.fleet and topic.channel is self.channel

    def __str__(self) -> str:
        return self.value
