"""The outbox: messages for the control plane, kept on disk until they are acknowledged.

Three classes, each with its own priority and bound:

* ``result`` (upstream job results) and ``event`` (installs, activations, rollbacks) are kept
  up to a shared disk cap; past it, new upstream work is refused with a clear error, because
  silently dropping a result is never acceptable;
* ``telemetry`` is useful only in aggregate: past its cap the oldest entries are dropped.

Order is kept within a class (by sequence number). Draining takes results first, then events,
then telemetry, and a message is deleted only when the sender acknowledges it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class OutboxClass(StrEnum):
    RESULT = "result"
    EVENT = "event"
    TELEMETRY = "telemetry"


PRIORITY = {OutboxClass.RESULT: 0, OutboxClass.EVENT: 1, OutboxClass.TELEMETRY: 2}


@dataclass(frozen=True)
class OutboxLimits:
    #: Telemetry messages kept; older ones are dropped.
    telemetry_max_messages: int = 10_000
    #: Bytes of results and events kept; past it, upstream work is refused.
    durable_max_bytes: int = 64 << 20


class OutboxFull(Exception):
    def __init__(self, used_bytes: int, cap_bytes: int) -> None:
        super().__init__(
            f"outbox holds {used_bytes} bytes of results and events, cap is {cap_bytes}"
        )
        self.used_bytes = used_bytes
        self.cap_bytes = cap_bytes


@dataclass(frozen=True)
class Message:
    seq: int
    cls: OutboxClass
    topic: str
    body: dict[str, Any]
    created_at: float


def durable_bytes(conn: sqlite3.Connection) -> int:
    (used,) = conn.execute(
        "SELECT coalesce(sum(bytes), 0) FROM outbox WHERE class != 'telemetry'"
    ).fetchone()
    return int(used)


def put_message(
    conn: sqlite3.Connection,
    cls: OutboxClass,
    topic: str,
    body: dict[str, Any],
    limits: OutboxLimits | None = None,
) -> int:
    """Append a message (inside the caller's transaction). Telemetry trims its oldest."""
    limits = limits or OutboxLimits()
    data = json.dumps(body, separators=(",", ":"))
    # A result belongs to a job already accepted, so it is always kept: the cap is enforced
    # when upstream jobs are submitted (see jobs.store.submit), and on events here.
    if cls == OutboxClass.EVENT:
        used = durable_bytes(conn)
        if used + len(data) > limits.durable_max_bytes:
            raise OutboxFull(used, limits.durable_max_bytes)
    seq = conn.execute(
        "INSERT INTO outbox (class, topic, body, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
        (str(cls), topic, data, len(data), time.time()),
    ).lastrowid
    if cls == OutboxClass.TELEMETRY:
        conn.execute(
            "DELETE FROM outbox WHERE class = 'telemetry' AND seq NOT IN (SELECT seq FROM outbox "
            "WHERE class = 'telemetry' ORDER BY seq DESC LIMIT ?)",
            (limits.telemetry_max_messages,),
        )
    return int(seq or 0)


def has_room(limits: OutboxLimits) -> Any:
    def op(conn: sqlite3.Connection) -> bool:
        return durable_bytes(conn) < limits.durable_max_bytes

    return op


def put(cls: OutboxClass, topic: str, body: dict[str, Any], limits: OutboxLimits) -> Any:
    def op(conn: sqlite3.Connection) -> int:
        return put_message(conn, cls, topic, body, limits)

    return op


def peek(limit: int) -> Any:
    """The next messages to send: by class priority, then in order within the class."""

    def op(conn: sqlite3.Connection) -> list[Message]:
        rows = conn.execute(
            "SELECT * FROM outbox ORDER BY CASE class WHEN 'result' THEN 0 WHEN 'event' THEN 1 "
            "ELSE 2 END, seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            Message(
                r["seq"],
                OutboxClass(r["class"]),
                r["topic"],
                json.loads(r["body"]),
                r["created_at"],
            )
            for r in rows
        ]

    return op


def ack(seqs: list[int]) -> Any:
    """Delete acknowledged messages; unknown sequence numbers are ignored (acks may repeat)."""

    def op(conn: sqlite3.Connection) -> int:
        return sum(conn.execute("DELETE FROM outbox WHERE seq = ?", (s,)).rowcount for s in seqs)

    return op


def counts() -> Any:
    def op(conn: sqlite3.Connection) -> dict[str, int]:
        rows = conn.execute("SELECT class, count(*) FROM outbox GROUP BY class").fetchall()
        return {str(c): 0 for c in OutboxClass} | {r[0]: int(r[1]) for r in rows}

    return op
