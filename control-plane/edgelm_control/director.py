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
  expiry still finds a valid state when it returns;
* signs with the key the fleet's published root names (``key`` may be a callable, see
  :class:`edgelm_control.repository.director_keys.DirectorKeyring`), and after a rotation
  re-signs every current state signed with another key (:meth:`Director.resign_other_keys`);
* never signs, stores or publishes a state for a device once its revocation has committed
  (:mod:`edgelm_control.store.revocations` orders each issue and each publishing batch
  against it).

"No model" (an abort for a device whose previous model the fleet cannot name) is a signed
*release*: a desired state whose target is null, sequenced, expiring and re-signed like any
other. The device stops its download and undoes what the rollout switched (see
``edgelm_protocol.desired``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
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
    clear_desired,
    expiring,
    mark_current_unpublished,
    mark_published,
    next_sequence,
    record_desired,
    signed_after,
    unpublished,
)
from edgelm_control.store.revocations import get_revocation, lock_revocations, revoked_among
from edgelm_protocol import (
    CONTROL_SENDER,
    Channel,
    DesiredDocument,
    DesiredState,
    TargetRef,
    Topic,
    encode,
    key_id,
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
        key: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey],
        store: Store,
        publisher: FleetPublisher,
        clock: Clock,
        metrics: ControlMetrics,
        expiry_s: int,
    ) -> None:
        self.fleet = fleet
        self._key = key if callable(key) else (lambda: key)
        self._store = store
        self._publisher = publisher
        self._clock = clock
        self._metrics = metrics
        self.expiry_s = expiry_s
        self._publishing = asyncio.Lock()

    async def issue(
        self, conn: AsyncConnection, device_id: str, assignment: Assignment, *, floor: int
    ) -> int | None:
        """Sign and store a new desired state for ``device_id`` in the caller's transaction;
        return its sequence. Call :meth:`publish_pending` after the commit.

        A revoked device gets nothing: None, and whatever state it still held is withdrawn
        (:func:`~edgelm_control.store.desired.clear_desired`)."""
        now_ms = self._clock.now_ms()
        # Ordered against revocations before the device's row is touched: one that committed
        # is seen here, even by a transaction that read the row before it committed (a
        # re-signing batch, a wave start, an abort); one that comes later waits for this
        # transaction and then withdraws what it stored.
        if await get_revocation(conn, device_id, lock=True) is not None:
            await clear_desired(conn, device_id, now_ms=now_ms)
            return None
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
        document = DesiredDocument.from_json(sign_desired(state, self._key()))
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

        Each batch is one transaction, ordered against revocations and held until the broker
        has answered: a revocation waits for the batch in flight, so no signed state goes out
        after the device's revocation has committed (the batch after it carries the empty
        message that deletes the broker's copy). A signed state stored for a revoked device
        is never published: the empty message goes in its place. On SQLite this holds the
        write lane for a batch's round trips (its marks are one transaction, not one each).
        """
        published = 0
        async with self._publishing:
            while self._publisher.connected:
                async with self._store.read() as conn:  # nothing to do: no write lane taken
                    if not await unpublished(conn, limit=1):
                        break
                async with self._store.write() as conn:
                    await lock_revocations(conn, writer=False)
                    batch = await unpublished(conn, limit=500)
                    if not batch:
                        break
                    revoked = await revoked_among(conn, [r.device_id for r in batch], lock=False)
                    results = await bounded_gather(
                        [self._publish(r, withdrawn=r.device_id in revoked) for r in batch]
                    )
                    for record, taken in zip(batch, results, strict=True):
                        if taken:
                            await mark_published(conn, record.device_id, record.sequence)
                            self._metrics.desired_published.inc()
                            log.debug(
                                "desired_published",
                                device=record.device_id,
                                sequence=record.sequence,
                            )
                published += sum(results)
                if not all(results):
                    break
        return published

    async def _publish(self, record: DesiredRecord, *, withdrawn: bool) -> bool:
        """Publish one state (``withdrawn``: the empty message instead); True on PUBACK."""
        topic = Topic.for_device(self.fleet, record.device_id, Channel.DESIRED)
        document = None if withdrawn else record.document
        payload = b"" if document is None else document.encode()
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
        return True

    async def resign_expiring(self, *, before_s: int) -> int:
        """Re-sign current assignments that expire within ``before_s``; return how many."""
        horizon = seconds(self._clock.now_ms()) + before_s
        count = 0
        while True:
            async with self._store.write() as conn:
                # Before reading: a state withdrawn by a revocation is not read as due.
                await lock_revocations(conn, writer=False)
                due = await expiring(conn, before_s=horizon, limit=200)
                for record in due:
                    target = None if record.target is None else TargetRef(*record.target)
                    sequence = await self.issue(
                        conn,
                        record.device_id,
                        Assignment(record.model, target, record.rollout_id),
                        floor=record.sequence,
                    )
                    if sequence is not None:
                        count += 1
            if len(due) < 200:
                break
        if count:
            log.info("desired_resigned", devices=count)
            await self.publish_pending()
        return count

    async def resign_other_keys(self, *, batch: int = 200) -> int:
        """Re-sign every current state signed by a key other than the one to sign with now
        (the fleet's root named a new director key); return how many, then publish them.

        A device that has not walked to the new root yet gets a state signed by a key it
        does not know: it refreshes its TUF metadata once, learns the key from the root, and
        verifies again. One that has walked already would refuse the old key's states.
        """
        keyid = key_id(self._key().public_key())
        count = 0
        after: str | None = None
        while True:
            async with self._store.write() as conn:
                # Before reading: a state withdrawn by a revocation is not read as signed.
                await lock_revocations(conn, writer=False)
                rows = await signed_after(conn, after_device_id=after, limit=batch)
                for record in rows:
                    if keyid in _signers(record.document):
                        continue
                    target = None if record.target is None else TargetRef(*record.target)
                    sequence = await self.issue(
                        conn,
                        record.device_id,
                        Assignment(record.model, target, record.rollout_id),
                        floor=record.sequence,
                    )
                    if sequence is not None:
                        count += 1
            if len(rows) < batch:
                break
            after = rows[-1].device_id
        if count:
            log.info("desired_resigned_new_key", devices=count, keyid=keyid[:16])
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


def _signers(document: str | None) -> set[str]:
    """The keyids that signed a stored desired-state envelope (empty if it cannot be read)."""
    try:
        signatures = json.loads(document or "")["body"]["signatures"]
        return {str(sig["keyid"]) for sig in signatures}
    except (ValueError, KeyError, TypeError):
        return set()
