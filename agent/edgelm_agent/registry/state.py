"""What the registry knows about this device's models, in one JSON file written atomically.

``state.json`` is the commit point of every install and activation: a model counts as installed,
or active, only once the file says so, and the file is replaced in one ``os.replace``. So a
``kill -9`` at any moment leaves either the state before or the state after, and the blobs it
names are complete, because blobs are committed before the state that refers to them.
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
    event: str  # installed, activated, activation_failed, rolled_back, removed
    model: str
    reason: str | None = None

    @classmethod
    def now(cls, event: str, model: str, reason: str | None = None) -> HistoryEntry:
        return cls(
            datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), event, model, reason
        )


@dataclass(frozen=True)
class RegistryState:
    models: dict[str, ModelTarget] = field(default_factory=dict)  # by "name@version"
    active: str | None = None
    previous: str | None = None
    pinned: frozenset[str] = frozenset()
    history: tuple[HistoryEntry, ...] = ()

    def with_event(self, entry: HistoryEntry, **changes: Any) -> RegistryState:
        history = (*self.history, entry)[-HISTORY_LIMIT:]
        return replace(self, history=history, **changes)

    def installed(self, target: ModelTarget) -> RegistryState:
        models = {**self.models, target.ref: target}
        return self.with_event(HistoryEntry.now("installed", target.ref), models=models)

    def activated(self, ref: str) -> RegistryState:
        previous = self.active if self.active != ref else self.previous
        return self.with_event(HistoryEntry.now("activated", ref), active=ref, previous=previous)

    def activation_failed(self, ref: str, reason: str) -> RegistryState:
        return self.with_event(HistoryEntry.now("activation_failed", ref, reason))

    def rolled_back(self, ref: str, reason: str) -> RegistryState:
        previous = self.active if self.active != ref else self.previous
        return self.with_event(
            HistoryEntry.now("rolled_back", ref, reason), active=ref, previous=previous
        )

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
                "history": [vars(h) for h in self.history],
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RegistryState:
        data = json.loads(raw)
        return cls(
            models={ref: model_target_from_dict(t) for ref, t in data.get("models", {}).items()},
            active=data.get("active"),
            previous=data.get("previous"),
            pinned=frozenset(data.get("pinned", [])),
            history=tuple(HistoryEntry(**h) for h in data.get("history", [])),
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
