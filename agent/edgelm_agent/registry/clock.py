"""The time metadata expiry is judged by, on devices whose clock may be wrong.

A Raspberry Pi has no real-time clock: after a power cut it may boot in 1970 until NTP answers,
which may be never on an offline site. We keep a *last-known-good* time, the moment of the last
successful metadata refresh, and judge expiry by ``max(now, last_known_good)``. It only moves
forward, and only when fresh signed metadata was accepted at that time, so a clock set far into
the future by mistake does not stick. Expiry gates new installs only; the active model keeps
serving regardless (see :mod:`edgelm_agent.registry.registry`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

from edgelm_protocol.repository.atomic_file import write_atomic

UTC = datetime.UTC


class LastKnownGoodClock:
    def __init__(
        self, path: Path, now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC)
    ) -> None:
        self._path = path
        self._now = now

    def last_known_good(self) -> datetime.datetime | None:
        try:
            data = json.loads(self._path.read_bytes())
            return datetime.datetime.fromisoformat(data["last_known_good"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def reference_time(self) -> datetime.datetime:
        now = self._now()
        known = self.last_known_good()
        return max(now, known) if known is not None else now

    def advance(self, moment: datetime.datetime) -> None:
        """Record a successful refresh at ``moment``; never moves the clock back."""
        known = self.last_known_good()
        if known is not None and moment <= known:
            return
        write_atomic(self._path, json.dumps({"last_known_good": moment.isoformat()}).encode())
