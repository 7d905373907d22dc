"""What the registry knows about this device's models, in one JSON file written atomically.

``state.json`` is the commit point of every install and activation: a model counts as installed,
or active, only once the file says so, and the file is replaced in one ``os.replace``. So a
``kill -9`` at any moment leaves either the state before or the state after, and the blobs it
names are complete, because blobs are committed before the state that refers to them.

The history is the registry's event log: every install, activation, failed activation,
rollback and removal is an entry written in the same ``os.replace`` as the change it records,
numbered by a sequence that only grows (``seq``). Fleet sync reports the entries after a
cursor it keeps in the agent's database, moving each into the outbox in the transaction that
advances the cursor, so every event is reported exactly once, however the agent is stopped.
(Why not move the registry's state into ``agent.db``: ``state.json`` is read by the registry
at every start, by the models CLI on a stopped agent, and before the database exists; one file
replaced atomically stays the simplest commit point, and the sequence and cursor give the
exactly-once report the outbox needs.)
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgelm_agent.registry.model_target import ModelTarget, model_target_from_dict
from edgelm_protocol.repository.atomic_file import write_atomic

HISTORY_LIMIT = 200


@dataclass(frozen=True)
class HistoryEntry:
    at: str
    event: str  # installed, activated, activation_failed, rolled_back, deactivated, removed
    model: str
    reason: str | None = None
    #: Position in the registry's event log; 0 for entries older than the numbering.
    seq: int = 0
    #: Why and how: the desired state and rollout that asked for it, health-check figures.
    details: dict[str, Any] | None = None

    @classmethod
    def now(
        cls,
        event: str,
        model: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(at, event, model, reason, details=details)


@dataclass(frozen=True)
class RegistryState:
    models: dict[str, ModelTarget] = field(default_factory=dict)  # by "name@version"
    active: str | None = None
    previous: str | None = None
    pinned: frozenset[str] = frozenset()
    #: The fleet rollout whose desired state made ``active`` active, if one did: a release
    #: (an aborted rollout) undoes only its own rollout's switch. Kept here, not read back
    #: from the history, which is capped.
    active_rollout: str | None = None
    history: tuple[HistoryEntry, ...] = ()
    #: The sequence number the next history entry gets.
    next_seq: int = 1

    def with_event(self, entry: HistoryEntry, **changes: Any) -> RegistryState:
        numbered = replace(entry, seq=self.next_seq)
        history = (*self.history, numbered)[-HISTORY_LIMIT:]
        return replace(self, history=history, next_seq=self.next_seq + 1, **changes)

    def events_after(self, seq: int) -> list[HistoryEntry]:
        """History entries numbered after ``seq``, oldest first (what is left to report)."""
        return [h for h in self.history if h.seq > seq]

    def installed(
        self, target: ModelTarget, details: dict[str, Any] | None = None
    ) -> RegistryState:
        models = {**self.models, target.ref: target}
        entry = HistoryEntry.now("installed", target.ref, details=details)
        return self.with_event(entry, models=models)

    def activated(self, ref: str, details: dict[str, Any] | None = None) -> RegistryState:
        previous = self.active if self.active != ref else self.previous
        entry = HistoryEntry.now("activated", ref, details=details)
        rollout = (details or {}).get("rollout")
        return self.with_event(
            entry,
            active=ref,
            previous=previous,
            active_rollout=rollout if isinstance(rollout, str) else None,
        )

    def activation_failed(
        self, ref: str, reason: str, details: dict[str, Any] | None = None
    ) -> RegistryState:
        return self.with_event(HistoryEntry.now("activation_failed", ref, reason, details))

    def rolled_back(
        self, ref: str, reason: str, details: dict[str, Any] | None = None
    ) -> RegistryState:
        previous = self.active if self.active != ref else self.previous
        entry = HistoryEntry.now("rolled_back", ref, reason, details)
        # The model it goes back to is nobody's rollout any more: no release undoes it.
        return self.with_event(entry, active=ref, previous=previous, active_rollout=None)

    def deactivated(
        self, ref: str, reason: str, details: dict[str, Any] | None = None
    ) -> RegistryState:
        """Nothing is served any more. ``previous`` stays: ``ref`` was withdrawn, so a
        rollback must not bring it back."""
        entry = HistoryEntry.now("deactivated", ref, reason, details)
        return self.with_event(entry, active=None, active_rollout=None)

    def claimed(self, rollout: str | None) -> RegistryState:
        """A rollout asked for the model that already serves: it is that rollout's now."""
        return replace(self, active_rollout=rollout)

    def removed(self, refs: set[str]) -> RegistryState:
        models = {k: v for k, v in self.models.items() if k not in refs}
        state = replace(self, models=models)
        for ref in sorted(refs):
            state = state.with_event(HistoryEntry.now("removed", ref))
        return state

    def keep(self) -> set[str]:
        """What garbage collection must never remove."""
        return {r for r in (self.active, self.previous) if r} | set(self.pinned)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "models": {ref: t.as_dict() for ref, t in sorted(self.models.items())},
                "active": self.active,
                "previous": self.previous,
                "pinned": sorted(self.pinned),
                "active_rollout": self.active_rollout,
                "history": [vars(h) for h in self.history],
                "next_seq": self.next_seq,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RegistryState:
        data = json.loads(raw)
        history = tuple(HistoryEntry(**h) for h in data.get("history", []))
        known = max((h.seq for h in history), default=0)
        return cls(
            models={ref: model_target_from_dict(t) for ref, t in data.get("models", {}).items()},
            active=data.get("active"),
            previous=data.get("previous"),
            pinned=frozenset(data.get("pinned", [])),
            active_rollout=data.get("active_rollout"),
            history=history,
            next_seq=max(int(data.get("next_seq", 1)), known + 1),
        )


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> RegistryState:
        try:
            return RegistryState.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return RegistryState()

    def save(self, state: RegistryState) -> None:
        write_atomic(self.path, state.to_json())
