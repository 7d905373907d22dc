"""Inbound messages: decode, drop what is refused or repeated, store in batches, then ack.

Every message from the broker goes through :func:`edgelm_protocol.decode`. A refused one
(malformed, oversized, the wrong type for its topic, a ``from`` that is not the topic's
device, an unknown schema version) is logged with its code, acknowledged to the broker so it
is not delivered again, and dropped; nothing a device sends can stop the loop.

Accepted messages wait at most ``flush_interval_s`` (or until ``batch_max`` have come) and
are stored in one transaction (:func:`~edgelm_control.store.ingest.write_batch`). Only after
the commit:

1. each message is acknowledged to the broker (manual ack: a crash before this point makes
   the broker send it again, and the store keeps it once);
2. events and job results are acknowledged end to end, one ``ack`` per device per batch
   naming their ids, on ``dev/{id}/ack``: the device deletes them from its outbox;
3. the listeners hear what changed (the rollout engine, remote jobs, the SSE hub).

A message from a revoked device is refused with ``device_revoked`` (counted, logged with
the device, acknowledged to the broker so the queue drains, and not acknowledged end to end):
the store drops its rows in the transaction that writes the batch, after the revocation lock,
so this holds for what the broker queued before the revocation, for what was already waiting
in a batch here when it landed, and for what arrives through a connection the device held
before the broker reloaded its CRL. Nothing of it is stored, and no listener hears of it.

Telemetry, presence and state are idempotent or nearly so, and are dropped in memory when
their message id repeats (:class:`~edgelm_protocol.RecentIds`). Events and results always go
to the store, which keeps each id once, because a repeat usually means our ``ack`` was lost
and the device needs another.

When the store fails, the batch is kept and retried with backoff (the broker holds the rest:
``receive_maximum`` bounds what is unacknowledged). When the database refuses a batch's
data, the batch is split and stored message by message, and a message the database refuses
on its own is logged, acknowledged and dropped, so one poisoned message cannot stall a
device. Any other exception is a bug: the batch stays unacknowledged, the service fails
loudly and is restarted by its supervisor, and the devices keep their messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from sqlalchemy.exc import DBAPIError

from edgelm_control.clock import Clock
from edgelm_control.errors import StoreUnavailable
from edgelm_control.fleet.batch import Accepted, Item, build_batch
from edgelm_control.fleet.decoder import DecodedTelemetry, Refusal, TelemetryDecoder
from edgelm_control.fleet.link import FleetLink
from edgelm_control.fleet.ports import bounded_gather
from edgelm_control.logs import RateLimitedLog
from edgelm_control.metrics import ControlMetrics
from edgelm_control.store import Store
from edgelm_control.store.devices import DeviceReport
from edgelm_control.store.ingest import WriteOutcome, write_batch
from edgelm_protocol import (
    CHANNEL_FOR_TYPE,
    CONTROL_SENDER,
    Ack,
    Channel,
    Direction,
    MessageRefused,
    MessageType,
    RecentIds,
    Topic,
    decode,
    encode,
    new_envelope,
)
from edgelm_protocol.bodies import MAX_ACK_IDS
from edgelm_protocol.mqtt import InboundMessage, MqttError

log = structlog.get_logger(__name__)

DURABLE_TYPES = frozenset({MessageType.EVENT, MessageType.JOB_RESULT})
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
LAST_SEEN_RESOLUTION_MS = 1000
DECODE_BATCH_MIN = 50
DECODE_WAIT_MAX_S = 0.01
WRITTEN_CAPACITY = 200_000
NOT_MY_TOPIC = "not_my_topic"
DEVICE_REVOKED = "device_revoked"


class IngestListener(Protocol):
    async def ingested(self, outcome: WriteOutcome) -> None: ...


@dataclass(frozen=True)
class Pending:
    message: InboundMessage
    accepted: Item

    @property
    def type(self) -> MessageType:
        if isinstance(self.accepted, DecodedTelemetry):
            return MessageType.TELEMETRY
        return self.accepted.envelope.type


class Ingestor:
    def __init__(
        self,
        *,
        store: Store,
        link: FleetLink,
        clock: Clock,
        metrics: ControlMetrics,
        batch_max: int,
        flush_interval_s: float,
        decoder: TelemetryDecoder | None = None,
        dedupe_capacity: int = 100_000,
        crash_point: str | None = None,
    ) -> None:
        self._store = store
        self._link = link
        self._clock = clock
        self._metrics = metrics
        self._batch_max = batch_max
        self._flush_interval_s = flush_interval_s
        self._recent = RecentIds(dedupe_capacity)
        self._crash_point = crash_point
        self._pending: list[Pending] = []
        self._arrived = asyncio.Event()
        self._decoder = decoder or TelemetryDecoder(workers=0)
        self._raw: list[InboundMessage] = []  # telemetry waiting for the decoder
        self._raw_arrived = asyncio.Event()
        self._listeners: list[IngestListener] = []
        self._refusals = RateLimitedLog(log, "fleet_message_refused")
        # Label lookups cost more than the increments; resolve them once.
        self._inbound = {c: metrics.inbound.labels(str(c)) for c in Channel}
        self._duplicates = {c: metrics.duplicates.labels(str(c)) for c in Channel}
        self._stored = {t: metrics.stored.labels(str(t)) for t in MessageType}
        # Devices this replica wrote lately, and when: telemetry alone does not rewrite them.
        self._written: dict[str, int] = {}

    def add_listener(self, listener: IngestListener) -> None:
        self._listeners.append(listener)

    @property
    def backlog(self) -> int:
        return len(self._pending) + len(self._raw)

    # --- receiving ---------------------------------------------------------------------------

    async def receive(self) -> None:
        """Read the link's messages until it stops (a service: runs until cancelled)."""
        async for message in self._link.messages():
            self.accept(message)

    def accept(self, message: InboundMessage) -> None:
        """Decode one message and queue it, or drop it with a log line; telemetry goes to
        the decoder in batches (:meth:`decode_telemetry`)."""
        try:
            topic = Topic.parse(message.topic)
            if (
                topic.fleet != self._link.fleet
                or topic.spec.direction is not Direction.DEVICE_TO_CONTROL
                or topic.device is None
            ):
                # Another fleet's, or a channel the control plane sends on (its own retained
                # desired states, from a broker that delivers what was not subscribed to, as
                # amqtt does): refused, or the device would count as seen.
                self._refuse(message, NOT_MY_TOPIC, message.topic, "not a topic it subscribes to")
                return
            self._inbound[topic.channel].inc()
            if topic.channel is Channel.TELEMETRY:
                self._raw.append(message)
                self._raw_arrived.set()
                return
            envelope = decode(topic, message.payload)
        except MessageRefused as exc:
            self._refuse(message, exc.code, exc.topic or message.topic, exc.reason)
            return
        self._admit(message, Accepted(topic.device, envelope), envelope.type)

    def _refuse(
        self,
        message: InboundMessage,
        code: str,
        topic: str,
        reason: str,
        *,
        device: str | None = None,
    ) -> None:
        self._metrics.refused.labels(code).inc()
        facts: dict[str, object] = {}
        if device is not None:
            facts["device"] = device
        # Keyed by device too where there is one: one revoked device's backlog must not
        # hide another's lines.
        self._refusals.warning(
            code if device is None else f"{code}:{device}",
            code=code,
            topic=ascii(topic)[:200],
            reason=reason[:500],
            size_bytes=len(message.payload),
            **facts,
        )
        self._link.ack(message)

    def _admit(self, message: InboundMessage, item: Item, kind: MessageType) -> None:
        if not self._recent.admit(item.message_id):
            self._duplicates[CHANNEL_FOR_TYPE[kind]].inc()
            log.debug("fleet_message_duplicate", topic=message.topic, message_id=item.message_id)
            if kind not in DURABLE_TYPES:
                self._link.ack(message)
                return
        self._pending.append(Pending(message, item))
        self._arrived.set()

    async def decode_telemetry(self) -> None:
        """Decode waiting telemetry in batches, until cancelled (a service)."""
        while True:
            await self._raw_arrived.wait()
            if len(self._raw) < DECODE_BATCH_MIN and self._flush_interval_s > 0:
                # A batch costs one round trip to the worker: let a few arrive first.
                await asyncio.sleep(min(self._flush_interval_s, DECODE_WAIT_MAX_S))
            await self._decode_waiting()

    async def _decode_waiting(self) -> None:
        batch, self._raw = self._raw[: self._batch_max], self._raw[self._batch_max :]
        if not self._raw:
            self._raw_arrived.clear()
        results = await self._decoder.decode([(m.topic, m.payload) for m in batch])
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, Refusal):
                self._refuse(message, result.code, result.topic, result.reason)
            else:
                self._admit(message, result, MessageType.TELEMETRY)

    # --- storing -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Store what arrives, batch by batch, until cancelled."""
        failures = 0
        while True:
            await self._arrived.wait()
            if len(self._pending) < self._batch_max and self._flush_interval_s > 0:
                await asyncio.sleep(self._flush_interval_s)
            batch = self._pending[: self._batch_max]
            try:
                await self.store(batch)
            except StoreUnavailable as exc:
                failures += 1
                delay_s = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (failures - 1))
                self._metrics.ingest_failures.inc()
                log.warning(
                    "ingest_store_unavailable",
                    error=str(exc),
                    messages=len(batch),
                    retry_in_s=delay_s,
                )
                await asyncio.sleep(delay_s)
                continue
            failures = 0
            del self._pending[: len(batch)]
            if not self._pending:
                self._arrived.clear()

    async def drain(self) -> None:
        """Store everything queued now (a clean stop calls this before disconnecting)."""
        while self._raw:
            await self._decode_waiting()
        while self._pending:
            batch = self._pending[: self._batch_max]
            await self.store(batch)
            del self._pending[: len(batch)]
        self._arrived.clear()

    async def store(self, batch: Sequence[Pending]) -> None:
        """Store ``batch`` (split if the store refuses it), then acknowledge and notify."""
        if not batch:
            return
        started = time.perf_counter()
        try:
            outcome = await self._write(batch)
        except StoreUnavailable:
            raise
        except DBAPIError as exc:  # the database refused the data (not our code, not a bug)
            self._metrics.ingest_failures.inc()
            log.warning("ingest_batch_refused", error=str(exc)[:500], messages=len(batch))
            await self._store_one_by_one(batch)
            return
        self._metrics.flush_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(batch))
        await self._settle(batch, outcome)

    async def _write(self, batch: Sequence[Pending]) -> WriteOutcome:
        now_ms = self._clock.now_ms()
        rows = build_batch([p.accepted for p in batch], now_ms)
        rows.reports = [r for r in rows.reports if self._needs_write(r, now_ms)]
        async with self._store.write() as conn:
            outcome = await write_batch(conn, rows, now_ms)
        if len(self._written) > WRITTEN_CAPACITY:
            self._written.clear()
        for report in rows.reports:
            if report.device_id not in outcome.revoked:
                self._written[report.device_id] = now_ms
        for pending in batch:
            if pending.accepted.device_id not in outcome.revoked:
                self._stored[pending.type].inc()
        self._crash("ingest.after_commit")
        return outcome

    def _needs_write(self, report: DeviceReport, now_ms: int) -> bool:
        """Whether a device row must be written for ``report``: always for presence and
        state; for a device only seen (telemetry, events) once per ``LAST_SEEN_RESOLUTION_MS``,
        so a chatty device costs one row update a second, not one per message."""
        if report.presences or report.state is not None:
            return True
        written = self._written.get(report.device_id)
        return written is None or now_ms - written >= LAST_SEEN_RESOLUTION_MS

    async def _store_one_by_one(self, batch: Sequence[Pending]) -> None:
        for pending in batch:
            try:
                outcome = await self._write([pending])
            except StoreUnavailable:
                raise
            except DBAPIError as exc:
                log.error(
                    "ingest_message_dropped",
                    device=pending.accepted.device_id,
                    message_id=pending.accepted.message_id,
                    type=str(pending.type),
                    error=str(exc)[:500],
                )
                # Acknowledged anyway: it will never be storable, and resending it for ever
                # would hold the device's outbox.
                outcome = WriteOutcome()
            await self._settle([pending], outcome)

    async def _settle(self, batch: Sequence[Pending], outcome: WriteOutcome) -> None:
        stored = []
        for pending in batch:
            device = pending.accepted.device_id
            if device in outcome.revoked:
                # Acknowledged to the broker so the queue drains; never to the device (it
                # stored nothing), and nothing of it reaches a listener.
                self._refuse(
                    pending.message,
                    DEVICE_REVOKED,
                    pending.message.topic,
                    f"device {device} is revoked; {pending.type} {pending.accepted.message_id} "
                    "is dropped unstored",
                    device=device,
                )
            else:
                self._link.ack(pending.message)
                stored.append(pending)
        await self._ack_devices(stored)
        for listener in self._listeners:
            try:
                await listener.ingested(outcome)
            except Exception:  # a listener's bug must not undo what is stored and acked
                log.exception("ingest_listener_failed", listener=type(listener).__name__)

    async def _ack_devices(self, batch: Sequence[Pending]) -> None:
        ids: dict[str, dict[str, None]] = {}
        for pending in batch:
            if pending.type in DURABLE_TYPES:
                item = pending.accepted
                ids.setdefault(item.device_id, {})[item.message_id] = None
        calls = [
            self._publish_ack(device, list(chosen)[i : i + MAX_ACK_IDS])
            for device, chosen in ids.items()
            for i in range(0, len(chosen), MAX_ACK_IDS)
        ]
        if calls:
            await bounded_gather(calls)

    async def _publish_ack(self, device_id: str, message_ids: list[str]) -> bool:
        envelope = new_envelope(
            Ack(ids=tuple(message_ids)), sender=CONTROL_SENDER, ts_ms=self._clock.now_ms()
        )
        topic = Topic.for_device(self._link.fleet, device_id, Channel.ACK)
        try:
            await self._link.publish(topic, encode(envelope), retain=False)
        except MqttError as exc:
            # The device keeps the messages and sends them again; they are stored once.
            log.warning("ack_publish_failed", device=device_id, error=type(exc).__name__)
            return False
        self._metrics.acks_sent.inc(len(message_ids))
        return True

    def _crash(self, point: str) -> None:
        if self._crash_point == point:
            log.warning("crash_point_reached", point=point)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
