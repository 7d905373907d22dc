"""structlog setup, and a limiter for events that can come in floods.

JSON lines for journald and log shippers, readable lines on a terminal. The control plane does
not import the agent, so this restates the agent's setup (the two must look alike in one log
pipeline: same keys, same timestamp format).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from edgelm_control.config import LogFormat


def configure_logging(fmt: LogFormat, level: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if use_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class RateLimitedLog:
    """At most ``burst`` lines per ``every_s`` for one event and key, then one line with the
    count held back: a device that floods junk costs a few lines, not megabytes of log."""

    def __init__(
        self,
        logger: Any,
        event: str,
        *,
        every_s: float = 10.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._event = event
        self._every_s = every_s
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, shown, held)

    def warning(self, key: str, **facts: Any) -> bool:
        """Log ``facts`` unless ``key`` used up its burst in this window; True if logged."""
        now = self._clock()
        start, shown, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self._every_s:
            start, shown, held = now, 0, held
        if shown >= self._burst:
            self._windows[key] = (start, shown, held + 1)
            return False
        if held:
            facts["suppressed"] = held
        self._logger.warning(self._event, **facts)
        self._windows[key] = (start, shown + 1, 0)
        if len(self._windows) > 10_000:  # keys are codes and devices: bound the memory
            self._windows.clear()
        return True
