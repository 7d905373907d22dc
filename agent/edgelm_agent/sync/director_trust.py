"""Which director keys a fleet device trusts: its bundle's, until a verified root names others.

The sources, and nothing else (never a message from the broker):

1. the enrollment bundle's ``director_keys``, checked at enrollment;
2. the director keys field of the newest TUF root ngclient verified (each root walked from
   the bundle's root, threshold-signed by the previous root keys and its own), read after
   every refresh with :func:`~edgelm_agent.registry.trust.trusted_root_director_keys`;
3. what (2) taught the device before, persisted with the root's version
   (:func:`~edgelm_agent.enrollment.write_learned_director_keys`), so a restart keeps it.

A root replaces the keys only when its version is above the one that taught the current keys,
so a stale metadata cache can never bring back a retired key.

A desired state signed only by keys the device does not know makes it look for a newer root
(a refresh), and anyone who can publish on the broker can send such states by the thousand.
:class:`KeyRefreshGate` bounds what they cost: one state waits (the newest; latest wins, so
the ones it replaces are dropped), one refresh runs at a time, and refreshes for unknown keys
start at least ``sync_key_refresh_interval_s`` apart. The director's own new key still gets
through: its state waits at most that long.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from edgelm_agent.enrollment import (
    Enrollment,
    LearnedDirectorKeys,
    read_learned_director_keys,
    write_learned_director_keys,
)
from edgelm_agent.registry.errors import RegistryError
from edgelm_agent.registry.trust import trusted_root_director_keys
from edgelm_protocol.signing import DirectorKeys

log = structlog.get_logger(__name__)

T = TypeVar("T")


class DirectorTrust:
    """The director keys in force, and learning new ones from verified roots (does file I/O:
    call :meth:`learn` from a worker thread)."""

    def __init__(self, state_dir: Path, enrollment: Enrollment, metadata_dir: Path) -> None:
        self.state_dir = state_dir
        self.metadata_dir = metadata_dir
        learned = read_learned_director_keys(state_dir)
        self.root_version = 0 if learned is None else learned.root_version
        self.keys = enrollment.director() if learned is None else learned.director()

    def learn(self) -> DirectorKeys | None:
        """Take the keys of the newest verified root if it names keys and is newer than the
        root that taught the current ones; return them if they changed, else ``None``."""
        try:
            found = trusted_root_director_keys(self.metadata_dir)
        except RegistryError as exc:
            log.error("director_keys_invalid", error=str(exc)[:500])
            return None
        if found is None or found.root_version <= self.root_version:
            return None
        learned = LearnedDirectorKeys(found.root_version, found.keys)
        keys = learned.director()
        write_learned_director_keys(self.state_dir, learned)
        changed = keys.keyids != self.keys.keyids
        self.root_version, self.keys = found.root_version, keys
        log.info(
            "director_keys_learned",
            root_version=found.root_version,
            keyids=sorted(k[:16] for k in keys.keyids),
            changed=changed,
        )
        return keys if changed else None


@dataclass(frozen=True)
class Waiting(Generic[T]):
    """A desired state waiting for a refresh, and how many refreshes had begun when it came
    (a refresh begun later, and finished, serves it)."""

    item: T
    asked: int


class KeyRefreshGate(Generic[T]):
    """Which state signed by unknown keys waits for a refresh, and when the next refresh for
    unknown keys may start. Pure: the shell passes a monotonic time in seconds, runs one
    refresh at a time, and logs what :meth:`offer` drops."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._waiting: Waiting[T] | None = None
        self._last_start_s: float | None = None

    def offer(self, item: T, asked: int) -> T | None:
        """``item`` waits now; return the one it replaces (dropped), if any."""
        replaced = self._waiting
        self._waiting = Waiting(item, asked)
        return None if replaced is None else replaced.item

    def peek(self) -> Waiting[T] | None:
        return self._waiting

    def take(self) -> Waiting[T]:
        waiting = self._waiting
        if waiting is None:
            raise RuntimeError("no desired state is waiting for a refresh")
        self._waiting = None
        return waiting

    def wait_s(self, now_s: float) -> float:
        """Seconds until a refresh for unknown keys may start (0: now)."""
        if self._last_start_s is None:
            return 0.0
        return max(0.0, self._last_start_s + self.min_interval_s - now_s)

    def started(self, now_s: float) -> None:
        """A refresh for unknown keys starts now."""
        self._last_start_s = now_s
