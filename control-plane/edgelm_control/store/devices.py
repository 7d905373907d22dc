"""Devices: presence, last seen, labels, hardware class, reported state, active model.

A device row appears the first time a device is registered (``POST /api/v1/devices``) or
heard from, whichever comes first. Reports from the device win over registration: the class
and labels a device reports in its ``state`` are the ones rollouts select on.

:func:`merge_report` is pure (a row and what one ingest batch learned, in; the new values
and what changed, out); :func:`apply_reports` runs it for a batch with two statements per
kind, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.revocations import lock_revocations
from edgelm_control.store.schema import device_revocations, devices
from edgelm_control.store.sql import chunks, dumps, insert_for, labels_of, loads_object
from edgelm_protocol import PresenceStatus, ReportedState

ONLINE = "online"
OFFLINE = "offline"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class DeviceRecord:
    """One device as stored. Satisfies the rollouts' ``DeviceFacts`` as it is."""

    device_id: str
    hardware_class: str | None
    labels: Mapping[str, str]
    presence: str
    agent_version: str | None
    first_seen_ms: int
    last_seen_ms: int | None
    online_since_ms: int | None
    presence_changed_ms: int | None
    registered_ms: int | None
    active_model: str | None
    active_sha256: str | None
    previous_model: str | None
    applied_sequence: int
    reported_state: Mapping[str, Any] | None
    state_updated_ms: int | None

    @property
    def online(self) -> bool:
        return self.presence == ONLINE


@dataclass(frozen=True)
class DeviceReport:
    """What one ingest batch learned about one device, in arrival order."""

    device_id: str
    seen_ms: int
    presences: tuple[tuple[PresenceStatus, str], ...] = ()  # (status, agent_version)
    state: ReportedState | None = None  # the last one in the batch


@dataclass(frozen=True)
class DeviceChange:
    """What a report changed, for the engine (late joiners, silence clocks) and the SSE hub."""

    device_id: str
    created: bool = False
    came_online: bool = False
    went_offline: bool = False
    facts_changed: bool = False  # hardware class or labels: selectors may match it now
    state_changed: bool = False

    @property
    def any(self) -> bool:
        return (
            self.created
            or self.came_online
            or self.went_offline
            or self.facts_changed
            or self.state_changed
        )


@dataclass(frozen=True)
class DeviceFilter:
    labels: Mapping[str, str] = field(default_factory=dict)
    hardware_class: str | None = None
    presence: str | None = None


def _record(row: Any) -> DeviceRecord:
    state = loads_object(row.reported_state) if row.reported_state is not None else None
    return DeviceRecord(
        device_id=row.id,
        hardware_class=row.hardware_class,
        labels=labels_of(row.labels),
        presence=row.presence,
        agent_version=row.agent_version,
        first_seen_ms=row.first_seen_ms,
        last_seen_ms=row.last_seen_ms,
        online_since_ms=row.online_since_ms,
        presence_changed_ms=row.presence_changed_ms,
        registered_ms=row.registered_ms,
        active_model=row.active_model,
        active_sha256=row.active_sha256,
        previous_model=row.previous_model,
        applied_sequence=row.applied_sequence,
        reported_state=state,
        state_updated_ms=row.state_updated_ms,
    )


def _values(record: DeviceRecord) -> dict[str, Any]:
    return {
        "id": record.device_id,
        "hardware_class": record.hardware_class,
        "labels": dumps(dict(record.labels)),
        "presence": record.presence,
        "agent_version": record.agent_version,
        "first_seen_ms": record.first_seen_ms,
        "last_seen_ms": record.last_seen_ms,
        "online_since_ms": record.online_since_ms,
        "presence_changed_ms": record.presence_changed_ms,
        "registered_ms": record.registered_ms,
        "active_model": record.active_model,
        "active_sha256": record.active_sha256,
        "previous_model": record.previous_model,
        "applied_sequence": record.applied_sequence,
        "reported_state": None
        if record.reported_state is None
        else dumps(dict(record.reported_state)),
        "state_updated_ms": record.state_updated_ms,
    }


def new_record(device_id: str, now_ms: int) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        hardware_class=None,
        labels={},
        presence=UNKNOWN,
        agent_version=None,
        first_seen_ms=now_ms,
        last_seen_ms=None,
        online_since_ms=None,
        presence_changed_ms=None,
        registered_ms=None,
        active_model=None,
        active_sha256=None,
        previous_model=None,
        applied_sequence=0,
        reported_state=None,
        state_updated_ms=None,
    )


def merge_report(
    existing: DeviceRecord | None, report: DeviceReport, now_ms: int
) -> tuple[DeviceRecord, DeviceChange]:
    """The row after ``report``, and what changed. Pure."""
    created = existing is None
    record = existing or new_record(report.device_id, now_ms)
    values: dict[str, Any] = {"last_seen_ms": max(record.last_seen_ms or 0, report.seen_ms)}
    presence = record.presence
    came_online = went_offline = False
    for status, agent_version in report.presences:
        values["agent_version"] = agent_version
        if status is PresenceStatus.ONLINE:
            # Every "online" restarts the silence clock: the device may have reconnected
            # (and resent its outbox) even if no "offline" came in between.
            came_online = True
            went_offline = False
            values["online_since_ms"] = now_ms
            if presence != ONLINE:
                values["presence_changed_ms"] = now_ms
            presence = ONLINE
        else:
            if presence != OFFLINE:
                values["presence_changed_ms"] = now_ms
                went_offline = presence == ONLINE
            came_online = False
            presence = OFFLINE
    values["presence"] = presence
    facts_changed = state_changed = False
    state = report.state
    if state is not None:
        labels = dict(state.labels)
        facts_changed = state.hardware_class != record.hardware_class or labels != dict(
            record.labels
        )
        values |= {
            "hardware_class": state.hardware_class,
            "labels": labels,
            "active_model": None if state.active is None else state.active.key,
            "active_sha256": None if state.active is None else state.active.sha256,
            "previous_model": None if state.previous is None else state.previous.key,
            "applied_sequence": state.desired_sequence,
            "reported_state": state.to_json(),
            "state_updated_ms": now_ms,
        }
        state_changed = True
    merged = replace(record, **values)
    change = DeviceChange(
        device_id=report.device_id,
        created=created,
        came_online=came_online,
        went_offline=went_offline,
        facts_changed=facts_changed or created,
        state_changed=state_changed,
    )
    return merged, change


async def apply_reports(
    conn: AsyncConnection, reports: Sequence[DeviceReport], now_ms: int
) -> list[DeviceChange]:
    """Store what a batch learned about its devices; return what changed, per device."""
    if not reports:
        return []
    existing = await get_devices(conn, [r.device_id for r in reports])
    merged: list[DeviceRecord] = []
    changes: list[DeviceChange] = []
    for report in reports:
        record, change = merge_report(existing.get(report.device_id), report, now_ms)
        merged.append(record)
        changes.append(change)
        existing[report.device_id] = record
    fresh = [_values(r) for r, c in zip(merged, changes, strict=True) if c.created]
    if fresh:
        # Another replica may have created the row since we looked: then ours is an update.
        await conn.execute(insert_for(conn, devices).on_conflict_do_nothing(), fresh)
    await _update_all(conn, [_values(r) for r in merged])
    return changes


async def _update_all(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    columns = [c.name for c in devices.columns if c.name != "id"]
    statement = (
        update(devices)
        .where(devices.c.id == bindparam("b_id"))
        .values({name: bindparam(f"b_{name}") for name in columns})
    )
    params = [{f"b_{k}": v for k, v in row.items()} for row in rows]
    await conn.execute(statement, params)


async def register_device(
    conn: AsyncConnection,
    device_id: str,
    *,
    hardware_class: str | None,
    labels: Mapping[str, str],
    now_ms: int,
) -> tuple[DeviceRecord, DeviceChange]:
    """Create or update a device from provisioning. A device that has reported its state
    keeps what it reported: the device knows its own class and labels best."""
    existing = await get_device(conn, device_id)
    if existing is None:
        record = new_record(device_id, now_ms)
        record = _with(record, hardware_class=hardware_class, labels=dict(labels))
        record = _with(record, registered_ms=now_ms)
        await conn.execute(insert_for(conn, devices).on_conflict_do_nothing(), _values(record))
        return record, DeviceChange(device_id, created=True, facts_changed=True)
    if existing.state_updated_ms is not None:
        return existing, DeviceChange(device_id)
    record = _with(existing, hardware_class=hardware_class, labels=dict(labels))
    changed = record.hardware_class != existing.hardware_class or dict(record.labels) != dict(
        existing.labels
    )
    await _update_all(conn, [_values(record)])
    return record, DeviceChange(device_id, facts_changed=changed)


def _with(record: DeviceRecord, **values: Any) -> DeviceRecord:
    return replace(record, **values)


async def get_device(conn: AsyncConnection, device_id: str) -> DeviceRecord | None:
    row = (await conn.execute(select(devices).where(devices.c.id == device_id))).first()
    return None if row is None else _record(row)


async def get_devices(conn: AsyncConnection, device_ids: Iterable[str]) -> dict[str, DeviceRecord]:
    found: dict[str, DeviceRecord] = {}
    for part in chunks(sorted(set(device_ids))):
        result = await conn.execute(select(devices).where(devices.c.id.in_(part)))
        found.update((row.id, _record(row)) for row in result)
    return found


async def all_devices(conn: AsyncConnection) -> list[DeviceRecord]:
    result = await conn.execute(select(devices).order_by(devices.c.id))
    return [_record(row) for row in result]


async def targetable_devices(conn: AsyncConnection) -> list[DeviceRecord]:
    """Every device a new rollout or remote job may select: all but the revoked ones.

    It first orders the caller's transaction against revocations
    (:func:`~edgelm_control.store.revocations.lock_revocations`), so a device revoked while
    the caller selects is either left out here or, once the caller commits, taken out of what
    it was given by the revocation."""
    await lock_revocations(conn, writer=False)
    revoked = select(device_revocations.c.device_id)
    query = select(devices).where(devices.c.id.not_in(revoked)).order_by(devices.c.id)
    return [_record(row) for row in await conn.execute(query)]


async def list_devices(
    conn: AsyncConnection, where: DeviceFilter, *, after_id: str | None, limit: int
) -> list[DeviceRecord]:
    """Up to ``limit`` devices matching ``where``, by id, after ``after_id``.

    Labels live in JSON text (portable, not queryable), so they are matched here, reading
    the candidates in pages until ``limit`` matches are found.
    """
    found: list[DeviceRecord] = []
    cursor = after_id
    page = max(limit, 200)
    while len(found) < limit:
        query = select(devices).order_by(devices.c.id).limit(page)
        if cursor is not None:
            query = query.where(devices.c.id > cursor)
        if where.hardware_class is not None:
            query = query.where(devices.c.hardware_class == where.hardware_class)
        if where.presence is not None:
            query = query.where(devices.c.presence == where.presence)
        rows = [_record(row) for row in await conn.execute(query)]
        for record in rows:
            if all(record.labels.get(k) == v for k, v in where.labels.items()):
                found.append(record)
                if len(found) == limit:
                    break
        if len(rows) < page:
            break
        cursor = rows[-1].device_id
    return found


async def count_devices(conn: AsyncConnection) -> dict[str, int]:
    """Devices per presence."""
    result = await conn.execute(
        select(devices.c.presence, func.count()).group_by(devices.c.presence)
    )
    return {row[0]: row[1] for row in result}
