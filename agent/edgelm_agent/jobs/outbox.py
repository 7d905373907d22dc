"""The outbox: messages for the control plane, kept on disk until they are acknowledged.

Every message has a unique id (what the control plane acknowledges, and what it deduplicates
on), a schema version, and a kind; sync turns the kind into a topic and an envelope when it
sends, so nothing in the queue knows about MQTT. Three kinds, each with its own priority and
bound:

* ``result`` (how an upstream or fleet job ended) and ``event`` (installs, activations,
  rollbacks) are kept up to a shared disk cap. Past it, new upstream work is refused with a
  clear error and new events are refused, because silently dropping either is never
  acceptable. They leave only when the control plane has stored them and said so (an ``ack``
  naming their id), never on a broker's PUBACK alone.
* ``telemetry`` is useful only in aggregate: past its cap the oldest entries are dropped, and
  a PUBACK is enough to delete one.

Order is kept within a kind (by sequence number). Draining takes results first, then events,
then telemetry.

Two layers: functions that run inside a caller's transaction on the writer thread (a job's
final state and its result message commit together), and :class:`Outbox`, the typed face that
sync and the API use from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from edgelm_agent.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm_agent.jobs.database import Database

#: The version of the bodies this agent writes; sync sends it in each envelope.
SCHEMA_VERSION = 1


class MessageKind(StrEnum):
    RESULT = "result"
    EVENT = "event"
    TELEMETRY = "telemetry"


PRIORITY = {MessageKind.RESULT: 0, MessageKind.EVENT: 1, MessageKind.TELEMETRY: 2}
DURABLE = frozenset({MessageKind.RESULT, MessageKind.EVENT})


@dataclass(frozen=True)
class OutboxLimits:
    #: Telemetry messages kept; older ones are dropped.
    telemetry_max_messages: int = 10_000
    #: Bytes of results and events kept; past it, upstream work and new events are refused.
    durable_max_bytes: int = 64 << 20


class OutboxFull(EdgelmError):
    """Results and events fill their cap: nothing more is accepted until the link drains it."""

    code = "outbox_full"

    def __init__(self, used_bytes: int, cap_bytes: int) -> None:
        super().__init__(
            f"outbox holds {used_bytes} bytes of results and events, cap is {cap_bytes}"
        )
        self.used_bytes = used_bytes
        self.cap_bytes = cap_bytes


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    id: str  # 32 hex digits: the envelope id the control plane acknowledges
    kind: MessageKind
    body: dict[str, Any]
    created_at: float
    schema_version: int = SCHEMA_VERSION


def _message(row: sqlite3.Row) -> OutboxMessage:
    return OutboxMessage(
        seq=row["seq"],
        id=row["message_id"],
        kind=MessageKind(row["kind"]),
        body=json.loads(row["body"]),
        created_at=row["created_at"],
        schema_version=row["schema_version"],
    )


# --- inside a transaction ---------------------------------------------------------------------


def durable_bytes(conn: sqlite3.Connection) -> int:
    (used,) = conn.execute(
        "SELECT coalesce(sum(bytes), 0) FROM outbox WHERE kind != 'telemetry'"
    ).fetchone()
    return int(used)


def has_room(conn: sqlite3.Connection, limits: OutboxLimits) -> bool:
    return durable_bytes(conn) < limits.durable_max_bytes


def append(
    conn: sqlite3.Connection,
    kind: MessageKind,
    body: dict[str, Any],
    limits: OutboxLimits | None = None,
) -> OutboxMessage:
    """Add a message in the caller's transaction. Telemetry trims its oldest.

    A result belongs to a job already accepted, so it is always kept: the cap is enforced
    when upstream jobs are submitted (see jobs.store.submit). An event over the cap raises
    :class:`OutboxFull`.
    """
    limits = limits or OutboxLimits()
    data = json.dumps(body, separators=(",", ":"))
    if kind == MessageKind.EVENT:
        used = durable_bytes(conn)
        if used + len(data) > limits.durable_max_bytes:
            raise OutboxFull(used, limits.durable_max_bytes)
    message_id = uuid.uuid4().hex
    now = time.time()
    seq = conn.execute(
        "INSERT INTO outbox (message_id, kind, schema_version, body, bytes, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, str(kind), SCHEMA_VERSION, data, len(data), now),
    ).lastrowid
    if kind == MessageKind.TELEMETRY:
        conn.execute(
            "DELETE FROM outbox WHERE kind = 'telemetry' AND seq NOT IN (SELECT seq FROM outbox "
            "WHERE kind = 'telemetry' ORDER BY seq DESC LIMIT ?)",
            (limits.telemetry_max_messages,),
        )
    return OutboxMessage(int(seq or 0), message_id, kind, body, now)


def peek_rows(
    conn: sqlite3.Connection, limit: int, kinds: Sequence[MessageKind] | None = None
) -> list[OutboxMessage]:
    """The next messages to send: by kind priority, then in order within the kind."""
    wanted = [str(k) for k in (kinds or list(MessageKind))]
    marks = ", ".join("?" for _ in wanted)
    rows = conn.execute(
        f"SELECT * FROM outbox WHERE kind IN ({marks}) ORDER BY "  # noqa: S608  # marks only
        "CASE kind WHEN 'result' THEN 0 WHEN 'event' THEN 1 ELSE 2 END, seq LIMIT ?",
        (*wanted, limit),
    ).fetchall()
    return [_message(r) for r in rows]


def delete_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> int:
    """Delete acknowledged messages; unknown ids are ignored (acknowledgements may repeat)."""
    return sum(conn.execute("DELETE FROM outbox WHERE message_id = ?", (i,)).rowcount for i in ids)


def count_rows(conn: sqlite3.Connection) -> dict[MessageKind, int]:
    rows = conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind").fetchall()
    return dict.fromkeys(MessageKind, 0) | {MessageKind(r[0]): int(r[1]) for r in rows}


# --- the typed face -----------------------------------------------------------------------------


class Outbox:
    """put, peek and ack from the event loop, and a wake-up for whoever drains it."""

    def __init__(self, db: Database, limits: OutboxLimits | None = None) -> None:
        self.db = db
        self.limits = limits or OutboxLimits()
        self._changed = asyncio.Event()

    async def put(self, kind: MessageKind, body: dict[str, Any]) -> OutboxMessage:
        message = await self.db.run(lambda conn: append(conn, kind, body, self.limits))
        self.wake()
        return message

    async def peek(
        self, limit: int, kinds: Sequence[MessageKind] | None = None
    ) -> list[OutboxMessage]:
        return await self.db.read(lambda conn: peek_rows(conn, limit, kinds))

    async def ack(self, ids: Sequence[str]) -> int:
        """Delete the messages these ids name; returns how many there were."""
        if not ids:
            return 0
        return await self.db.run(lambda conn: delete_ids(conn, list(ids)))

    async def counts(self) -> dict[MessageKind, int]:
        return await self.db.read(count_rows)

    async def has_room(self) -> bool:
        return await self.db.read(lambda conn: has_room(conn, self.limits))

    def wake(self) -> None:
        """Something was added (by this process): the drainer should look now."""
        self._changed.set()

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until :meth:`wake` or ``timeout_s`` passes; messages added inside other
        transactions (a job's result) are found by the next look either way."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancel
                await self._changed.wait()
        self._changed.clear()
