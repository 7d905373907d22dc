"""Rollouts, their waves and their rollout x device rows.

Every change of state is a compare-and-set: ``UPDATE ... WHERE state = :expected`` (and, for
a rollout, ``current_wave = :expected``), returning whether this writer won. Replicas sharing
one PostgreSQL can then run the same engine step at the same time: one wins, the others see
``False`` and move on, and no transition happens twice.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.rollouts.device_states import DeviceState
from edgelm_control.rollouts.gates import HealthFigures
from edgelm_control.rollouts.rollout_states import RolloutState
from edgelm_control.rollouts.settings import RolloutSettings
from edgelm_control.store.schema import rollout_devices, rollout_waves, rollouts
from edgelm_control.store.sql import chunks, dumps, loads, loads_object


@dataclass(frozen=True)
class RolloutRecord:
    rollout_id: str
    model: str
    target_path: str
    target_length: int
    target_sha256: str
    selector: dict[str, Any]
    settings: RolloutSettings
    baselines: dict[str, HealthFigures]
    state: RolloutState
    current_wave: int
    wave_count: int
    created_ms: int
    updated_ms: int
    ended_ms: int | None

    @property
    def order_key(self) -> tuple[int, str]:
        """Newer rollouts sort after older ones; ties broken by id, the same on every replica."""
        return (self.created_ms, self.rollout_id)


@dataclass(frozen=True)
class WaveRecord:
    rollout_id: str
    wave: int
    started_ms: int | None
    decided_ms: int | None
    verdict: str | None  # None | passed | failed | accepted
    code: str | None
    reason: str | None
    tally: dict[str, Any] | None


@dataclass(frozen=True)
class RowRecord:
    rollout_id: str
    device_id: str
    wave: int
    state: DeviceState
    reason: str | None
    previous_model: str | None
    previous_path: str | None
    previous_length: int | None
    previous_sha256: str | None
    desired_sequence: int | None
    abort_sequence: int | None
    pending_since_ms: int | None
    last_report_ms: int | None
    health_tokens_per_s: float | None
    health_ttft_ms: float | None
    created_ms: int
    updated_ms: int

    @property
    def previous_target(self) -> tuple[str, int, str] | None:
        if self.previous_path is None or self.previous_length is None:
            return None
        assert self.previous_sha256 is not None
        return (self.previous_path, self.previous_length, self.previous_sha256)


def baselines_to_json(baselines: Mapping[str, HealthFigures]) -> dict[str, Any]:
    return {
        cls: {"tokens_per_s": f.tokens_per_s, "ttft_ms": f.ttft_ms}
        for cls, f in sorted(baselines.items())
    }


def _baselines(text: str) -> dict[str, HealthFigures]:
    return {
        cls: HealthFigures(v.get("tokens_per_s"), v.get("ttft_ms"))
        for cls, v in loads_object(text).items()
    }


def _rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=row.id,
        model=row.model,
        target_path=row.target_path,
        target_length=row.target_length,
        target_sha256=row.target_sha256,
        selector=loads_object(row.selector),
        settings=RolloutSettings.from_mapping(loads_object(row.settings)),
        baselines=_baselines(row.baselines),
        state=RolloutState(row.state),
        current_wave=row.current_wave,
        wave_count=row.wave_count,
        created_ms=row.created_ms,
        updated_ms=row.updated_ms,
        ended_ms=row.ended_ms,
    )


def _wave(row: Any) -> WaveRecord:
    return WaveRecord(
        rollout_id=row.rollout_id,
        wave=row.wave,
        started_ms=row.started_ms,
        decided_ms=row.decided_ms,
        verdict=row.verdict,
        code=row.code,
        reason=row.reason,
        tally=loads(row.tally),
    )


def _row(row: Any) -> RowRecord:
    values = {c.name: getattr(row, c.name) for c in rollout_devices.columns}
    values["state"] = DeviceState(values["state"])
    return RowRecord(**values)


# --- rollouts ----------------------------------------------------------------------------------


async def insert_rollout(conn: AsyncConnection, record: RolloutRecord) -> None:
    await conn.execute(
        rollouts.insert().values(
            id=record.rollout_id,
            model=record.model,
            target_path=record.target_path,
            target_length=record.target_length,
            target_sha256=record.target_sha256,
            selector=dumps(record.selector),
            settings=dumps(record.settings.to_json()),
            baselines=dumps(baselines_to_json(record.baselines)),
            state=str(record.state),
            current_wave=record.current_wave,
            wave_count=record.wave_count,
            created_ms=record.created_ms,
            updated_ms=record.updated_ms,
            ended_ms=record.ended_ms,
        )
    )


async def get_rollout(conn: AsyncConnection, rollout_id: str) -> RolloutRecord | None:
    row = (await conn.execute(select(rollouts).where(rollouts.c.id == rollout_id))).first()
    return None if row is None else _rollout(row)


async def rollouts_in(
    conn: AsyncConnection, states: Collection[RolloutState]
) -> list[RolloutRecord]:
    """Rollouts in any of ``states``, oldest first."""
    query = (
        select(rollouts)
        .where(rollouts.c.state.in_(sorted(str(s) for s in states)))
        .order_by(rollouts.c.created_ms, rollouts.c.id)
    )
    return [_rollout(row) for row in await conn.execute(query)]


async def list_rollouts(
    conn: AsyncConnection,
    *,
    state: RolloutState | None,
    after: tuple[int, str] | None,
    limit: int,
) -> list[RolloutRecord]:
    """Newest first; ``after`` is the ``order_key`` of the last one of the previous page."""
    query = select(rollouts).order_by(rollouts.c.created_ms.desc(), rollouts.c.id.desc())
    if state is not None:
        query = query.where(rollouts.c.state == str(state))
    if after is not None:
        created, rollout_id = after
        query = query.where(
            (rollouts.c.created_ms < created)
            | (and_(rollouts.c.created_ms == created, rollouts.c.id < rollout_id))
        )
    return [_rollout(row) for row in await conn.execute(query.limit(limit))]


async def cas_rollout(
    conn: AsyncConnection,
    rollout_id: str,
    *,
    expected_state: RolloutState,
    expected_wave: int,
    **values: Any,
) -> bool:
    """Update the rollout if it is still in ``expected_state`` at ``expected_wave``."""
    if "state" in values:
        values["state"] = str(values["state"])
    result = await conn.execute(
        update(rollouts)
        .where(rollouts.c.id == rollout_id)
        .where(rollouts.c.state == str(expected_state))
        .where(rollouts.c.current_wave == expected_wave)
        .values(**values)
    )
    return bool(result.rowcount == 1)


# --- waves -------------------------------------------------------------------------------------


async def insert_waves(conn: AsyncConnection, rollout_id: str, count: int) -> None:
    await conn.execute(
        rollout_waves.insert(), [{"rollout_id": rollout_id, "wave": i} for i in range(count)]
    )


async def get_waves(conn: AsyncConnection, rollout_id: str) -> list[WaveRecord]:
    query = (
        select(rollout_waves)
        .where(rollout_waves.c.rollout_id == rollout_id)
        .order_by(rollout_waves.c.wave)
    )
    return [_wave(row) for row in await conn.execute(query)]


async def start_wave(conn: AsyncConnection, rollout_id: str, wave: int, now_ms: int) -> None:
    await conn.execute(
        update(rollout_waves)
        .where(rollout_waves.c.rollout_id == rollout_id)
        .where(rollout_waves.c.wave == wave)
        .where(rollout_waves.c.started_ms.is_(None))
        .values(started_ms=now_ms)
    )


async def record_verdict(
    conn: AsyncConnection,
    rollout_id: str,
    wave: int,
    *,
    verdict: str,
    code: str,
    reason: str,
    tally: Mapping[str, Any],
    now_ms: int,
    expected: str | None = None,
) -> bool:
    """Record a wave's verdict once: only over ``expected`` (None: not decided yet)."""
    column = rollout_waves.c.verdict
    result = await conn.execute(
        update(rollout_waves)
        .where(rollout_waves.c.rollout_id == rollout_id)
        .where(rollout_waves.c.wave == wave)
        .where(column.is_(None) if expected is None else column == expected)
        .values(
            verdict=verdict, code=code, reason=reason, tally=dumps(dict(tally)), decided_ms=now_ms
        )
    )
    return bool(result.rowcount == 1)


# --- rollout x device rows ---------------------------------------------------------------------


async def insert_rows(conn: AsyncConnection, rows: Sequence[RowRecord]) -> None:
    if not rows:
        return
    values = []
    for row in rows:
        item = {c.name: getattr(row, c.name) for c in rollout_devices.columns}
        item["state"] = str(row.state)
        values.append(item)
    await conn.execute(rollout_devices.insert(), values)


async def rows_of(
    conn: AsyncConnection, rollout_id: str, *, wave: int | None = None
) -> list[RowRecord]:
    query = (
        select(rollout_devices)
        .where(rollout_devices.c.rollout_id == rollout_id)
        .order_by(rollout_devices.c.wave, rollout_devices.c.device_id)
    )
    if wave is not None:
        query = query.where(rollout_devices.c.wave == wave)
    return [_row(row) for row in await conn.execute(query)]


async def get_row(conn: AsyncConnection, rollout_id: str, device_id: str) -> RowRecord | None:
    query = select(rollout_devices).where(
        rollout_devices.c.rollout_id == rollout_id, rollout_devices.c.device_id == device_id
    )
    row = (await conn.execute(query)).first()
    return None if row is None else _row(row)


async def rows_of_devices(
    conn: AsyncConnection, device_ids: Iterable[str], *, states: Collection[DeviceState] = ()
) -> list[RowRecord]:
    """Every row of these devices (in ``states``, if given), in every rollout."""
    found: list[RowRecord] = []
    for part in chunks(sorted(set(device_ids))):
        query = select(rollout_devices).where(rollout_devices.c.device_id.in_(part))
        if states:
            query = query.where(rollout_devices.c.state.in_(sorted(str(s) for s in states)))
        found.extend(_row(row) for row in await conn.execute(query))
    return found


async def rows_in_states(
    conn: AsyncConnection,
    states: Collection[DeviceState],
    *,
    rollout_states: Collection[RolloutState],
) -> list[RowRecord]:
    """Rows in ``states`` of rollouts in ``rollout_states`` (the clock's candidates)."""
    query = (
        select(rollout_devices)
        .join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id)
        .where(rollout_devices.c.state.in_(sorted(str(s) for s in states)))
        .where(rollouts.c.state.in_(sorted(str(s) for s in rollout_states)))
    )
    return [_row(row) for row in await conn.execute(query)]


async def cas_row(
    conn: AsyncConnection,
    rollout_id: str,
    device_id: str,
    *,
    expected: DeviceState,
    **values: Any,
) -> bool:
    """Update the row if it is still in ``expected``; True if this writer moved it."""
    if "state" in values:
        values["state"] = str(values["state"])
    result = await conn.execute(
        update(rollout_devices)
        .where(rollout_devices.c.rollout_id == rollout_id)
        .where(rollout_devices.c.device_id == device_id)
        .where(rollout_devices.c.state == str(expected))
        .values(**values)
    )
    return bool(result.rowcount == 1)


async def state_counts(
    conn: AsyncConnection, rollout_ids: Collection[str]
) -> dict[str, dict[str, int]]:
    """Per rollout, how many rows are in each state."""
    counts: dict[str, dict[str, int]] = {r: {} for r in rollout_ids}
    for part in chunks(sorted(rollout_ids)):
        query = (
            select(rollout_devices.c.rollout_id, rollout_devices.c.state, func.count())
            .where(rollout_devices.c.rollout_id.in_(part))
            .group_by(rollout_devices.c.rollout_id, rollout_devices.c.state)
        )
        for rollout_id, state, count in await conn.execute(query):
            counts[rollout_id][state] = count
    return counts
