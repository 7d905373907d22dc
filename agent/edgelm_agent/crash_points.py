"""Named points where a test can make the agent kill itself, as ``kill -9`` would there.

The kill -9 tests set ``EDGELM_TEST_CRASH_POINT`` (the ``test_crash_point`` setting) to one of
the names the code passes to its ``crash_point`` callable (``activation.before_switch``,
``download.complete``…); outside tests the callable does nothing. ``hang:NAME`` makes the thread
that reaches the point block for ever instead, as one stuck on a dead disk would: the shutdown
tests use it to show the agent still stops. ``stop:NAME`` stops the whole process there with
SIGSTOP, as ``kill -STOP`` would, each time the point is reached: a test then does what it must
happen at that very step (a client hanging up mid-load) and resumes it with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

CrashPoint = Callable[[str], None]


def no_crash(point: str) -> None:
    pass


def crash_point_from(name: str | None) -> CrashPoint:
    """A callable that kills the process with SIGKILL when it reaches the point ``name``."""
    if not name:
        return no_crash
    action, _, point_name = name.rpartition(":")
    action = action or "kill"

    def crash(point: str) -> None:
        if point == point_name:
            log.warning("crash_point_reached", point=point, action=action)
            if action == "hang":
                threading.Event().wait()  # nothing ever sets it
            if action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)  # the test sends SIGCONT
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return crash
