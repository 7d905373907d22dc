"""The MQTT I/O adapter: paho-mqtt 2.x on asyncio, MQTT v5 (or 3.1.1), manual acknowledgements.

The rest of :mod:`edgelm_protocol` is sans-IO; this subpackage is the one place that opens a
socket to the broker. The device agent and the control plane both use it::

    settings = MqttSettings(host="broker.local", client_id="kiosk-17", will=MqttWill(...))

    async def on_connect(info: ConnectionInfo) -> None:
        if not info.session_present:
            await client.subscribe([(jobs_topic, 1), (desired_topic, 1)])
        await client.publish(presence_topic, online, retain=True)

    async with MqttClient(settings, on_connect=on_connect) as client:
        async for message in client.messages():
            commit(message)  # to the job queue, durably
            client.ack(message)  # only now does the broker forget it
"""

from edgelm_protocol.mqtt.backoff import FailureLogThrottle, ReconnectBackoff
from edgelm_protocol.mqtt.broker_url import BrokerUrl, parse_broker_url
from edgelm_protocol.mqtt.client import ConnectHook, InboundMessages, MqttClient
from edgelm_protocol.mqtt.errors import (
    AckTimeout,
    ClientStateError,
    ConnectFailed,
    ConnectionLost,
    ConnectRefused,
    InvalidArgument,
    InvalidBrokerUrl,
    MqttError,
    MqttRefused,
    MqttTransportError,
    MqttUsageError,
    NotConnected,
    PublishRefused,
    SubscribeRefused,
)
from edgelm_protocol.mqtt.messages import ConnectionInfo, InboundMessage
from edgelm_protocol.mqtt.settings import MqttSettings, MqttVersion, MqttWill

__all__ = [
    "AckTimeout",
    "BrokerUrl",
    "ClientStateError",
    "ConnectFailed",
    "ConnectHook",
    "ConnectRefused",
    "ConnectionInfo",
    "ConnectionLost",
    "FailureLogThrottle",
    "InboundMessage",
    "InboundMessages",
    "InvalidArgument",
    "InvalidBrokerUrl",
    "MqttClient",
    "MqttError",
    "MqttRefused",
    "MqttSettings",
    "MqttTransportError",
    "MqttUsageError",
    "MqttVersion",
    "MqttWill",
    "NotConnected",
    "PublishRefused",
    "ReconnectBackoff",
    "SubscribeRefused",
    "parse_broker_url",
]
