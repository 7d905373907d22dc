"""Registry events into the outbox, exactly once, after a cursor kept beside the outbox.

The registry numbers its history (see :mod:`edgelm_agent.registry.state`); this moves every
entry after the cursor into the outbox and advances the cursor in one SQLite transaction, so a
crash before the commit moves them again and a crash after it never moves them twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from edgelm_agent.jobs import outbox
from edgelm_agent.jobs.outbox import MessageKind, OutboxLimits
from edgelm_agent.registry.state import HistoryEntry
from edgelm_protocol import EventKind

CURSOR = "registry_events_cursor"
APPLIED = "desired_applied_sequence"
KNOWN_GOOD = "desired_known_good_s"  # issued_at of the newest desired state applied

#: Registry history → the protocol's event kinds. ``removed`` (gc) stays local.
KINDS = {
    "installed": EventKind.INSTALLED,
    "activated": EventKind.ACTIVATED,
    "activation_failed": EventKind.ACTIVATION_FAILED,
    "rolled_back": EventKind.ROLLED_BACK,
    "deactivated": EventKind.DEACTIVATED,
}


def event_body(entry: HistoryEntry) -> dict[str, Any] | None:
    """The protocol's ``event`` body for a history entry (without ``seq``, which the outbox
    gives), or ``None`` for entries the fleet does not hear about."""
    kind = KINDS.get(entry.event)
    if kind is None:
        return None
    details = entry.details or {}
    health = details.get("health")
    return {
        "kind": kind.value,
        "model": entry.model,
        "desired_sequence": details.get("desired_sequence"),
        "rollout": details.get("rollout"),
        "reason": entry.reason,
        "health": health if isinstance(health, dict) else None,
        "progress": None,
    }


def get_value(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM sync_state WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_value(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO sync_state (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def start_cursor(next_seq: int) -> Any:
    """At a device's first sync: history from before it joined the fleet is not reported."""

    def op(conn: sqlite3.Connection) -> int:
        current = get_value(conn, CURSOR)
        if current is None:
            set_value(conn, CURSOR, str(next_seq - 1))
            return next_seq - 1
        return int(current)

    return op


def transfer(entries: Sequence[HistoryEntry], limits: OutboxLimits) -> Any:
    """Move the entries after the cursor into the outbox; returns how many went. A full
    outbox stops the move, never fails it: what did not fit goes on a later call."""

    def op(conn: sqlite3.Connection) -> int:
        cursor = int(get_value(conn, CURSOR) or 0)
        moved = 0
        for entry in sorted(entries, key=lambda e: e.seq):
            if entry.seq <= cursor:
                continue
            body = event_body(entry)
            if body is not None:
                try:
                    outbox.append(conn, MessageKind.EVENT, body, limits)
                except outbox.OutboxFull:
                    # The rest waits in the registry's history until the link drains the
                    # outbox; the cursor stops before the first entry that did not fit.
                    break
                moved += 1
            cursor = entry.seq
        set_value(conn, CURSOR, str(cursor))
        return moved

    return op
