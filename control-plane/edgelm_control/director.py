"""The director (Uptane's): per-device desired states, signed, sequenced, retained.

A desired state tells one device which TUF target to run. The director:

* takes the device's next sequence from the store (an atomic increment that never falls
  below what the device reports it applied), so sequences only grow, across replicas and
  restarts;
* signs the state with ``keys/director.pem`` (:func:`edgelm_protocol.sign_desired`), valid
  for ``desired_expiry_s``;
* stores the signed envelope in the caller's transaction (the rollout engine issues desired
  states in the same transaction that moves the rollout's rows), and publishes it retained on
  ``dev/{id}/desired`` after the commit, marking it published on PUBACK;
* republishes whatever a broker outage or a crash left unpublished, on every connection;
* re-signs current assignments before they expire, so a device away for longer than the
  expiry still finds a valid state when it returns.

"No model" (an abort for a device whose previous model the fleet cannot name) is a signed
*release*: a desired state whose target is null, sequenced, expiring and re-signed like any
other. The device stops its download and undoes what the rollout switched (see
``edgelm_protocol.desired``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.clock import Clock, seconds
from edgelm_control.errors import ConfigError
from edgelm_control.fleet.ports import FleetPublisher, bounded_gather
from edgelm_control.metrics import ControlMetrics
from edgelm_control.store import Store
from edgelm_control.store.desired import (
    DesiredRecord,
    expiring,
    mark_current_unpublished,
    mark_published,
    next_sequence,
    record_desired,
    unpublished,
)
from edgelm_protocol import (
    CONTROL_SENDER,
    Channel,
    DesiredDocument,
    DesiredState,
    TargetRef,
    Topic,
    encode,
    new_envelope,
    sign_desired,
)
from edgelm_protocol.mqtt import MqttError

log = structlog.get_logger(__name__)


def load_director_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the director key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the director key {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the director key {path} must be Ed25519, got {type(key).__name__}")
    return key


@dataclass(frozen=True)
class Assignment:
    """What a device should run: a target (None: nothing), for a rollout (or None)."""

    model: str | None
    target: TargetRef | None
    rollout_id: str | None


class Director:
    def __init__(
        self,
        *,
        fleet: str,
        key: Ed25519PrivateKey,
        store: Store,
        publisher: FleetPublisher,
        clock: Clock,
        metrics: ControlMetrics,
        expiry_s: int,
    ) -> None:
        self.fleet = fleet
        self._key = key
        self._store = store
        self._publisher = publisher
        self._clock = clock
        self._metrics = metrics
        self.expiry_s = expiry_s
        self._publishing = asyncio.Lock()

    async def issue(
        self, conn: AsyncConnection, device_id: str, assignment: Assignment, *, floor: int
    ) -> int:
        """Sign and store a new desired state for ``device_id`` in the caller's transaction;
        return its sequence. Call :meth:`publish_pending` after the commit."""
        now_ms = self._clock.now_ms()
        sequence = await next_sequence(conn, device_id, floor=floor, now_ms=now_ms)
        issued_at = seconds(now_ms)
        expires = issued_at + self.expiry_s
        target = assignment.target
        state = DesiredState(
            fleet=self.fleet,
            device=device_id,
            sequence=sequence,
            issued_at=issued_at,
            expires=expires,
            rollout=assignment.rollout_id,
            target=target,
        )
        document = DesiredDocument.from_json(sign_desired(state, self._key))
        envelope = new_envelope(document, sender=CONTROL_SENDER, ts_ms=now_ms)
        await record_desired(
            conn,
            device_id,
            sequence=sequence,
            rollout_id=assignment.rollout_id,
            model=assignment.model if target is not None else None,
            target=None if target is None else (target.path, target.length, target.sha256),
            issued_at_s=issued_at,
            expires_s=expires,
            document=encode(envelope).decode(),
            now_ms=now_ms,
        )
        self._metrics.desired_issued.inc()
        return sequence

    async def publish_pending(self) -> int:
        """Publish every desired state the broker has not taken; return how many it took.

        Stops at the first transport failure (the next connection calls this again).
        """
        published = 0
        async with self._publishing:
            while self._publisher.connected:
                async with self._store.read() as conn:
                    batch = await unpublished(conn, limit=500)
                if not batch:
                    break
                results = await bounded_gather([self._publish(r) for r in batch])
                published += sum(results)
                if not all(results):
                    break
        return published

    async def _publish(self, record: DesiredRecord) -> bool:
        topic = Topic.for_device(self.fleet, record.device_id, Channel.DESIRED)
        payload = b"" if record.document is None else record.document.encode()
        try:
            await self._publisher.publish(topic, payload, retain=True)
        except MqttError as exc:
            log.warning(
                "desired_publish_failed",
                device=record.device_id,
                sequence=record.sequence,
                error=type(exc).__name__,
            )
            return False
        async with self._store.write() as conn:
            await mark_published(conn, record.device_id, record.sequence)
        self._metrics.desired_published.inc()
        log.debug("desired_published", device=record.device_id, sequence=record.sequence)
        return True

    async def resign_expiring(self, *, before_s: int) -> int:
        """Re-sign current assignments that expire within ``before_s``; return how many."""
        horizon = seconds(self._clock.now_ms()) + before_s
        count = 0
        while True:
            async with self._store.write() as conn:
                due = await expiring(conn, before_s=horizon, limit=200)
                for record in due:
                    target = None if record.target is None else TargetRef(*record.target)
                    await self.issue(
                        conn,
                        record.device_id,
                        Assignment(record.model, target, record.rollout_id),
                        floor=record.sequence,
                    )
            count += len(due)
            if len(due) < 200:
                break
        if count:
            log.info("desired_resigned", devices=count)
            await self.publish_pending()
        return count

    async def republish_current(self, *, batch: int = 500) -> int:
        """Publish every device's current desired state again; return how many the broker took.

        For a connection without a session (``session_present`` False): the broker may have
        lost its retained messages (restarted without persistence, or replaced), so a device
        that connects would find no desired state. The current states are first marked
        unpublished in the store, ``batch`` devices per transaction, then
        :meth:`publish_pending` sends them; what a new outage or a crash leaves unpublished
        goes out on the next connection, like any unpublished state. Republishing a state the
        broker still holds is harmless: the same envelope again, which devices ignore.
        """
        marked = 0
        after: str | None = None
        # Under the publishing lock: a publish to the old broker still in flight cannot
        # mark its state published after this marked it unpublished.
        async with self._publishing:
            while True:
                async with self._store.write() as conn:
                    ids = await mark_current_unpublished(conn, after_device_id=after, limit=batch)
                if not ids:
                    break
                marked += len(ids)
                after = ids[-1]
        log.info("desired_republishing", devices=marked)
        return await self.publish_pending()
