"""Registry history into the outbox: exactly once, after a cursor, and never stopped by a
full outbox (the rest waits in the history)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edgelm_agent.jobs import database
from edgelm_agent.jobs.outbox import OutboxLimits
from edgelm_agent.registry.state import HistoryEntry, RegistryState
from edgelm_agent.sync import registry_events


def history(count: int) -> RegistryState:
    state = RegistryState()
    for i in range(count):
        entry = HistoryEntry.now("activated", f"m@{i}", details={"desired_sequence": i + 1})
        state = state.with_event(entry)
    return state


def connect(tmp_path: Path) -> sqlite3.Connection:
    conn = database.connect(tmp_path / "agent.db")
    database.migrate(conn)
    return conn


def events(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT body FROM outbox WHERE kind = 'event' ORDER BY seq").fetchall()
    return [json.loads(body)["model"] for (body,) in rows]


def test_each_entry_moves_once(tmp_path: Path) -> None:
    conn = connect(tmp_path)
    state = history(3)
    with conn:
        assert registry_events.transfer(state.events_after(0), OutboxLimits())(conn) == 3
    with conn:
        assert registry_events.transfer(state.events_after(0), OutboxLimits())(conn) == 0
    assert events(conn) == ["m@0", "m@1", "m@2"]


def test_a_full_outbox_stops_the_move_and_the_rest_follows_later(tmp_path: Path) -> None:
    """A device offline for long fills its outbox; the move must not raise (that used to
    crash the sync service in a loop) and must not skip what did not fit."""
    conn = connect(tmp_path)
    state = history(5)
    body = registry_events.event_body(state.history[0])
    one = len(json.dumps(body, separators=(",", ":")))
    tight = OutboxLimits(durable_max_bytes=2 * one + 1)  # room for two events
    with conn:
        moved = registry_events.transfer(state.events_after(0), tight)(conn)
    assert moved == 2
    assert events(conn) == [f"m@{i}" for i in range(moved)]
    assert int(registry_events.get_value(conn, registry_events.CURSOR) or 0) == moved
    with conn:
        conn.execute("DELETE FROM outbox")  # the control plane acknowledged them
    with conn:
        rest = registry_events.transfer(state.events_after(0), OutboxLimits())(conn)
    assert rest == 5 - moved
    assert events(conn) == [f"m@{i}" for i in range(moved, 5)]
