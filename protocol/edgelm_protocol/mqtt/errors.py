"""Errors raised by the MQTT adapter, grouped by who is at fault.

::

    MqttError                     root of every error the adapter raises on purpose
    ├── MqttUsageError            the caller misused the client (a bug to fix, not to retry)
    │   ├── ClientStateError      the call does not fit the client's lifecycle (publish
    │   │                         before start() or after stop(), start() twice)
    │   ├── InvalidArgument       a setting, topic, filter or QoS is out of range; carries
    │   │                         ``name`` and ``value`` (also a ValueError)
    │   └── InvalidBrokerUrl      a broker URL that cannot be used; carries ``problem``
    │                             (also a ValueError)
    ├── MqttTransportError        the link to the broker failed: keep the message, retry later
    │   ├── NotConnected          there was no connection when the call was made
    │   ├── ConnectionLost        the connection dropped before the broker answered
    │   ├── AckTimeout            connected, but no answer within ``timeout_s``
    │   └── ConnectFailed         a connection attempt failed below MQTT (DNS, TCP, TLS)
    └── MqttRefused               the broker answered and said no; carries ``reason_code``
        ├── ConnectRefused        CONNACK with a failure reason (credentials, authorisation)
        ├── PublishRefused        PUBACK with a failure reason (e.g. 0x87 not authorised)
        └── SubscribeRefused      SUBACK refused one or more filters; carries ``refused``

Callers of :meth:`~edgelm_protocol.mqtt.client.MqttClient.publish` keep their message on any
:class:`MqttTransportError` (the outbox retries it after the next connect) and park it on
:class:`MqttRefused` (a retry would be refused again). ``ConnectFailed`` and ``ConnectRefused``
never reach callers: the reconnect loop logs them and tries again. Every class has a
snake_case ``code`` for logs and events, as the rest of :mod:`edgelm_protocol` does.
"""

from __future__ import annotations

from typing import ClassVar

from edgelm_protocol.errors import ProtocolError


class MqttError(ProtocolError):  # one root per package: the protocol's
    """Root of every error the MQTT adapter raises on purpose."""

    code: ClassVar[str] = "mqtt_error"


class MqttUsageError(MqttError, RuntimeError):
    """The caller used the client in a way it does not support."""

    code: ClassVar[str] = "mqtt_usage_error"


class ClientStateError(MqttUsageError):
    """``operation`` needs a client in state ``expected``; this one was in ``state``."""

    code: ClassVar[str] = "mqtt_client_state"

    def __init__(self, operation: str, expected: str, state: str) -> None:
        super().__init__(f"{operation} expects a {expected} client, this one is {state}")
        self.operation = operation
        self.expected = expected
        self.state = state


class InvalidArgument(MqttUsageError, ValueError):
    """A setting or argument is out of range: ``name`` must be ``expected``, ``value`` came."""

    code: ClassVar[str] = "mqtt_invalid_argument"

    def __init__(self, name: str, value: object, expected: str) -> None:
        super().__init__(f"{name} must be {expected}, got {value!r}")
        self.name = name
        self.value = value
        self.expected = expected


class InvalidBrokerUrl(MqttUsageError, ValueError):
    """A broker URL that cannot be used; ``problem`` says what is wrong with it.

    ``shown`` is the URL as the message quotes it: with its password replaced by ``***``
    (:func:`~edgelm_protocol.mqtt.broker_url.parse_broker_url` does that).
    """

    code: ClassVar[str] = "mqtt_invalid_broker_url"

    def __init__(self, shown: str, problem: str, expected: str) -> None:
        super().__init__(f"broker URL {shown}: {problem} (expected {expected})")
        self.problem = problem


class MqttTransportError(MqttError):
    """The link to the broker failed; the same request may succeed after a reconnect."""

    code: ClassVar[str] = "mqtt_transport_error"


class NotConnected(MqttTransportError):
    """No connection to the broker when ``operation`` was called."""

    code: ClassVar[str] = "mqtt_not_connected"

    def __init__(self, operation: str) -> None:
        super().__init__(f"{operation} needs a connection to the broker, and there is none")
        self.operation = operation


class ConnectionLost(MqttTransportError):
    """The connection dropped while waiting for ``packet`` (PUBACK, SUBACK or CONNACK)."""

    code: ClassVar[str] = "mqtt_connection_lost"

    def __init__(self, packet: str, reason: str) -> None:
        super().__init__(f"the connection dropped before the broker's {packet}: {reason}")
        self.packet = packet
        self.reason = reason


class AckTimeout(MqttTransportError):
    """The broker did not send ``packet`` within ``timeout_s`` seconds."""

    code: ClassVar[str] = "mqtt_ack_timeout"

    def __init__(self, packet: str, timeout_s: float) -> None:
        super().__init__(f"expected the broker's {packet} within {timeout_s} s, none came")
        self.packet = packet
        self.timeout_s = timeout_s


class ConnectFailed(MqttTransportError):
    """A connection attempt to ``host``:``port`` failed before MQTT spoke (DNS, TCP, TLS)."""

    code: ClassVar[str] = "mqtt_connect_failed"

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"could not connect to {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


class MqttRefused(MqttError):
    """The broker answered with an MQTT v5 reason code of 0x80 or above."""

    code: ClassVar[str] = "mqtt_refused"

    def __init__(self, message: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason


class ConnectRefused(MqttRefused):
    """The broker refused the connection (CONNACK)."""

    code: ClassVar[str] = "mqtt_connect_refused"

    def __init__(self, reason_code: int, reason: str) -> None:
        super().__init__(
            f"expected the broker to accept the connection, it refused with "
            f"0x{reason_code:02x} ({reason})",
            reason_code,
            reason,
        )


class PublishRefused(MqttRefused):
    """The broker refused a QoS 1 message on ``topic`` (PUBACK)."""

    code: ClassVar[str] = "mqtt_publish_refused"

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(
            f"expected the broker to accept the message on {topic!r}, it refused with "
            f"0x{reason_code:02x} ({reason})",
            reason_code,
            reason,
        )
        self.topic = topic


class SubscribeRefused(MqttRefused):
    """The broker refused some filters (SUBACK); ``refused`` maps each to its reason code.

    Filters of the same request that are not in ``refused`` were granted: a SUBSCRIBE is not
    atomic. ``reason_code`` is the first refused filter's code.
    """

    code: ClassVar[str] = "mqtt_subscribe_refused"

    def __init__(self, refused: dict[str, tuple[int, str]]) -> None:
        listed = ", ".join(f"{f!r}: 0x{code:02x} ({why})" for f, (code, why) in refused.items())
        first_code, first_reason = next(iter(refused.values()))
        super().__init__(
            f"expected the broker to grant every filter, it refused {listed}",
            first_code,
            first_reason,
        )
        self.refused = {name: code for name, (code, _) in refused.items()}
