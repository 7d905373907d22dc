"""One paho client and the connection it holds: connect, publish, subscribe, ack, close.

:class:`PahoLink` is the mechanics; :class:`~edgelm_protocol.mqtt.client.MqttClient` is the
policy around it (lifecycle, reconnecting, the on_connect hook, argument checks). The link
keeps what belongs to one connection: the awaited PUBACKs and SUBACKs, keyed by packet id as
aiomqtt keeps them, the packet ids of delivered messages not yet acknowledged, and whether
the broker's CONNACK has accepted us. Everything here runs on the event loop's thread except
paho's ``reconnect()``, which the bridge's docstring explains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgelm_protocol.mqtt.bridge import PahoSocketBridge
from edgelm_protocol.mqtt.errors import (
    AckTimeout,
    ConnectFailed,
    ConnectionLost,
    ConnectRefused,
    InvalidArgument,
    MqttTransportError,
    NotConnected,
    PublishRefused,
)
from edgelm_protocol.mqtt.messages import ConnectionInfo, InboundMessage
from edgelm_protocol.mqtt.settings import MqttSettings

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# MQTT v5 DISCONNECT reason codes: 0x00 tells the broker to delete our will, 0x04 to send it.
# (MQTT 3.1.1's DISCONNECT has no reason code: it always deletes the will.)
DISCONNECT_NORMAL = 0x00
DISCONNECT_WITH_WILL = 0x04


class PahoLink:
    """A paho client on the running loop; at most one connection at a time."""

    def __init__(
        self,
        settings: MqttSettings,
        inbound: asyncio.Queue[InboundMessage | None],
        on_lost: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._inbound = inbound
        self._on_lost = on_lost
        self._paho = build_paho(settings)
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_publish = self._on_publish
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_message = self._on_message
        self._bridge = PahoSocketBridge(self._paho, asyncio.get_running_loop(), self._on_error)
        self._pending_publishes: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._pending_subscribes: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._unacked: set[int] = set()
        self._connack: asyncio.Future[ConnectionInfo] | None = None
        self.connection_id = 0
        """Grows by one with each connection attempt; stamps inbound messages."""
        self.up = False
        """True from an accepting CONNACK to the next disconnect."""
        self.lost = asyncio.Event()
        """Set when the current connection ends (cleared when the next attempt starts)."""
        self.disconnect_reason = ""

    @property
    def watching(self) -> bool:
        """True while the socket or a timer is still registered with the event loop."""
        return self._bridge.watching

    # connecting and closing

    async def connect(self) -> ConnectionInfo:
        """One attempt: TCP (and TLS) in a worker thread, then CONNECT, then CONNACK.

        Raises ``ConnectFailed``, ``ConnectRefused``, ``ConnectionLost`` or ``AckTimeout``;
        a failed attempt, or one cancelled before the broker accepted it, leaves no socket
        behind. One cancelled after the CONNACK stays up for :meth:`disconnect`.
        """
        self.connection_id += 1
        self.lost.clear()
        connack: asyncio.Future[ConnectionInfo] = asyncio.get_running_loop().create_future()
        self._connack = connack
        try:
            await self._open_socket()
            # The loop may have read the CONNACK already, while the worker thread was still
            # returning: a cancel (stop()) arriving now must still end the attempt.
            return await wait_for_ack(connack, "CONNACK", self.settings.connect_timeout_s)
        except BaseException:
            # Messages of an accepted connection are delivered (and may be acked) before this
            # returns. Aborting would drop a queued PUBACK; disconnect() writes it first.
            if not self.up:
                self.abort()
            raise
        finally:
            self._connack = None

    async def _open_socket(self) -> None:
        """paho's reconnect(): DNS, TCP and TLS block, so they run in a worker thread."""
        attempt = asyncio.get_running_loop().run_in_executor(None, self._paho.reconnect)
        try:
            rc = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The thread cannot be interrupted. Wait for it, so that no socket appears after
            # stop() has released everything; paho's connect_timeout bounds the wait.
            with contextlib.suppress(Exception):
                await attempt
            raise
        except OSError as exc:
            raise ConnectFailed(
                self.settings.host, self.settings.port, str(exc) or type(exc).__name__
            ) from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed(self.settings.host, self.settings.port, paho.error_string(rc))

    async def disconnect(self, *, send_will: bool) -> None:
        """Send DISCONNECT and wait until it is out; close without it if it cannot go out.

        MQTT 3.1.1's DISCONNECT has no reason code and always deletes the will: there,
        ``send_will`` closes the connection without DISCONNECT, so the broker publishes it.
        """
        # In 3.1.1 only a connection that ends without DISCONNECT makes the broker send the will.
        will_by_abort = send_will and not self.settings.mqtt5
        if self.up and not will_by_abort:
            if self.settings.mqtt5:
                code = DISCONNECT_WITH_WILL if send_will else DISCONNECT_NORMAL
                sent = self._paho.disconnect(
                    reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=code)
                )
            else:
                sent = self._paho.disconnect()
            if sent == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    async with asyncio.timeout(self.settings.operation_timeout_s):
                        await self.lost.wait()  # not wait_for: see wait_for_ack
                except TimeoutError:
                    log.warning(
                        "mqtt_disconnect_timeout",
                        client_id=self.settings.client_id,
                        timeout_s=self.settings.operation_timeout_s,
                    )
        self.abort()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will)."""
        self._bridge.abort()

    def detach(self) -> bool:
        """Unregister whatever is left from the loop; True if anything was."""
        return self._bridge.detach()

    # requests

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout_s: float
    ) -> None:
        if not self.up:
            raise NotConnected("publish")
        try:
            info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise InvalidArgument("topic", topic, f"a topic name paho accepts ({exc})") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise NotConnected("publish")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttTransportError(
                f"expected paho to queue the message, it said {paho.error_string(info.rc)}"
            )
        if qos == 0:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with _awaiting(self._pending_publishes, info.mid, (topic, done)):
            await wait_for_ack(done, "PUBACK", timeout_s)

    async def subscribe(self, pairs: list[tuple[str, int]], timeout_s: float) -> list[ReasonCode]:
        if not self.up:
            raise NotConnected("subscribe")
        try:
            rc, mid = self._paho.subscribe(pairs)
        except ValueError as exc:
            filters = [f for f, _ in pairs]
            raise InvalidArgument("filter", filters, f"valid topic filters ({exc})") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected("subscribe")
        done: asyncio.Future[list[ReasonCode]] = asyncio.get_running_loop().create_future()
        with _awaiting(self._pending_subscribes, mid, done):
            return await wait_for_ack(done, "SUBACK", timeout_s)

    def ack(self, message: InboundMessage) -> bool:
        if not self.up or message.connection_id != self.connection_id:
            skipped = "connection_gone"
        elif message.mid not in self._unacked:
            skipped = "already_acked"
        else:
            self._unacked.discard(message.mid)
            return self._paho.ack(message.mid, message.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS
        log.debug(
            "mqtt_ack_skipped",
            client_id=self.settings.client_id,
            reason=skipped,
            topic=message.topic,
            mid=message.mid,
        )
        return False

    # paho's callbacks, on the event loop's thread

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if connack is None or connack.done():
            return  # the attempt timed out or was cancelled; abort() is closing the socket
        if reason_code.is_failure:
            connack.set_exception(ConnectRefused(reason_code.value, str(reason_code)))
            return
        # paho 2.2 ignores the broker's Receive Maximum and refuses to change its own inflight
        # cap (20) on an established connection: a broker that allows fewer than 20 would
        # see too many unacknowledged publishes. Mosquitto allows 20 by default.
        self._unacked.clear()
        # Set here, not when the awaiting task resumes: messages redelivered in the same read
        # as the CONNACK belong to this connection and must be ackable.
        self.up = True
        connack.set_result(ConnectionInfo(self.connection_id, flags.session_present))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        side = "broker" if flags.is_disconnect_packet_from_server else "client"
        self.disconnect_reason = f"{reason_code} (0x{reason_code.value:02x}, by {side})"
        self.up = False
        self._unacked.clear()
        # From here on the caller's outbox owns every unacknowledged publish; paho would
        # otherwise resend them on the next connect, behind the caller's back.
        self._paho.drop_out_messages()
        reason = str(reason_code)
        for _, done in self._pending_publishes.values():
            if not done.done():
                done.set_exception(ConnectionLost("PUBACK", reason))
        for granted in self._pending_subscribes.values():
            if not granted.done():
                granted.set_exception(ConnectionLost("SUBACK", reason))
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionLost("CONNACK", reason))
        self._on_lost()
        self.lost.set()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        pending = self._pending_publishes.get(mid)
        if pending is None:
            return  # QoS 0 bytes written, or a publish whose caller stopped waiting
        topic, done = pending
        if done.done():
            return
        if reason_code.is_failure:
            done.set_exception(PublishRefused(topic, reason_code.value, str(reason_code)))
        else:
            done.set_result(None)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        granted = self._pending_subscribes.get(mid)
        if granted is not None and not granted.done():
            granted.set_result(list(reason_codes))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        manual = self.settings.manual_ack and message.qos > 0
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # MQTT requires UTF-8 topics and brokers check them; a message we cannot even
            # route would hold a receive_maximum slot for ever, so it is acked, loudly.
            log.error("mqtt_message_topic_not_utf8", client_id=self.settings.client_id)
            if manual:
                self._paho.ack(message.mid, message.qos)
            return
        if manual:
            self._unacked.add(message.mid)
        self._inbound.put_nowait(
            InboundMessage(
                topic=topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                mid=message.mid,
                duplicate=bool(message.dup),
                connection_id=self.connection_id,
            )
        )

    def _on_error(self, exc: Exception) -> None:
        log.error(
            "mqtt_loop_error",
            client_id=self.settings.client_id,
            error=type(exc).__name__,
            exc_info=exc,
        )
        self.abort()


@contextlib.contextmanager
def _awaiting(table: dict[int, _T], mid: int, entry: _T) -> Iterator[None]:
    """Register an awaited acknowledgement; remove it however the wait ends (as aiomqtt)."""
    if mid in table:
        raise RuntimeError(f"paho reused packet id {mid} while it was still awaited")
    table[mid] = entry
    try:
        yield
    finally:
        table.pop(mid, None)


async def wait_for_ack(future: asyncio.Future[_T], packet: str, timeout_s: float) -> _T:
    """The broker's reply that ``future`` stands for; ``AckTimeout`` after ``timeout_s``.

    A cancel of the waiting task always wins, even when it arrives in the same loop iteration
    as the reply. Python 3.11's ``asyncio.wait_for`` returns the reply then and swallows the
    cancel (CPython gh-86296; 3.12 rebuilt it on ``asyncio.timeout``, as this is): the
    reconnect loop, cancelled by ``stop()`` just as a CONNACK came in, went on running, and
    ``stop()`` waited for it for ever.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await future
    except TimeoutError:
        raise AckTimeout(packet, timeout_s) from None


def build_paho(settings: MqttSettings) -> paho.Client:
    """A paho client for ``settings``: MQTT v5 (or 3.1.1), our reconnect loop, connect
    parameters set.

    MQTT 3.1.1 has no CONNECT properties (session expiry, receive maximum) and no clean start:
    paho takes the clean-session flag in its constructor instead, and refuses ``clean_start``
    and properties for 3.1.1 in ``connect()``, so neither is given.
    """
    if settings.mqtt5:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,  # our loop reconnects, with jitter
            manual_ack=settings.manual_ack,
        )
    else:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_start,
            protocol=MQTTProtocolVersion.MQTTv311,
            # Also keeps paho from retrying as MQTT 3.1 when the broker refuses 3.1.1.
            reconnect_on_failure=False,
            manual_ack=settings.manual_ack,
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.will is not None:
        will = settings.will
        client.will_set(will.topic, will.payload, will.qos, will.retain)
    if settings.tls is not None:
        client.tls_set_context(settings.tls)
    client.connect_timeout = settings.connect_timeout_s
    # Stores the parameters that every reconnect() uses; no I/O happens here.
    if not settings.mqtt5:
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        return client
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no hint
    properties.SessionExpiryInterval = settings.session_expiry_s
    properties.ReceiveMaximum = settings.receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive_s,
        clean_start=settings.clean_start,
        properties=properties,
    )
    return client
