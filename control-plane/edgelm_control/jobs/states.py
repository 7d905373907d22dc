"""One device's part in a remote job, as a transition table. Pure.

::

    queued ──sent──► sent ──result──► succeeded | failed | dead | cancelled | expired
       └──────────────result──────────┘   (a result may overtake our own PUBACK record)
    queued, sent ──cancel──► cancelled     (the device was revoked)

``queued`` means stored and not yet taken by the broker; the dispatcher publishes it (again)
until the broker takes it. The envelope id is the job's idempotency key on the device, so a
second publication of the same job is never run twice. A result is final: a second result
for the same job (another message id, say after a device restore) changes nothing.

``cancel`` comes from the control plane when the device is revoked: it will never run the
job (a revoked device cannot connect, and what it sends is refused), so the row ends there.
"""

from __future__ import annotations

from enum import StrEnum

from edgelm_control.errors import ControlError
from edgelm_protocol import JobOutcome


class JobDeviceState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class JobDeviceEvent(StrEnum):
    SENT = "sent"
    RESULT = "result"
    CANCEL = "cancel"


class IllegalJobTransition(ControlError):
    code = "illegal_job_transition"

    def __init__(self, state: JobDeviceState, event: JobDeviceEvent) -> None:
        super().__init__(f"a job in state {state} cannot take {event}")
        self.state = state
        self.event = event


J = JobDeviceState
FINAL = frozenset({J.SUCCEEDED, J.FAILED, J.DEAD, J.CANCELLED, J.EXPIRED})
OPEN = frozenset({J.QUEUED, J.SENT})

TRANSITIONS: dict[tuple[JobDeviceState, JobDeviceEvent], JobDeviceState | None] = {
    (J.QUEUED, JobDeviceEvent.SENT): J.SENT,
    (J.QUEUED, JobDeviceEvent.RESULT): None,  # None: the result's outcome decides
    (J.SENT, JobDeviceEvent.RESULT): None,
    (J.QUEUED, JobDeviceEvent.CANCEL): J.CANCELLED,
    (J.SENT, JobDeviceEvent.CANCEL): J.CANCELLED,
}
#: The rows a revocation cancels.
CANCELLABLE = frozenset(s for (s, e) in TRANSITIONS if e is JobDeviceEvent.CANCEL)


def next_job_state(
    state: JobDeviceState, event: JobDeviceEvent, outcome: JobOutcome | None = None
) -> JobDeviceState:
    """Where ``event`` takes a job row; :class:`IllegalJobTransition` if nowhere."""
    if (state, event) not in TRANSITIONS:
        raise IllegalJobTransition(state, event)
    target = TRANSITIONS[(state, event)]
    if target is not None:
        return target
    if outcome is None:
        raise ValueError("a result transition needs the job's outcome")
    return JobDeviceState(str(outcome))
