"""The wall clock, as a port: the engine, the director and the ingest path read time only here.

Tests pass a :class:`ManualClock` to move time forward without sleeping (an expiry of seven
days is tested in no time), and the production composition root passes :class:`SystemClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the epoch."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start_ms: int = 1_795_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, seconds: float) -> None:
        self._now_ms += round(seconds * 1000)


def seconds(ms: int) -> int:
    """Whole seconds, for the wire's integer Unix times."""
    return ms // 1000
