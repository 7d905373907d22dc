"""The model index: the targets of the fleet's TUF repository, as rows to list and look up.

The repository's signed targets metadata is the source of truth; this table is rebuilt from
it whenever it changes (a push, or a start after the folder changed), so a rollout resolves
``name@version`` to a path, length and sha256 with one query. ``repository_state`` holds the
targets version the index was built from: a push compares-and-sets it, so two replicas
cannot both accept a version N + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.schema import model_targets, repository_state
from edgelm_control.store.sql import dumps, insert_for, loads_object
from edgelm_protocol.targets import ModelTarget


@dataclass(frozen=True)
class ModelRecord:
    path: str
    model: str  # name@version
    name: str
    version: str
    length: int
    sha256: str
    format: str
    backend: str
    quantization: str
    context_length: int
    min_ram_bytes: int
    custom: dict[str, Any]
    targets_version: int
    added_ms: int


def _record(row: Any) -> ModelRecord:
    values = {c.name: getattr(row, c.name) for c in model_targets.columns}
    values["custom"] = loads_object(values["custom"])
    return ModelRecord(**values)


async def replace_targets(
    conn: AsyncConnection, targets: Sequence[ModelTarget], *, targets_version: int, now_ms: int
) -> None:
    """Make the index list exactly ``targets``; rows of targets kept keep their ``added_ms``."""
    paths = {t.path for t in targets}
    existing = {r.path for r in await list_models(conn)}
    gone = existing - paths
    if gone:
        await conn.execute(delete(model_targets).where(model_targets.c.path.in_(sorted(gone))))
    fresh = [
        {
            "path": t.path,
            "model": t.ref,
            "name": t.name,
            "version": t.version,
            "length": t.length,
            "sha256": t.sha256,
            "format": t.format,
            "backend": t.backend,
            "quantization": t.quantization,
            "context_length": t.context_length,
            "min_ram_bytes": t.min_ram_bytes,
            "custom": dumps(t.custom()),
            "targets_version": targets_version,
            "added_ms": now_ms,
        }
        for t in targets
        if t.path not in existing
    ]
    if fresh:
        await conn.execute(insert_for(conn, model_targets).on_conflict_do_nothing(), fresh)


async def list_models(conn: AsyncConnection) -> list[ModelRecord]:
    query = select(model_targets).order_by(model_targets.c.name, model_targets.c.added_ms)
    return [_record(row) for row in await conn.execute(query)]


async def get_model(conn: AsyncConnection, model: str) -> ModelRecord | None:
    row = (await conn.execute(select(model_targets).where(model_targets.c.model == model))).first()
    return None if row is None else _record(row)


async def get_models(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, ModelRecord]:
    if not keys:
        return {}
    query = select(model_targets).where(model_targets.c.model.in_(sorted(set(keys))))
    return {row.model: _record(row) for row in await conn.execute(query)}


@dataclass(frozen=True)
class RepositoryVersions:
    targets_version: int
    timestamp_version: int


async def repository_versions(conn: AsyncConnection) -> RepositoryVersions | None:
    row = (await conn.execute(select(repository_state).where(repository_state.c.id == 1))).first()
    return None if row is None else RepositoryVersions(row.targets_version, row.timestamp_version)


async def claim_targets_version(
    conn: AsyncConnection,
    *,
    expected: int | None,
    targets_version: int,
    timestamp_version: int,
    now_ms: int,
) -> bool:
    """Move the recorded targets version from ``expected`` to ``targets_version``; False if
    another writer moved it first (``expected`` None: no version was recorded yet)."""
    if expected is None:
        result = await conn.execute(
            insert_for(conn, repository_state)
            .values(
                id=1,
                targets_version=targets_version,
                timestamp_version=timestamp_version,
                updated_ms=now_ms,
            )
            .on_conflict_do_nothing()
        )
        return bool(result.rowcount == 1)
    result = await conn.execute(
        update(repository_state)
        .where(repository_state.c.id == 1)
        .where(repository_state.c.targets_version == expected)
        .values(
            targets_version=targets_version,
            timestamp_version=timestamp_version,
            updated_ms=now_ms,
        )
    )
    return bool(result.rowcount == 1)


async def record_timestamp_version(conn: AsyncConnection, version: int, now_ms: int) -> None:
    await conn.execute(
        update(repository_state)
        .where(repository_state.c.id == 1)
        .where(repository_state.c.timestamp_version < version)
        .values(timestamp_version=version, updated_ms=now_ms)
    )
