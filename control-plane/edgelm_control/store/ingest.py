"""Storing one ingest batch, in the caller's transaction: devices first, then the rest.

Revocations come before everything: the batch's revoked devices are looked up after the
revocation lock (:mod:`.revocations`), in this transaction, and their rows dropped, so a
revocation that commits while the batch waits is seen, and nothing a revoked device sent is
stored or acted upon (the caller refuses those messages with ``device_revoked``).

Devices come first so that every row below names a device that exists. Events and results
are inserted with ``ON CONFLICT DO NOTHING ... RETURNING``: what comes back is what is new,
so a redelivered message is stored once and applied once, and is acknowledged every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.fleet.batch import IngestBatch
from edgelm_control.jobs.states import JobDeviceState
from edgelm_control.store.devices import DeviceChange, apply_reports
from edgelm_control.store.events import insert_events
from edgelm_control.store.jobs import finish, insert_results
from edgelm_control.store.revocations import revoked_among
from edgelm_control.store.telemetry import insert_telemetry


@dataclass(frozen=True)
class WriteOutcome:
    new_events: frozenset[str] = frozenset()
    new_results: frozenset[str] = frozenset()
    device_changes: tuple[DeviceChange, ...] = ()
    finished_jobs: frozenset[str] = field(default_factory=frozenset)
    #: Devices of the batch that are revoked: nothing of theirs was stored.
    revoked: frozenset[str] = frozenset()


async def write_batch(conn: AsyncConnection, batch: IngestBatch, now_ms: int) -> WriteOutcome:
    revoked = await revoked_among(conn, batch.devices, lock=True)
    batch = batch.without(revoked)
    changes = await apply_reports(conn, batch.reports, now_ms)
    await insert_telemetry(conn, batch.telemetry)
    new_events = await insert_events(conn, batch.events)
    new_results = await insert_results(conn, batch.results)
    finished: set[str] = set()
    for row in batch.results:
        if row["message_id"] not in new_results:
            continue
        job_id = await finish(
            conn,
            job_message_id=row["job_message_id"],
            device_id=row["device_id"],
            state=JobDeviceState(row["state"]),
            result_message_id=row["message_id"],
            now_ms=now_ms,
        )
        if job_id is not None:
            finished.add(job_id)
    return WriteOutcome(
        new_events=frozenset(new_events),
        new_results=frozenset(new_results),
        device_changes=tuple(c for c in changes if c.any),
        finished_jobs=frozenset(finished),
        revoked=revoked,
    )
