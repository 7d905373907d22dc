"""How the adapter connects: one frozen value, checked when it is made.

The defaults are those of an edge device on a flaky link: a persistent session that outlives
days offline, QoS 1 with manual acknowledgements, and a reconnect loop that spreads a fleet's
reconnections after a broker restart.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from enum import StrEnum

from edgelm_protocol.mqtt.errors import InvalidArgument

MAX_UINT16 = 65_535
MAX_UINT32 = 4_294_967_295
SEVEN_DAYS_S = 7 * 24 * 3600


class MqttVersion(StrEnum):
    """The MQTT protocol version the client speaks; the value is how a broker URL spells it.

    MQTT 5 is the fleet's protocol. 3.1.1 exists for brokers that speak nothing else (the
    embedded demo broker, amqtt): it has no session expiry, receive maximum, reason codes or
    shared subscriptions, so those are the broker's settings or are not available.
    """

    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True, kw_only=True)
class MqttWill:
    """The message the broker publishes for us when our connection dies uncleanly.

    A clean :meth:`~edgelm_protocol.mqtt.client.MqttClient.stop` deletes it on the broker
    (DISCONNECT with reason 0x00), unless ``stop(send_will=True)`` asks for it (0x04).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if not self.topic or "+" in self.topic or "#" in self.topic:
            raise InvalidArgument("will.topic", self.topic, "a topic name without wildcards")
        if self.qos not in (0, 1):
            raise InvalidArgument("will.qos", self.qos, "0 or 1")


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """Connection settings. Every duration is in seconds, as the ``_s`` suffix says."""

    host: str
    """The broker's host name or address."""
    port: int = 1883
    """The broker's TCP port (8883 is the usual port for TLS)."""
    client_id: str
    """The MQTT client id: the device id on a device. The broker keys the session by it."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol_version: MqttVersion = MqttVersion.V5
    """MQTT 5 (the default), or 3.1.1 for a broker that speaks nothing newer. In 3.1.1 the
    CONNECT carries no properties: ``session_expiry_s`` and ``receive_maximum`` are not sent
    (the broker's own settings decide), ``clean_start`` is sent as the clean-session flag,
    a refusal has no reason string of its own, and ``stop(send_will=True)`` closes the socket
    without DISCONNECT, the only way 3.1.1 has to make the broker publish the will."""
    clean_start: bool = False
    """False resumes the broker's session (subscriptions and unacknowledged messages) on every
    connect, including the first one after a process restart. paho's own default cleans the
    session on the first connect of each process, which would lose a device's queued jobs.
    In MQTT 3.1.1 this is the clean-session flag."""
    session_expiry_s: int = SEVEN_DAYS_S
    """How long the broker keeps the session after a disconnect: 7 days, so a device offline
    for days still finds its queued jobs (AWS IoT's one-hour default loses them). MQTT 5 only:
    with 3.1.1 the broker keeps a persistent session as long as its own configuration says
    (Mosquitto: ``persistent_client_expiration``, default for ever)."""
    keepalive_s: int = 60
    """Longest silence before a PINGREQ; the broker drops us after 1.5 times this."""
    receive_maximum: int = 20
    """How many QoS 1 messages the broker may send us before we acknowledge one. With manual
    acks this is the backpressure: a slow application stops the flow at the broker, so the
    adapter never holds more than this many unacknowledged messages and never drops one.
    MQTT 5 only: with 3.1.1 the broker's own in-flight limit applies (Mosquitto's
    ``max_inflight_messages``, 20 by default)."""
    connect_timeout_s: float = 30.0
    """Bound on each step of a connection attempt: TCP (and TLS) connect, then CONNACK."""
    operation_timeout_s: float = 30.0
    """Default wait for a PUBACK or SUBACK, and for a clean DISCONNECT to go out on stop."""
    reconnect_min_s: float = 1.0
    """Shortest pause before a reconnection attempt."""
    reconnect_max_s: float = 120.0
    """Longest pause between attempts; also how long a connection must last to count as
    stable (a stable connection resets the backoff)."""
    connect_failure_log_interval_s: float = 60.0
    """Repeated connect failures are logged at most once per interval, with a count."""
    manual_ack: bool = True
    """True: a QoS 1 message is acknowledged only when the application calls ``ack``.
    False: paho acknowledges it before the application has seen it."""
    will: MqttWill | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """A client TLS context (CA, and for mTLS the device's certificate and key), or None for
    plain TCP. The TLS handshake runs with the TCP connect, off the event loop."""

    @property
    def mqtt5(self) -> bool:
        """True when the client speaks MQTT 5 (properties, reason codes, shared subscriptions)."""
        return self.protocol_version is MqttVersion.V5

    def __post_init__(self) -> None:
        try:
            # frozen: the documented way to normalise a field is object.__setattr__
            object.__setattr__(self, "protocol_version", MqttVersion(self.protocol_version))
        except ValueError:
            raise InvalidArgument(
                "protocol_version", self.protocol_version, "'5' or '3.1.1'"
            ) from None
        _check(bool(self.host), "host", self.host, "a host name or address")
        _check(0 < self.port <= MAX_UINT16, "port", self.port, "in 1..65535")
        _check(
            0 < len(self.client_id.encode()) <= MAX_UINT16 and "\0" not in self.client_id,
            "client_id",
            self.client_id,
            "1..65535 bytes of UTF-8 without NUL (a persistent session needs an id)",
        )
        _check(
            0 <= self.session_expiry_s <= MAX_UINT32,
            "session_expiry_s",
            self.session_expiry_s,
            "in 0..4294967295",
        )
        _check(0 <= self.keepalive_s <= MAX_UINT16, "keepalive_s", self.keepalive_s, "0..65535")
        _check(
            0 < self.receive_maximum <= MAX_UINT16,
            "receive_maximum",
            self.receive_maximum,
            "in 1..65535",
        )
        for name in ("connect_timeout_s", "operation_timeout_s", "connect_failure_log_interval_s"):
            value = getattr(self, name)
            _check(value > 0, name, value, "a positive number of seconds")
        _check(self.reconnect_min_s > 0, "reconnect_min_s", self.reconnect_min_s, "positive")
        _check(
            self.reconnect_max_s >= self.reconnect_min_s,
            "reconnect_max_s",
            self.reconnect_max_s,
            f">= reconnect_min_s ({self.reconnect_min_s})",
        )
        _check(
            self.password is None or self.username is not None,
            "username",
            self.username,
            "set when a password is set",
        )


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): traffic that never leaves."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_unless_loopback(host: str, *, what: str = "the broker URL") -> None:
    """Raise ``ValueError`` for plain MQTT to a host that is not loopback.

    A fleet with a CA has no TLS-off switch: ``mqtt://`` is accepted only when the broker is
    on the same machine (a demo, or a local bridge).
    """
    if not is_loopback(host):
        raise ValueError(
            f"{what} is mqtt:// (plain TCP) to {host}, which is not a loopback address; "
            "the fleet has a CA, so use mqtts:// (TLS with the fleet's certificates)"
        )


def client_tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ca_file`` (the fleet CA; ``None``:
    the system's trust store) and, with ``cert_file`` and ``key_file``, presents that client
    certificate (mutual TLS). The broker's name is checked against its certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidArgument(name, value, expected)
