"""Telemetry: batched inserts, per-device reads, fleet aggregates, retention.

Telemetry is the bulk of the traffic, so it is stored the cheap way: one ``executemany`` per
ingest batch, no unique index (duplicates are dropped in memory by message id, and a rare
duplicate after a restart costs one extra row in an average), and an autoincrement id that
orders rows for paging.

Aggregates (count, medians of tokens/s and TTFT, errors per model and hardware class) are
computed in Python over the window's rows: a portable median does not exist in SQL (SQLite
has none), and :data:`AGGREGATE_MAX_ROWS` bounds the work, reported as ``truncated``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.schema import devices, telemetry

AGGREGATE_MAX_ROWS = 200_000
GROUP_KEYS = ("model", "hardware_class", "device")


@dataclass(frozen=True)
class TelemetryRecord:
    id: int
    device_id: str
    received_ms: int
    sent_ms: int
    window_s: float
    model: str | None
    requests: int
    errors: int
    tokens_per_s_p50: float | None
    tokens_per_s_p90: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    queue_depth: int
    cpu_percent: float | None
    memory_bytes: int | None
    memory_total_bytes: int | None
    disk_free_bytes: int | None
    temperature_c: float | None


def _record(row: Any) -> TelemetryRecord:
    return TelemetryRecord(**{c.name: getattr(row, c.name) for c in telemetry.columns})


async def insert_telemetry(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(telemetry.insert(), list(rows))


async def query_telemetry(
    conn: AsyncConnection,
    *,
    device_id: str | None,
    since_ms: int | None,
    until_ms: int | None,
    after_id: int | None,
    limit: int,
) -> list[TelemetryRecord]:
    """Rows in id order (the order they were stored), after ``after_id``."""
    query = select(telemetry).order_by(telemetry.c.id).limit(limit)
    if device_id is not None:
        query = query.where(telemetry.c.device_id == device_id)
    if since_ms is not None:
        query = query.where(telemetry.c.received_ms >= since_ms)
    if until_ms is not None:
        query = query.where(telemetry.c.received_ms < until_ms)
    if after_id is not None:
        query = query.where(telemetry.c.id > after_id)
    return [_record(row) for row in await conn.execute(query)]


async def recent_telemetry(
    conn: AsyncConnection, device_id: str, *, limit: int
) -> list[TelemetryRecord]:
    query = (
        select(telemetry)
        .where(telemetry.c.device_id == device_id)
        .order_by(telemetry.c.id.desc())
        .limit(limit)
    )
    return [_record(row) for row in await conn.execute(query)]


@dataclass(frozen=True)
class Aggregate:
    group: dict[str, str | None]
    count: int
    requests: int
    errors: int
    tokens_per_s_p50: float | None  # median over the rows' p50
    ttft_ms_p50: float | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


async def aggregate_telemetry(
    conn: AsyncConnection,
    *,
    group_by: Sequence[str],
    since_ms: int,
    until_ms: int | None,
    device_id: str | None = None,
    max_rows: int = AGGREGATE_MAX_ROWS,
) -> tuple[list[Aggregate], bool]:
    """Aggregates per group over the window (of one device's rows, when ``device_id`` is
    given); True as the second value if rows were cut."""
    query = (
        select(
            telemetry.c.model,
            devices.c.hardware_class,
            telemetry.c.device_id,
            telemetry.c.requests,
            telemetry.c.errors,
            telemetry.c.tokens_per_s_p50,
            telemetry.c.ttft_ms_p50,
        )
        .join(devices, devices.c.id == telemetry.c.device_id, isouter=True)
        .where(telemetry.c.received_ms >= since_ms)
        .order_by(telemetry.c.id.desc())
        .limit(max_rows + 1)
    )
    if until_ms is not None:
        query = query.where(telemetry.c.received_ms < until_ms)
    if device_id is not None:
        query = query.where(telemetry.c.device_id == device_id)
    rows = list(await conn.execute(query))
    truncated = len(rows) > max_rows
    groups: dict[tuple[str | None, ...], list[Any]] = {}
    for row in rows[:max_rows]:
        facts = {"model": row[0], "hardware_class": row[1], "device": row[2]}
        groups.setdefault(tuple(facts[k] for k in group_by), []).append(row)
    aggregates = [
        Aggregate(
            group=dict(zip(group_by, key, strict=True)),
            count=len(members),
            requests=sum(m[3] for m in members),
            errors=sum(m[4] for m in members),
            tokens_per_s_p50=_median([m[5] for m in members if m[5] is not None]),
            ttft_ms_p50=_median([m[6] for m in members if m[6] is not None]),
        )
        for key, members in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]])
    ]
    return aggregates, truncated


async def prune_telemetry(conn: AsyncConnection, *, before_ms: int) -> int:
    result = await conn.execute(delete(telemetry).where(telemetry.c.received_ms < before_ms))
    return int(result.rowcount or 0)
