"""Revoked devices: the control plane's half of ``edgelm provision revoke``.

The CRL makes the broker refuse a revoked device's new connections. It cannot take back what
the broker already queued for the control plane (a persistent session, QoS 1), nor what comes
through a connection the device held before the broker reloaded its CRL. This table is what
lets the control plane refuse those too: a device listed here is out of the fleet for good.

* **Permanent.** A revoked id never comes back: nothing here removes a row. Hardware that
  returns is enrolled under a new id. Revoking again keeps the first time and reason.
* **Ordered against every writer that must not act on a revoked device**: an ingest batch,
  a rollout's selection, a late joiner, a remote job's selection, the director issuing a
  desired state (``Director.issue``), every move of a rollout row (``RolloutActions.move``),
  and the batches that publish desired states and send remote jobs (held until the broker has
  answered). Each reads this table inside its own transaction after :func:`lock_revocations`
  (``writer=False``); a revocation takes the lock as a writer before it inserts. So nothing
  is signed, published or sent for a device once its revocation has committed, and none of
  its rollout rows moves anywhere but ``revoked``. On PostgreSQL this is a transaction-scoped
  advisory lock, shared for readers and exclusive for a revocation: readers run side by side,
  a revocation waits for the transactions in flight (they came first, and what they stored it
  then undoes or ignores), and readers that start later wait for it and see it. Both are taken
  before any row lock, so they cannot deadlock with each other. (An advisory lock rather than
  a table lock: ``SHARE`` mode would also wait for autovacuum on the table.) On SQLite the
  store's single write lane orders the transactions the same way, and the lock is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.schema import device_revocations
from edgelm_control.store.sql import chunks, insert_for

REASON_MAX_CHARS = 500
# An arbitrary constant shared by every replica: "the edgelm revocation lock" (the schema's
# migration lock is another key).
REVOCATION_LOCK_KEY = 0x6564676C6D_72


@dataclass(frozen=True)
class Revocation:
    device_id: str
    revoked_ms: int
    reason: str | None

    @property
    def note(self) -> str:
        """What a rollout row the device leaves says: ``revoked`` or ``revoked: REASON``."""
        return "revoked" if self.reason is None else f"revoked: {self.reason}"


def _record(row: Any) -> Revocation:
    return Revocation(device_id=row.device_id, revoked_ms=row.revoked_ms, reason=row.reason)


async def lock_revocations(conn: AsyncConnection, *, writer: bool) -> None:
    """Order this transaction against revocations (see the module's docstring): call it
    before reading the table, and before the transaction writes any row a revocation writes
    (its rollout rows, desired state, job rows), so the two cannot deadlock. Taking it again
    in the same transaction returns at once."""
    if conn.dialect.name != "postgresql":
        return  # SQLite: the write lane already serialises every write transaction
    function = "pg_advisory_xact_lock" if writer else "pg_advisory_xact_lock_shared"
    await conn.execute(text(f"SELECT {function}(:key)"), {"key": REVOCATION_LOCK_KEY})


async def record_revocation(
    conn: AsyncConnection, device_id: str, *, reason: str | None, now_ms: int
) -> tuple[Revocation, bool]:
    """Record that ``device_id`` is revoked; return the record and whether it is new (a
    device revoked before keeps its first time and reason)."""
    await lock_revocations(conn, writer=True)
    statement = (
        insert_for(conn, device_revocations)
        .values(device_id=device_id, revoked_ms=now_ms, reason=reason)
        .on_conflict_do_nothing(index_elements=[device_revocations.c.device_id])
        .returning(device_revocations.c.device_id)
    )
    created = (await conn.execute(statement)).first() is not None
    found = await get_revocation(conn, device_id)
    assert found is not None  # inserted now, or there before; never deleted
    return found, created


async def get_revocation(
    conn: AsyncConnection, device_id: str, *, lock: bool = False
) -> Revocation | None:
    """The device's revocation, if it is revoked; ``lock``: order against revocations first."""
    if lock:
        await lock_revocations(conn, writer=False)
    query = select(device_revocations).where(device_revocations.c.device_id == device_id)
    row = (await conn.execute(query)).first()
    return None if row is None else _record(row)


async def revocations_of(conn: AsyncConnection, device_ids: Iterable[str]) -> dict[str, Revocation]:
    """The revocations of those of ``device_ids`` that are revoked, by device id."""
    found: dict[str, Revocation] = {}
    for part in chunks(sorted(set(device_ids))):
        query = select(device_revocations).where(device_revocations.c.device_id.in_(part))
        found.update((row.device_id, _record(row)) for row in await conn.execute(query))
    return found


async def revoked_among(
    conn: AsyncConnection, device_ids: Iterable[str], *, lock: bool
) -> frozenset[str]:
    """Which of ``device_ids`` are revoked; ``lock``: order against revocations first (a
    writer that acts on these devices in the same transaction must)."""
    wanted = sorted(set(device_ids))
    if not wanted:
        return frozenset()
    if lock:
        await lock_revocations(conn, writer=False)
    return frozenset((await revocations_of(conn, wanted)).keys())
