"""structlog setup: JSON lines for journald and log shippers, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from edgelm_agent.config import LogFormat


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
    """One warning per ``every_s`` for an event that can come in floods (a client hammering
    the listener, the process out of file descriptors), with the count of the ones held back,
    so a flood costs a line every few seconds instead of megabytes of log."""

    def __init__(
        self,
        logger: Any,
        event: str,
        *,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._event = event
        self._every_s = every_s
        self._clock = clock
        self._next_at = 0.0
        self._suppressed = 0

    def emit(self, **facts: Any) -> bool:
        """Log now if the last line is old enough; returns whether it did."""
        now = self._clock()
        if now < self._next_at:
            self._suppressed += 1
            return False
        self._logger.warning(self._event, suppressed=self._suppressed, **facts)
        self._suppressed = 0
        self._next_at = now + self._every_s
        return True
