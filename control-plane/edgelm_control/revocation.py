"""Revoking a device: what ``POST /api/v1/devices/{id}/revoke`` does, in one transaction.

``edgelm provision revoke`` puts the device's certificates on the CRL (the broker refuses its
new connections once reloaded) and then tells the control plane, which:

1. records the revocation (:mod:`edgelm_control.store.revocations`): from the commit on, the
   ingest path refuses everything the device sent (``device_revoked``), including what the
   broker queued before and what was waiting in a batch;
2. takes the device out of every rollout it is in (the ``revoke`` row event: ``revoked``,
   which the wave gates leave out);
3. cancels its remote jobs that have no result (``queued`` or ``sent`` → ``cancelled``);
4. withdraws its desired state: the director publishes an empty retained message on its
   ``desired`` topic once the transaction commits, which deletes the broker's copy.

All four commit together or not at all. Revoking again changes nothing and answers with the
first revocation (its time and reason); it also redoes 2 to 4, which find nothing left to do.
A revoked id never comes back: enroll the hardware again under a new id.

What it cannot reach: a remote job the broker already holds in the device's own session stays
there (the device can no longer connect to fetch it), and a connection the device already had
stays open until it drops, though everything sent on it is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from edgelm_control.clock import Clock
from edgelm_control.hub import FleetHub
from edgelm_control.rollouts.actions import Changes
from edgelm_control.rollouts.engine import RolloutEngine
from edgelm_control.store import Store
from edgelm_control.store.desired import clear_desired
from edgelm_control.store.jobs import cancel_device_jobs
from edgelm_control.store.revocations import Revocation, record_revocation

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RevocationResult:
    revocation: Revocation
    created: bool  # False: the device was revoked before
    rollouts: tuple[str, ...]  # the rollouts it left now
    jobs_cancelled: tuple[str, ...]  # the jobs whose row for it was cancelled now
    desired_cleared: bool  # it had a desired state, now withdrawn


class DeviceRevoker:
    def __init__(self, *, store: Store, engine: RolloutEngine, clock: Clock, hub: FleetHub) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._hub = hub

    async def revoke(self, device_id: str, *, reason: str | None) -> RevocationResult:
        """Revoke ``device_id`` (a checked id); idempotent."""
        changes = Changes()
        now_ms = self._clock.now_ms()
        async with self._store.write() as conn:
            # First, before any row lock: this is what orders it against ingest batches.
            revocation, created = await record_revocation(
                conn, device_id, reason=reason, now_ms=now_ms
            )
            rollouts = await self._engine.revoke_device(
                conn, device_id, reason=revocation.note, changes=changes
            )
            jobs = await cancel_device_jobs(conn, device_id, now_ms=now_ms)
            cleared = await clear_desired(conn, device_id, now_ms=now_ms)
        result = RevocationResult(revocation, created, tuple(rollouts), tuple(jobs), cleared)
        log.info(
            "device_revoked",
            device=device_id,
            created=created,
            reason=revocation.reason,
            rollouts=list(rollouts),
            jobs_cancelled=len(jobs),
            desired_cleared=cleared,
        )
        self._hub.publish("device", {"id": device_id, "revoked": True})
        for job_id in jobs:
            self._hub.publish("job", {"id": job_id, "state": "cancelled", "device": device_id})
        # Publishes the empty retained desired state now, or on the next connection.
        await self._engine.published(changes)
        return result
