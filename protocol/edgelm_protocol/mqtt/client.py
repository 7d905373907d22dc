"""The asyncio MQTT v5 client that the device agent and the control plane share.

It speaks MQTT 3.1.1 instead when ``MqttSettings.protocol_version`` says so (``?protocol=3.1.1``
on the broker URL), for a broker that speaks nothing newer: the demo's embedded broker. What
3.1.1 lacks is then the broker's to decide (session expiry, the in-flight limit) or refused
(shared subscriptions); see :class:`~edgelm_protocol.mqtt.settings.MqttSettings`.

paho-mqtt 2.x speaks the protocol (:mod:`~edgelm_protocol.mqtt.link`) and its socket runs on
the event loop (:mod:`~edgelm_protocol.mqtt.bridge`). This class is the policy the fleet's
delivery rules need:

- **Manual acks.** A QoS 1 message is acknowledged only when the application calls
  :meth:`MqttClient.ack` after committing it; until then the broker keeps it and sends it again
  on the next connection of the session. ``receive_maximum`` bounds how many such messages the
  broker sends us, so the inbound queue never needs to drop one.
- **Publish means PUBACK.** :meth:`MqttClient.publish` returns when the broker has the message,
  and raises a :class:`~edgelm_protocol.mqtt.errors.MqttTransportError` otherwise. The adapter
  then forgets the message (paho would resend it on the next connect): the caller's outbox is
  the one place that retries.
- **Reconnect forever** with exponential backoff and jitter until :meth:`MqttClient.stop`, and
  run an ``on_connect`` hook on every connection (subscribe again when ``session_present`` is
  False; publish retained presence and state every time, since a will may have fired), and an
  ``on_disconnect`` callback when that connection ends. A caller that keeps its own "online"
  flag sets it in the one and clears it in the other, never by polling :attr:`connected`
  (which only turns true after the hook returns, so a poll inside the hook sees a drop).

Lifecycle, as a transition table (a step it does not list raises ``ClientStateError``)::

    new ──start──► running ──stop──► stopping ──stopped──► stopped
     └──────────────────────stop─────────────────────────────┘
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

import structlog

from edgelm_protocol.mqtt.backoff import FailureLogThrottle, ReconnectBackoff
from edgelm_protocol.mqtt.errors import (
    ClientStateError,
    InvalidArgument,
    MqttError,
    MqttRefused,
    MqttTransportError,
    SubscribeRefused,
)
from edgelm_protocol.mqtt.link import PahoLink
from edgelm_protocol.mqtt.messages import ConnectionInfo, InboundMessage
from edgelm_protocol.mqtt.settings import MqttSettings

log = structlog.get_logger(__name__)

ConnectHook = Callable[[ConnectionInfo], Awaitable[None]]
"""Runs after every accepted connection, before ``wait_connected()`` returns (so it must not
await ``wait_connected()`` itself); it may publish and subscribe. If it raises, the client
disconnects and tries again with backoff; if the link drops while it runs, it is cancelled."""


class Lifecycle(StrEnum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


LIFECYCLE: dict[tuple[Lifecycle, str], Lifecycle] = {
    (Lifecycle.NEW, "start"): Lifecycle.RUNNING,
    (Lifecycle.NEW, "stop"): Lifecycle.STOPPED,
    (Lifecycle.RUNNING, "stop"): Lifecycle.STOPPING,
    (Lifecycle.STOPPING, "stopped"): Lifecycle.STOPPED,
}


class MqttClient:
    """One MQTT v5 (or 3.1.1) session with one broker, on the running event loop.

    ``start()`` returns at once (the broker may be down for days); ``wait_connected()`` waits
    for the broker. A client is used once: after ``stop()`` build a new one with the same
    settings to resume the same session.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_connect: ConnectHook | None = None,
        on_disconnect: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._hook = on_connect
        self._on_disconnect = on_disconnect
        self._backoff = ReconnectBackoff(settings.reconnect_min_s, settings.reconnect_max_s, rng)
        self._throttle = FailureLogThrottle(settings.connect_failure_log_interval_s)
        self._lifecycle = Lifecycle.NEW
        self._link: PahoLink | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._inbound: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
        self._ready = asyncio.Event()  # connected and past the on_connect hook
        self._stopped = asyncio.Event()

    # lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start connecting in the background, and keep reconnecting until ``stop()``."""
        self._advance("start")
        # The link clears _ready the moment it drops, so that `connected` is never stale.
        self._link = PahoLink(self.settings, self._inbound, on_lost=self._ready.clear)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._run(), name=f"mqtt-{self.settings.client_id}"
        )

    async def stop(self, *, send_will: bool = False) -> None:
        """Disconnect cleanly and release the socket, its loop registrations and the task.

        A clean stop sends DISCONNECT with reason 0x00, so the broker deletes the will instead
        of publishing it: a device that stops on purpose publishes its ``offline`` presence
        itself, before calling this. ``send_will=True`` sends reason 0x04 and the broker
        publishes the will. If DISCONNECT cannot go out within ``operation_timeout_s``, the
        connection is closed without it and the broker publishes the will anyway. In MQTT
        3.1.1, whose DISCONNECT always deletes the will, ``send_will=True`` closes the
        connection without DISCONNECT instead.

        The session stays on the broker for ``session_expiry_s`` (in 3.1.1: as long as the
        broker's own configuration keeps persistent sessions). Messages already queued stay
        readable from ``messages()``, which then ends. Calling ``stop()`` again is harmless.
        """
        if self._lifecycle in (Lifecycle.STOPPING, Lifecycle.STOPPED):
            await self._stopped.wait()
            return
        if self._lifecycle is Lifecycle.NEW:
            self._advance("stop")
            self._finish_stop()
            return
        self._advance("stop")
        try:
            if self._supervisor is not None:
                self._supervisor.cancel()
                await asyncio.wait([self._supervisor])  # unlike `await`, keeps our own cancel
            if self._link is not None:
                await self._link.disconnect(send_will=send_will)
        finally:
            if self._link is not None:
                self._link.abort()
                if self._link.detach():
                    log.warning("mqtt_registrations_left", client_id=self.settings.client_id)
            self._advance("stopped")
            self._finish_stop()

    def _finish_stop(self) -> None:
        self._ready.clear()
        self._inbound.put_nowait(None)  # ends the iterators after the queued messages
        self._stopped.set()
        log.info("mqtt_stopped", client_id=self.settings.client_id)

    def _advance(self, event: str) -> None:
        try:
            self._lifecycle = LIFECYCLE[(self._lifecycle, event)]
        except KeyError:
            expected = "new" if event == "start" else "running"
            raise ClientStateError(event, expected, self._lifecycle) from None

    def _running_link(self, operation: str) -> PahoLink:
        if self._lifecycle is not Lifecycle.RUNNING or self._link is None:
            raise ClientStateError(operation, "running", self._lifecycle)
        return self._link

    # connection state

    @property
    def connected(self) -> bool:
        """True while connected and past the ``on_connect`` hook."""
        return self._ready.is_set()

    async def wait_connected(self) -> None:
        """Return once connected and past the hook; raise ``ClientStateError`` on stop."""
        self._running_link("wait_connected")
        ready = asyncio.ensure_future(self._ready.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        if not ready.done() or ready.cancelled():
            raise ClientStateError("wait_connected", "running", self._lifecycle)

    # requests

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """Publish; with QoS 1, return once the broker's PUBACK accepts the message.

        Raises ``NotConnected`` when there is no connection, ``ConnectionLost`` when it drops
        before the PUBACK, ``AckTimeout`` after ``timeout_s`` (default ``operation_timeout_s``)
        and ``PublishRefused`` when the PUBACK carries a failure reason. After any of these the
        adapter has forgotten the message; whether the broker got it is unknown, so the caller
        retries and receivers drop duplicates. QoS 0 returns once paho has queued the bytes.
        """
        link = self._running_link("publish")
        if not topic:
            raise InvalidArgument("topic", topic, "a non-empty topic name")
        if qos not in (0, 1):
            raise InvalidArgument("qos", qos, "0 or 1")
        await link.publish(topic, payload, qos, retain, self._timeout_s(timeout_s))

    async def subscribe(
        self, subscriptions: Sequence[tuple[str, int]], *, timeout_s: float | None = None
    ) -> tuple[int, ...]:
        """Subscribe to ``(filter, qos)`` pairs in one SUBSCRIBE; return the granted QoS each.

        Raises ``SubscribeRefused`` if the broker refused any filter (the others hold), and the
        transport errors of :meth:`publish`. Subscriptions live in the broker's session: after
        a connect with ``session_present`` True they still hold. A shared subscription
        (``$share/...``) needs MQTT 5: with 3.1.1 it raises ``InvalidArgument`` (a 3.1.1
        broker would take it for an ordinary filter on a topic starting with ``$share``).
        """
        link = self._running_link("subscribe")
        pairs = list(subscriptions)
        if not pairs:
            raise InvalidArgument("subscriptions", pairs, "at least one (filter, qos) pair")
        for topic_filter, qos in pairs:
            if not topic_filter:
                raise InvalidArgument("filter", topic_filter, "a non-empty topic filter")
            if qos not in (0, 1):
                raise InvalidArgument("qos", qos, f"0 or 1 (for {topic_filter!r})")
            if topic_filter.startswith("$share/") and not self.settings.mqtt5:
                raise InvalidArgument(
                    "filter", topic_filter, "an ordinary filter: shared subscriptions need MQTT 5"
                )
        codes = await link.subscribe(pairs, self._timeout_s(timeout_s))
        if len(codes) != len(pairs):
            raise MqttRefused(
                f"expected a SUBACK code for each of {len(pairs)} filters, got {len(codes)}",
                0x82,
                "Protocol error",
            )
        refused = {
            topic_filter: (code.value, str(code))
            for (topic_filter, _), code in zip(pairs, codes, strict=True)
            if code.is_failure
        }
        if refused:
            raise SubscribeRefused(refused)
        return tuple(code.value for code in codes)

    def _timeout_s(self, timeout_s: float | None) -> float:
        return self.settings.operation_timeout_s if timeout_s is None else timeout_s

    # inbound

    def messages(self) -> InboundMessages:
        """Inbound messages in arrival order, across reconnections; ends after ``stop()``."""
        return InboundMessages(self._inbound, self._stopped)

    def ack(self, message: InboundMessage) -> bool:
        """Acknowledge ``message`` once the application has committed it; True if sent.

        False, and nothing sent, for QoS 0, without manual acks, after ``stop()``, for a
        message already acknowledged, and for one that came on an earlier connection: the
        broker sends that one again on the current connection (if the session survived), to
        be acknowledged then. Never raises: the application has done its part.
        """
        if message.qos == 0 or not self.settings.manual_ack or self._link is None:
            return False
        return self._link.ack(message)

    # the reconnect loop

    async def _run(self) -> None:
        assert self._link is not None  # start() makes it before this task
        link = self._link
        failures = 0
        while True:
            try:
                up_s = await self._connection_cycle(link, failures)
            except (MqttTransportError, MqttRefused) as exc:
                failures += 1
                delay_s = self._backoff.delay_s(failures)
                self._log_connect_failure(exc, failures, delay_s)
            except Exception:  # a bug must not end the reconnect loop
                failures += 1
                delay_s = self._backoff.delay_s(failures)
                log.exception(
                    "mqtt_connection_cycle_crashed",
                    client_id=self.settings.client_id,
                    retry_in_s=round(delay_s, 3),
                )
                link.abort()
            else:
                # A connection that outlived the longest pause was healthy: start the backoff
                # over. One that dropped sooner counts as a failure, so flapping slows down.
                failures = 0 if up_s >= self.settings.reconnect_max_s else failures + 1
                delay_s = self._backoff.delay_s(failures)
                log.warning(
                    "mqtt_connection_lost",
                    client_id=self.settings.client_id,
                    reason=link.disconnect_reason,
                    connected_s=round(up_s, 3),
                    retry_in_s=round(delay_s, 3),
                )
            await asyncio.sleep(delay_s)

    async def _connection_cycle(self, link: PahoLink, failures: int) -> float:
        """Connect, run the hook, wait for the link to drop; return how long it was up."""
        loop = asyncio.get_running_loop()
        log.debug(
            "mqtt_connecting",
            client_id=self.settings.client_id,
            host=self.settings.host,
            port=self.settings.port,
        )
        info = await link.connect()
        up_since = loop.time()
        self._throttle.reset()
        log.info(
            "mqtt_connected",
            client_id=self.settings.client_id,
            connection_id=info.connection_id,
            session_present=info.session_present,
            after_failures=failures,
        )
        try:
            if not await self._run_hook(link, info):
                await link.lost.wait()
                return 0.0
            if link.up:
                self._ready.set()
            await link.lost.wait()
            return loop.time() - up_since
        finally:
            self._disconnected()

    def _disconnected(self) -> None:
        if self._on_disconnect is None:
            return
        try:
            self._on_disconnect()
        except Exception:  # the caller's bug must not end the reconnect loop
            log.exception("mqtt_on_disconnect_failed", client_id=self.settings.client_id)

    async def _run_hook(self, link: PahoLink, info: ConnectionInfo) -> bool:
        """True once the hook has finished; False if it failed or the link dropped first.

        A hook that fails (say, its SUBSCRIBE was refused) ends the connection, so that the
        next one runs the hook again; a hook still running when the link drops is cancelled.
        """
        if self._hook is None:
            return True
        hook = asyncio.ensure_future(self._hook(info))
        lost = asyncio.ensure_future(link.lost.wait())
        try:
            await asyncio.wait({hook, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not hook.done():
                hook.cancel()
                await asyncio.wait([hook])
        if hook.cancelled():
            return False
        error = hook.exception()
        if error is None:
            return True
        if not link.lost.is_set():  # else the error is only the lost link, logged anyway
            log.error(
                "mqtt_on_connect_failed",
                client_id=self.settings.client_id,
                connection_id=info.connection_id,
                error=type(error).__name__,
                exc_info=error,
            )
            await link.disconnect(send_will=False)
        return False

    def _log_connect_failure(self, exc: MqttError, failures: int, delay_s: float) -> None:
        fields: dict[str, Any] = {
            "client_id": self.settings.client_id,
            "host": self.settings.host,
            "port": self.settings.port,
            "error": type(exc).__name__,
            "reason": str(exc),
            "failures": failures,
            "retry_in_s": round(delay_s, 3),
        }
        suppressed = self._throttle.admit(asyncio.get_running_loop().time())
        if suppressed is None:
            log.debug("mqtt_connect_failed", **fields)
        else:
            log.warning("mqtt_connect_failed", suppressed=suppressed, **fields)


class InboundMessages(AsyncIterator[InboundMessage]):
    """A view of the client's inbound queue, as an async iterator; ``len()`` is how many
    messages wait in it. Several views may be open; each message goes to one of them."""

    def __init__(self, queue: asyncio.Queue[InboundMessage | None], ended: asyncio.Event) -> None:
        # stop() puts one None last and sets `ended`; an iterator that takes the None puts
        # it back at once, so between awaits the queue holds exactly one None once ended.
        self._queue = queue
        self._ended = ended

    def __len__(self) -> int:
        return self._queue.qsize() - (1 if self._ended.is_set() else 0)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> InboundMessage:
        message = await self._queue.get()
        if message is None:
            self._queue.put_nowait(None)  # leave the mark for any other iterator
            raise StopAsyncIteration
        return message
