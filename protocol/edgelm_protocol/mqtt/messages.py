"""The values the client hands to the application: inbound messages and connection events."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One PUBLISH the broker delivered to us.

    With manual acks, a QoS 1 message stays unacknowledged at the broker until the
    application calls :meth:`~edgelm_protocol.mqtt.client.MqttClient.ack` with it; if the
    connection drops first, the broker delivers it again on the next connection of the same
    session (``duplicate`` is then usually True). Receivers drop duplicates by envelope id.
    """

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    """True for a retained message sent because we subscribed (not for live messages)."""
    mid: int = 0
    """The packet id on the connection that delivered it (0 for QoS 0)."""
    duplicate: bool = False
    """The broker's DUP flag: it may have sent this message before."""
    connection_id: int = 0
    """Which connection delivered it. A PUBACK is only meaningful on that connection: packet
    ids are reused, so an ack sent on a later connection could acknowledge another message."""


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What the broker said when it accepted a connection (CONNACK)."""

    connection_id: int
    """Grows by one for each connection this client opens."""
    session_present: bool
    """True when the broker resumed our session: its subscriptions still hold and it will
    resend unacknowledged messages. False on a first connect, or when the broker lost or
    expired the session: the application must subscribe again."""
