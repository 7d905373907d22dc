"""Pure pacing for the reconnect loop: when to try again, and when to say so in the log.

Neither class reads a clock or sleeps; the client passes the time in, so tests need none.
"""

from __future__ import annotations

import random

# 2**62 seconds is beyond any cap; a bounded exponent keeps the float math finite.
_MAX_EXPONENT = 62


class ReconnectBackoff:
    """Exponential backoff with full jitter above a floor.

    Before attempt ``n`` (0 for the first attempt after a drop) the pause is drawn uniformly
    from ``[min_s, min(max_s, min_s * 2 ** (n + 1))]``. The floor keeps a broken broker from
    being hammered; the jitter spreads a fleet that lost the broker at the same moment, so a
    restarted broker is not hit by every device in the same second.
    """

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"expected 0 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng or random.Random()

    def ceiling_s(self, attempt: int) -> float:
        """The longest pause before attempt ``attempt``."""
        exponent = min(max(attempt, 0) + 1, _MAX_EXPONENT)
        return min(self.max_s, self.min_s * 2.0**exponent)

    def delay_s(self, attempt: int) -> float:
        """A pause, in seconds, to sleep before attempt ``attempt``."""
        return self.min_s + self._rng.uniform(0.0, self.ceiling_s(attempt) - self.min_s)


class FailureLogThrottle:
    """Lets the first failure of a streak through, then at most one per ``interval_s``.

    A device that is offline for a week must not write a warning every two minutes, and an
    operator must still see that it keeps trying: each logged line carries how many failures
    were kept quiet since the previous one.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next_log_s: float | None = None
        self._suppressed = 0

    def admit(self, now_s: float) -> int | None:
        """None to stay quiet; else log now, and the value is how many were kept quiet."""
        if self._next_log_s is not None and now_s < self._next_log_s:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next_log_s = now_s + self.interval_s
        return suppressed

    def reset(self) -> None:
        """A success ends the streak: the next failure is logged at once."""
        self._next_log_s = None
        self._suppressed = 0
