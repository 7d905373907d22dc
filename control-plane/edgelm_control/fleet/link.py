"""The control plane's MQTT session with the fleet's broker.

One :class:`~edgelm_protocol.mqtt.MqttClient` with client id ``control-{fleet}-{replica}``,
a persistent session (no clean start, a session expiry of days) and manual acknowledgements,
so a message the control plane has not stored is sent again, on the next connection, even
after a crash. It subscribes, at QoS 1, to every device's ``presence``, ``state``,
``telemetry`` and ``events``, as MQTT 5 shared subscriptions (``$share/{group}/...``) when
several replicas split the traffic.

After every connection it runs the ``when_connected`` callbacks (the director republishes
unpublished desired states, remote jobs resend queued ones), in the background so that a
slow callback never holds the connection hook. After a connection without a session
(``session_present`` False) it first runs the ``when_session_lost`` callbacks: a broker that
kept no session may have kept no retained messages either (restarted without persistence, or
replaced), so the director publishes every current desired state again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from edgelm_control.config import BrokerAddress
from edgelm_control.metrics import ControlMetrics
from edgelm_protocol import Channel, Topic, TopicFilter
from edgelm_protocol.mqtt import (
    ClientStateError,
    ConnectionInfo,
    InboundMessage,
    InboundMessages,
    MqttClient,
    MqttSettings,
)
from edgelm_protocol.mqtt.settings import client_tls_context

log = structlog.get_logger(__name__)

INBOUND_CHANNELS = (Channel.PRESENCE, Channel.STATE, Channel.TELEMETRY, Channel.EVENTS)

Callback = Callable[[], Awaitable[object]]


def mqtt_settings(
    broker: BrokerAddress,
    *,
    client_id: str,
    receive_maximum: int,
    session_expiry_s: int,
    reconnect_max_s: float = 30.0,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> MqttSettings:
    """The control plane's session; with ``?protocol=3.1.1`` on the broker URL, MQTT 3.1.1,
    where the broker's own settings replace ``session_expiry_s`` and ``receive_maximum``.

    ``mqtts://`` verifies the broker against ``ca_file`` (the fleet CA; without it the system's
    trust store) and presents ``cert_file``/``key_file`` (the ``control`` identity)."""
    tls = None
    if broker.tls:
        tls = client_tls_context(
            _text(ca_file), _text(cert_file), _text(key_file) if cert_file else None
        )
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        username=broker.username,
        password=broker.password,
        protocol_version=broker.protocol_version,
        tls=tls,
        clean_start=False,
        session_expiry_s=session_expiry_s,
        receive_maximum=min(receive_maximum, 65_535),
        manual_ack=True,
        reconnect_max_s=reconnect_max_s,
    )


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


class FleetLink:
    """Implements :class:`~edgelm_control.fleet.ports.FleetPublisher` over MQTT."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        fleet: str,
        share_group: str | None,
        metrics: ControlMetrics,
    ) -> None:
        self.fleet = fleet
        self.filters = tuple(
            TopicFilter(fleet, channel, share_group) for channel in INBOUND_CHANNELS
        )
        self._metrics = metrics
        self._client = MqttClient(settings, on_connect=self._on_connect)
        self._callbacks: list[tuple[str, Callback]] = []
        self._session_lost_callbacks: list[tuple[str, Callback]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def when_connected(self, name: str, callback: Callback) -> None:
        self._callbacks.append((name, callback))

    def when_session_lost(self, name: str, callback: Callback) -> None:
        """Run ``callback`` after a connection the broker held no session for, before the
        ``when_connected`` callbacks."""
        self._session_lost_callbacks.append((name, callback))

    async def start(self) -> None:
        await self._client.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._client.stop()
        self._metrics.broker_connected.set(0)

    @property
    def connected(self) -> bool:
        return self._client.connected

    async def wait_connected(self) -> None:
        await self._client.wait_connected()

    def messages(self) -> InboundMessages:
        return self._client.messages()

    def ack(self, message: InboundMessage) -> bool:
        return self._client.ack(message)

    async def publish(self, topic: Topic, payload: bytes, *, retain: bool) -> None:
        await self._client.publish(topic.value, payload, qos=topic.spec.qos, retain=retain)

    async def _on_connect(self, info: ConnectionInfo) -> None:
        if not info.session_present:
            await self._client.subscribe([(f.value, 1) for f in self.filters])
            log.info("fleet_subscribed", filters=[f.value for f in self.filters])
        task = asyncio.get_running_loop().create_task(
            self._after_connect(info.connection_id, session_present=info.session_present)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_connect(self, connection_id: int, *, session_present: bool) -> None:
        try:
            await self._client.wait_connected()
        except ClientStateError:
            return
        self._metrics.broker_connected.set(1)
        callbacks = self._callbacks
        if not session_present:
            log.info("fleet_session_new", connection_id=connection_id)
            callbacks = self._session_lost_callbacks + callbacks
        for name, callback in callbacks:
            try:
                await callback()
            except Exception:  # one callback failing must not skip the others
                log.exception("fleet_connect_callback_failed", callback=name)
        log.debug("fleet_connect_callbacks_done", connection_id=connection_id)
