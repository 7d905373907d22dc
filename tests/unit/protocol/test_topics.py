"""Topics as validated values, filters for the control plane, and the channel table."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given

from edgelm_protocol.errors import InvalidId, InvalidTopic
from edgelm_protocol.topics import (
    CHANNEL_FOR_TYPE,
    CHANNELS,
    Channel,
    Direction,
    MessageType,
    Topic,
    TopicFilter,
)
from tests.unit.protocol.strategies import bad_ids, ids, topics


class TestTopic:
    def test_device_topic_string(self) -> None:
        """A device topic is edgelm/v1/{fleet}/dev/{device}/{channel}."""
        topic = Topic.for_device("acme", "kiosk-17", Channel.PRESENCE)
        assert topic.value == "edgelm/v1/acme/dev/kiosk-17/presence"
        assert str(topic) == topic.value

    def test_announce_topic_string(self) -> None:
        """The announce topic is fleet-wide and names no device."""
        topic = Topic.announce("acme")
        assert topic.value == "edgelm/v1/acme/announce"
        assert topic.device is None

    def test_for_type_picks_the_channel_that_carries_it(self) -> None:
        """Job results go on events; announce ignores the device."""
        result_topic = Topic.for_type("acme", "kiosk-17", MessageType.JOB_RESULT)
        assert result_topic.channel is Channel.EVENTS
        assert Topic.for_type("acme", "kiosk-17", MessageType.ANNOUNCE) == Topic.announce("acme")

    def test_topics_are_frozen_and_hashable(self) -> None:
        """A topic cannot be changed after validation, and works as a dict key."""
        topic = Topic.for_device("acme", "kiosk-17", Channel.STATE)
        with pytest.raises(dataclasses.FrozenInstanceError):
            topic.device = "+"  # type: ignore[misc]
        assert {topic: 1}[Topic.parse("edgelm/v1/acme/dev/kiosk-17/state")] == 1

    @given(topic=topics())
    def test_parse_inverts_value(self, topic: Topic) -> None:
        """Parsing a topic's string gives the same topic back."""
        assert Topic.parse(topic.value) == topic

    @given(fleet=ids, bad=bad_ids())
    def test_bad_ids_cannot_build_a_topic(self, fleet: str, bad: str) -> None:
        """A device or fleet id with a wildcard, separator or control character is refused."""
        with pytest.raises(InvalidId):
            Topic.for_device(fleet, bad, Channel.JOBS)
        with pytest.raises(InvalidId):
            Topic.for_device(bad, "kiosk-17", Channel.JOBS)
        with pytest.raises(InvalidId):
            Topic.announce(bad)

    @given(bad=bad_ids())
    def test_bad_ids_in_a_received_topic_are_refused(self, bad: str) -> None:
        """Parsing refuses a topic whose fleet or device level is not a valid id."""
        for text in (f"edgelm/v1/acme/dev/{bad}/state", f"edgelm/v1/{bad}/dev/kiosk/state"):
            with pytest.raises(InvalidTopic) as caught:
                Topic.parse(text)
            assert caught.value.topic == text

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("edgelm/v2/acme/dev/kiosk/state", "must start with edgelm/v1/"),
            ("edgelm/v1/acme/dev/kiosk/reboot", "unknown device channel"),
            ("edgelm/v1/acme/dev/kiosk/announce", "unknown device channel"),
            ("edgelm/v1/acme/dev/kiosk/state/extra", "a topic must be"),
            ("edgelm/v1/acme/device/kiosk/state", "a topic must be"),
            ("edgelm/v1/acme/dev/+/state", "device id must be"),
            ("edgelm/v1/acme/dev//state", "device id must be"),
            ("edgelm/v1/acme/dev/control/state", "reserved"),
            ("$share/g/edgelm/v1/acme/dev/kiosk/state", "must start with edgelm/v1/"),
            ("", "must start with edgelm/v1/"),
        ],
    )
    def test_foreign_topics_are_refused_with_a_reason(self, text: str, reason: str) -> None:
        """Anything but the two topic shapes is InvalidTopic, saying what is wrong."""
        with pytest.raises(InvalidTopic) as caught:
            Topic.parse(text)
        assert reason in caught.value.reason
        assert caught.value.code == "invalid_topic"

    def test_announce_cannot_name_a_device(self) -> None:
        """A Topic for announce with a device is refused."""
        with pytest.raises(InvalidTopic):
            Topic(fleet="acme", channel=Channel.ANNOUNCE, device="kiosk-17")

    def test_device_channels_need_a_device(self) -> None:
        """A device channel without a device is refused."""
        with pytest.raises(InvalidId):
            Topic(fleet="acme", channel=Channel.STATE)


class TestTopicFilter:
    def test_plain_filter(self) -> None:
        """The control plane subscribes to one channel of every device with '+'."""
        assert TopicFilter("acme", Channel.TELEMETRY).value == "edgelm/v1/acme/dev/+/telemetry"

    def test_shared_filter(self) -> None:
        """With a share group the filter is an MQTT 5 shared subscription."""
        shared = TopicFilter("acme", Channel.EVENTS, share_group="cp")
        assert shared.value == "$share/cp/edgelm/v1/acme/dev/+/events"
        assert str(shared) == shared.value

    def test_matches_same_fleet_and_channel(self) -> None:
        """A filter matches every device of its fleet on its channel, and nothing else."""
        state = TopicFilter("acme", Channel.STATE)
        assert state.matches(Topic.for_device("acme", "kiosk-1", Channel.STATE))
        assert not state.matches(Topic.for_device("acme", "kiosk-1", Channel.TELEMETRY))
        assert not state.matches(Topic.for_device("other", "kiosk-1", Channel.STATE))

    def test_announce_has_no_filter(self) -> None:
        """announce is one exact topic, so a '+' filter for it is refused."""
        with pytest.raises(InvalidTopic):
            TopicFilter("acme", Channel.ANNOUNCE)

    @given(bad=bad_ids())
    def test_bad_fleet_or_group_is_refused(self, bad: str) -> None:
        """Neither the fleet nor the share group may hold a wildcard or separator."""
        with pytest.raises(InvalidId):
            TopicFilter(bad, Channel.STATE)
        with pytest.raises(InvalidId):
            TopicFilter("acme", Channel.STATE, share_group=bad)


class TestChannels:
    def test_table_matches_the_spec(self) -> None:
        """Direction, QoS, retain flag and types are the topic table of docs/protocol.md."""
        up, down = Direction.DEVICE_TO_CONTROL, Direction.CONTROL_TO_DEVICE
        expected = {
            "presence": (up, True, {"presence"}),
            "state": (up, True, {"state"}),
            "telemetry": (up, False, {"telemetry"}),
            "events": (up, False, {"event", "job_result"}),
            "desired": (down, True, {"desired"}),
            "jobs": (down, False, {"job"}),
            "ack": (down, False, {"ack"}),
            "announce": (Direction.CONTROL_TO_FLEET, True, {"announce"}),
        }
        actual = {
            str(channel): (spec.direction, spec.retained, {str(t) for t in spec.types})
            for channel, spec in CHANNELS.items()
        }
        assert actual == expected
        assert {spec.qos for spec in CHANNELS.values()} == {1}

    def test_every_type_travels_on_exactly_one_channel(self) -> None:
        """A sender can pick the topic from the body's type alone."""
        assert set(CHANNEL_FOR_TYPE) == set(MessageType)
        for message_type, channel in CHANNEL_FOR_TYPE.items():
            assert message_type in CHANNELS[channel].types

    def test_only_announce_is_fleet_wide(self) -> None:
        """Every channel but announce names a device."""
        fleet_wide = [channel for channel, spec in CHANNELS.items() if not spec.device_scoped]
        assert fleet_wide == [Channel.ANNOUNCE]
