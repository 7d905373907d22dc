"""Per-device desired states and their sequence counters.

One row per device holds the sequence counter and the current desired state. The counter
only grows: :func:`next_sequence` is one atomic upsert (``INSERT ... ON CONFLICT DO UPDATE
... RETURNING``), so two replicas issuing for one device at once get two different numbers.
It also never falls below what the device reports it applied (``floor``): a control plane
restored from an old backup, or a fresh database, still issues states the device accepts.

``published_sequence`` records the last state the broker took (PUBACK), so the director
republishes what a broker outage or a crash left unpublished. A broker that lost its retained
messages (restarted without persistence, or replaced) holds none of them any more:
:func:`mark_current_unpublished` says so, device by device, so they are all published again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.schema import desired_states
from edgelm_control.store.sql import insert_for


@dataclass(frozen=True)
class DesiredRecord:
    device_id: str
    sequence: int
    rollout_id: str | None
    model: str | None  # None: a release, no model is desired (or a row from before 0.1)
    target_path: str | None
    target_length: int | None
    target_sha256: str | None
    issued_at_s: int | None
    expires_s: int | None
    document: str | None
    published_sequence: int
    updated_ms: int

    @property
    def published(self) -> bool:
        return self.published_sequence >= self.sequence

    @property
    def target(self) -> tuple[str, int, str] | None:
        if self.target_path is None or self.target_length is None or self.target_sha256 is None:
            return None
        return (self.target_path, self.target_length, self.target_sha256)


def _record(row: object) -> DesiredRecord:
    return DesiredRecord(**{c.name: getattr(row, c.name) for c in desired_states.columns})


async def next_sequence(conn: AsyncConnection, device_id: str, *, floor: int, now_ms: int) -> int:
    """The device's next sequence: above every one issued before, and above ``floor``."""
    table = desired_states
    start = floor + 1
    statement = (
        insert_for(conn, table)
        .values(
            device_id=device_id,
            sequence=start,
            published_sequence=0,
            updated_ms=now_ms,
        )
        .on_conflict_do_update(
            index_elements=[table.c.device_id],
            set_={
                "sequence": case(
                    (table.c.sequence >= floor, table.c.sequence + 1),
                    else_=start,
                ),
                "updated_ms": now_ms,
            },
        )
        .returning(table.c.sequence)
    )
    return int((await conn.execute(statement)).scalar_one())


async def record_desired(
    conn: AsyncConnection,
    device_id: str,
    *,
    sequence: int,
    rollout_id: str | None,
    model: str | None,
    target: tuple[str, int, str] | None,
    issued_at_s: int | None,
    expires_s: int | None,
    document: str | None,
    now_ms: int,
) -> None:
    """Store the desired state issued with ``sequence`` (from :func:`next_sequence`)."""
    path, length, sha256 = target if target is not None else (None, None, None)
    await conn.execute(
        update(desired_states)
        .where(desired_states.c.device_id == device_id)
        .where(desired_states.c.sequence == sequence)
        .values(
            rollout_id=rollout_id,
            model=model,
            target_path=path,
            target_length=length,
            target_sha256=sha256,
            issued_at_s=issued_at_s,
            expires_s=expires_s,
            document=document,
            updated_ms=now_ms,
        )
    )


async def get_desired(conn: AsyncConnection, device_id: str) -> DesiredRecord | None:
    row = (
        await conn.execute(select(desired_states).where(desired_states.c.device_id == device_id))
    ).first()
    return None if row is None else _record(row)


async def unpublished(conn: AsyncConnection, *, limit: int = 1000) -> list[DesiredRecord]:
    """Desired states the broker has not taken yet, oldest first."""
    query = (
        select(desired_states)
        .where(desired_states.c.published_sequence < desired_states.c.sequence)
        .order_by(desired_states.c.updated_ms)
        .limit(limit)
    )
    return [_record(row) for row in await conn.execute(query)]


async def mark_published(conn: AsyncConnection, device_id: str, sequence: int) -> None:
    await conn.execute(
        update(desired_states)
        .where(desired_states.c.device_id == device_id)
        .where(desired_states.c.published_sequence < sequence)
        .values(published_sequence=sequence)
    )


async def expiring(conn: AsyncConnection, *, before_s: int, limit: int) -> list[DesiredRecord]:
    """Current desired states (assignments and releases) that expire before ``before_s``."""
    query = (
        select(desired_states)
        .where(desired_states.c.expires_s.is_not(None))
        .where(desired_states.c.expires_s < before_s)
        .order_by(desired_states.c.expires_s)
        .limit(limit)
    )
    return [_record(row) for row in await conn.execute(query)]


async def mark_current_unpublished(
    conn: AsyncConnection, *, after_device_id: str | None, limit: int
) -> list[str]:
    """Mark the current desired state of up to ``limit`` devices, by device id after
    ``after_device_id``, as not taken by the broker (``published_sequence`` 0), so that
    :func:`unpublished` returns it again; return those device ids, in order (pass the last
    as ``after_device_id`` for the next batch; an empty list: no more).

    Only rows with a document count (signed releases included): a row without one stands
    for an empty retained message (nothing desired, as stored before releases were signed),
    which is what a broker that lost its retained messages holds for that device already.
    """
    table = desired_states
    query = select(table.c.device_id).where(table.c.document.is_not(None))
    if after_device_id is not None:
        query = query.where(table.c.device_id > after_device_id)
    ids = [
        str(i)
        for i in (await conn.execute(query.order_by(table.c.device_id).limit(limit))).scalars()
    ]
    if ids:
        await conn.execute(
            update(table)
            .where(table.c.device_id.in_(ids))
            .where(table.c.document.is_not(None))
            .values(published_sequence=0)
        )
    return ids


async def clear_desired(conn: AsyncConnection, device_id: str, *, now_ms: int) -> bool:
    """Withdraw the device's desired state (a revoked device must not keep one anyone reads).

    The row takes the next sequence with no document, so :func:`unpublished` returns it and
    the director publishes an empty retained message, which deletes the broker's copy. Nothing
    re-signs or republishes it after that: it has no expiry and no document. True if the
    device had a desired state to withdraw."""
    result = await conn.execute(
        update(desired_states)
        .where(desired_states.c.device_id == device_id)
        .where(desired_states.c.document.is_not(None))
        .values(
            sequence=desired_states.c.sequence + 1,
            rollout_id=None,
            model=None,
            target_path=None,
            target_length=None,
            target_sha256=None,
            issued_at_s=None,
            expires_s=None,
            document=None,
            updated_ms=now_ms,
        )
    )
    return bool(result.rowcount == 1)


async def signed_after(
    conn: AsyncConnection, *, after_device_id: str | None, limit: int
) -> list[DesiredRecord]:
    """Up to ``limit`` current desired states with a signed document and an expiry, by device
    id after ``after_device_id`` (pass the last one's id for the next batch): what the
    director re-signs when the fleet's root names a new director key."""
    table = desired_states
    query = select(table).where(table.c.document.is_not(None)).where(table.c.expires_s.is_not(None))
    if after_device_id is not None:
        query = query.where(table.c.device_id > after_device_id)
    rows = await conn.execute(query.order_by(table.c.device_id).limit(limit))
    return [_record(row) for row in rows]
