"""A job's life as a transition table. Pure: states and events in, the next state out.

::

    queued ──start──► running ──succeed──► succeeded
      ▲  │              │ ├────fail_permanent──► failed
      │  │              │ └────fail_transient──► queued (retry, after backoff)
      │  │              │                   └──► dead   (no attempts left)
      │  ├─cancel──► cancelled ◄──cancel── running
      │  └─expire──► expired
      └──recover── running   (the agent died while it ran: run it again, one more attempt)

An event a state does not allow raises :class:`IllegalTransition` and changes nothing.
"""

from __future__ import annotations

from enum import StrEnum

from edgelm_agent.errors import EdgelmError


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DEAD = "dead"


class JobEvent(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    FAIL_PERMANENT = "fail_permanent"
    RETRY = "retry"  # a transient failure with attempts left
    GIVE_UP = "give_up"  # a transient failure on the last attempt
    CANCEL = "cancel"
    EXPIRE = "expire"
    RECOVER = "recover"


FINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.DEAD}
)

TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.QUEUED, JobEvent.START): JobState.RUNNING,
    (JobState.QUEUED, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.QUEUED, JobEvent.EXPIRE): JobState.EXPIRED,
    (JobState.RUNNING, JobEvent.SUCCEED): JobState.SUCCEEDED,
    (JobState.RUNNING, JobEvent.FAIL_PERMANENT): JobState.FAILED,
    (JobState.RUNNING, JobEvent.RETRY): JobState.QUEUED,
    (JobState.RUNNING, JobEvent.GIVE_UP): JobState.DEAD,
    (JobState.RUNNING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, JobEvent.RECOVER): JobState.QUEUED,
}


class IllegalTransition(EdgelmError):  # named for what it is, as in h11
    code = "illegal_transition"

    def __init__(self, state: JobState, event: JobEvent) -> None:
        super().__init__(f"a {state} job cannot {event}")
        self.state = state
        self.event = event


def next_state(state: JobState, event: JobEvent) -> JobState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def failure_event(attempts: int, max_attempts: int) -> JobEvent:
    """What a transient failure on attempt ``attempts`` (1-based) leads to."""
    return JobEvent.RETRY if attempts < max_attempts else JobEvent.GIVE_UP


def backoff_s(attempts: int, *, base_s: float = 2.0, cap_s: float = 300.0) -> float:
    """Exponential backoff before retry number ``attempts``: 2, 4, 8 … capped at 5 minutes."""
    return float(min(cap_s, base_s * 2 ** max(0, attempts - 1)))
