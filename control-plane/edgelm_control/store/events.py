"""Device events: stored once by message id, then applied to rollouts by the engine.

An event is stored (and acknowledged to the device) by the ingest path, and applied to its
rollout row later by the engine, which marks it ``processed``. Splitting the two keeps the
device's acknowledgement independent of the engine, and makes a crash between the two
harmless: the engine finds the unprocessed events when it starts again. Marking is a
compare-and-set (``WHERE processed_ms IS NULL``), so replicas never apply one event twice.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.rollouts.baselines import HealthSample
from edgelm_control.store.schema import device_events, devices
from edgelm_control.store.sql import chunks, insert_for


@dataclass(frozen=True)
class EventRecord:
    message_id: str
    device_id: str
    seq: int
    kind: str
    model: str | None
    desired_sequence: int | None
    rollout_id: str | None
    reason: str | None
    health_tokens_per_s: float | None
    health_ttft_ms: float | None
    progress_done_bytes: int | None
    progress_total_bytes: int | None
    sent_ms: int
    received_ms: int
    processed_ms: int | None


def _record(row: Any) -> EventRecord:
    return EventRecord(**{c.name: getattr(row, c.name) for c in device_events.columns})


async def insert_events(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Store events not stored before; return the message ids that are new."""
    if not rows:
        return set()
    statement = (
        insert_for(conn, device_events)
        .on_conflict_do_nothing(index_elements=[device_events.c.message_id])
        .returning(device_events.c.message_id)
    )
    result = await conn.execute(statement, list(rows))
    return {row[0] for row in result}


async def unprocessed(conn: AsyncConnection, *, limit: int) -> list[EventRecord]:
    """Events not applied yet, in the order each device sent them."""
    query = (
        select(device_events)
        .where(device_events.c.processed_ms.is_(None))
        .order_by(device_events.c.received_ms, device_events.c.device_id, device_events.c.seq)
        .limit(limit)
    )
    return [_record(row) for row in await conn.execute(query)]


async def mark_processed(conn: AsyncConnection, message_id: str, now_ms: int) -> bool:
    result = await conn.execute(
        update(device_events)
        .where(device_events.c.message_id == message_id)
        .where(device_events.c.processed_ms.is_(None))
        .values(processed_ms=now_ms)
    )
    return bool(result.rowcount == 1)


async def recent_events(conn: AsyncConnection, device_id: str, *, limit: int) -> list[EventRecord]:
    query = (
        select(device_events)
        .where(device_events.c.device_id == device_id)
        .order_by(device_events.c.received_ms.desc(), device_events.c.seq.desc())
        .limit(limit)
    )
    return [_record(row) for row in await conn.execute(query)]


async def health_samples(
    conn: AsyncConnection, models: Collection[str], *, limit_per_model: int = 2000
) -> list[HealthSample]:
    """Health-check figures of ``activated`` events of ``models``, with each device's class
    (the newest first, at most ``limit_per_model`` per model)."""
    samples: list[HealthSample] = []
    for model in sorted(models):
        query = (
            select(
                devices.c.hardware_class,
                device_events.c.model,
                device_events.c.health_tokens_per_s,
                device_events.c.health_ttft_ms,
            )
            .join(devices, devices.c.id == device_events.c.device_id)
            .where(device_events.c.kind == "activated")
            .where(device_events.c.model == model)
            .where(devices.c.hardware_class.is_not(None))
            .order_by(device_events.c.received_ms.desc())
            .limit(limit_per_model)
        )
        samples.extend(HealthSample(*row) for row in await conn.execute(query))
    return samples


async def prune_events(conn: AsyncConnection, *, before_ms: int) -> int:
    """Delete processed events received before ``before_ms``; return how many."""
    result = await conn.execute(
        delete(device_events)
        .where(device_events.c.received_ms < before_ms)
        .where(device_events.c.processed_ms.is_not(None))
    )
    return int(result.rowcount or 0)


async def events_of(conn: AsyncConnection, message_ids: Collection[str]) -> list[EventRecord]:
    found: list[EventRecord] = []
    for part in chunks(sorted(message_ids)):
        query = select(device_events).where(device_events.c.message_id.in_(part))
        found.extend(_record(row) for row in await conn.execute(query))
    return found
