"""Remote jobs: the job, one row per device, and the results devices send back.

Results are stored once by their message id (``job_results``); a device's row then moves
to its final state with a compare-and-set from ``queued`` or ``sent``, so a result delivered
twice is stored once and applied once, and is acknowledged both times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.jobs.states import CANCELLABLE, OPEN, JobDeviceState
from edgelm_control.store.schema import job_devices, job_results, jobs
from edgelm_control.store.sql import dumps, insert_for, loads


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request: dict[str, Any]
    selector: dict[str, Any]
    priority: int
    ttl_s: float | None
    max_attempts: int
    metadata: dict[str, Any] | None
    wait_for_model: bool
    created_ms: int


@dataclass(frozen=True)
class JobDeviceRecord:
    job_id: str
    device_id: str
    message_id: str
    state: JobDeviceState
    sent_ms: int | None
    finished_ms: int | None
    result_message_id: str | None


@dataclass(frozen=True)
class JobResultRecord:
    message_id: str
    job_message_id: str
    device_id: str
    state: str
    metadata: Any
    result: Any
    error: Any
    sent_ms: int
    received_ms: int


def _job(row: Any) -> JobRecord:
    return JobRecord(
        job_id=row.id,
        request=loads(row.request),
        selector=loads(row.selector),
        priority=row.priority,
        ttl_s=row.ttl_s,
        max_attempts=row.max_attempts,
        metadata=loads(row.metadata),
        wait_for_model=bool(row.wait_for_model),
        created_ms=row.created_ms,
    )


def _job_device(row: Any) -> JobDeviceRecord:
    values = {c.name: getattr(row, c.name) for c in job_devices.columns}
    values["state"] = JobDeviceState(values["state"])
    return JobDeviceRecord(**values)


def _result(row: Any) -> JobResultRecord:
    return JobResultRecord(
        message_id=row.message_id,
        job_message_id=row.job_message_id,
        device_id=row.device_id,
        state=row.state,
        metadata=loads(row.metadata),
        result=loads(row.result),
        error=loads(row.error),
        sent_ms=row.sent_ms,
        received_ms=row.received_ms,
    )


async def insert_job(
    conn: AsyncConnection, job: JobRecord, device_messages: Sequence[tuple[str, str]]
) -> None:
    """Store a job and one ``queued`` row per (device id, job envelope id)."""
    await conn.execute(
        jobs.insert().values(
            id=job.job_id,
            request=dumps(job.request),
            selector=dumps(job.selector),
            priority=job.priority,
            ttl_s=job.ttl_s,
            max_attempts=job.max_attempts,
            metadata=None if job.metadata is None else dumps(job.metadata),
            wait_for_model=job.wait_for_model,
            created_ms=job.created_ms,
        )
    )
    await conn.execute(
        job_devices.insert(),
        [
            {
                "job_id": job.job_id,
                "device_id": device_id,
                "message_id": message_id,
                "state": str(JobDeviceState.QUEUED),
            }
            for device_id, message_id in device_messages
        ],
    )


async def get_job(conn: AsyncConnection, job_id: str) -> JobRecord | None:
    row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
    return None if row is None else _job(row)


async def list_jobs(
    conn: AsyncConnection, *, after: tuple[int, str] | None, limit: int
) -> list[JobRecord]:
    query = select(jobs).order_by(jobs.c.created_ms.desc(), jobs.c.id.desc()).limit(limit)
    if after is not None:
        created, job_id = after
        query = query.where(
            (jobs.c.created_ms < created) | and_(jobs.c.created_ms == created, jobs.c.id < job_id)
        )
    return [_job(row) for row in await conn.execute(query)]


async def job_device_rows(conn: AsyncConnection, job_id: str) -> list[JobDeviceRecord]:
    query = (
        select(job_devices).where(job_devices.c.job_id == job_id).order_by(job_devices.c.device_id)
    )
    return [_job_device(row) for row in await conn.execute(query)]


async def queued(conn: AsyncConnection, *, limit: int) -> list[tuple[JobRecord, JobDeviceRecord]]:
    """Rows the broker has not taken yet, with their jobs, oldest job first."""
    query = (
        select(jobs, job_devices)
        .join(jobs, jobs.c.id == job_devices.c.job_id)
        .where(job_devices.c.state == str(JobDeviceState.QUEUED))
        .order_by(jobs.c.created_ms, job_devices.c.device_id)
        .limit(limit)
    )
    return [(_job(row), _job_device(row)) for row in await conn.execute(query)]


async def mark_sent(conn: AsyncConnection, message_id: str, now_ms: int) -> bool:
    result = await conn.execute(
        update(job_devices)
        .where(job_devices.c.message_id == message_id)
        .where(job_devices.c.state == str(JobDeviceState.QUEUED))
        .values(state=str(JobDeviceState.SENT), sent_ms=now_ms)
    )
    return bool(result.rowcount == 1)


async def insert_results(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Store results not stored before; return the message ids that are new."""
    if not rows:
        return set()
    statement = (
        insert_for(conn, job_results)
        .on_conflict_do_nothing(index_elements=[job_results.c.message_id])
        .returning(job_results.c.message_id)
    )
    return {row[0] for row in await conn.execute(statement, list(rows))}


async def finish(
    conn: AsyncConnection,
    *,
    job_message_id: str,
    device_id: str,
    state: JobDeviceState,
    result_message_id: str,
    now_ms: int,
) -> str | None:
    """Move the device's row of this job to its final ``state``; return the job id if moved.

    The device must be the one the job was sent to: a result naming another device's job is
    refused here (a device can only publish under its own topic, so it cannot fake one).
    """
    result = await conn.execute(
        update(job_devices)
        .where(job_devices.c.message_id == job_message_id)
        .where(job_devices.c.device_id == device_id)
        .where(job_devices.c.state.in_(sorted(str(s) for s in OPEN)))
        .values(state=str(state), finished_ms=now_ms, result_message_id=result_message_id)
        .returning(job_devices.c.job_id)
    )
    row = result.first()
    return None if row is None else str(row[0])


async def results_of(
    conn: AsyncConnection, message_ids: Sequence[str]
) -> dict[str, JobResultRecord]:
    if not message_ids:
        return {}
    query = select(job_results).where(job_results.c.message_id.in_(sorted(set(message_ids))))
    return {row.message_id: _result(row) for row in await conn.execute(query)}


async def cancel_device_jobs(conn: AsyncConnection, device_id: str, *, now_ms: int) -> list[str]:
    """Cancel the device's rows that have no result yet (it was revoked); return their job ids."""
    result = await conn.execute(
        update(job_devices)
        .where(job_devices.c.device_id == device_id)
        .where(job_devices.c.state.in_(sorted(str(s) for s in CANCELLABLE)))
        .values(state=str(JobDeviceState.CANCELLED), finished_ms=now_ms)
        .returning(job_devices.c.job_id)
    )
    return sorted(str(row[0]) for row in result)
