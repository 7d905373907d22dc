"""What the atheris harnesses share: the topics to pick from and a seed corpus of valid messages."""

from __future__ import annotations

from pathlib import Path

from edgelm_protocol import (
    Ack,
    Announce,
    Channel,
    Presence,
    PresenceStatus,
    Topic,
    encode,
    new_envelope,
)

FLEET, DEVICE, OTHER = "acme", "kiosk-1", "kiosk-2"
TOPICS = [
    *(Topic.for_device(FLEET, DEVICE, c).value for c in Channel if c != Channel.ANNOUNCE),
    Topic.announce(FLEET).value,
    Topic.for_device(FLEET, OTHER, Channel.DESIRED).value,
    Topic.for_device("other", DEVICE, Channel.STATE).value,
]


def split(data: bytes) -> tuple[str, bytes]:
    """The first byte picks the topic; the rest is the payload."""
    if not data:
        return TOPICS[0], b""
    return TOPICS[data[0] % len(TOPICS)], data[1:]


def write_seeds(directory: Path) -> None:
    """Valid messages for each topic, so the fuzzer starts past the JSON parser."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = {
        Channel.PRESENCE: (Presence(PresenceStatus.ONLINE, "1.0"), DEVICE),
        Channel.ACK: (Ack(ids=("a" * 32,)), "control"),
        Channel.ANNOUNCE: (Announce(timestamp_version=3), "control"),
    }
    for index, topic in enumerate(TOPICS):
        channel = Topic.parse(topic).channel
        body, sender = bodies.get(channel, bodies[Channel.PRESENCE])
        payload = encode(new_envelope(body, sender=sender, ts_ms=1))
        (directory / f"seed-{index}").write_bytes(bytes([index]) + payload)
