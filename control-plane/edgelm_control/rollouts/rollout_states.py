"""A rollout's own life, as a transition table. Pure: state and event in, state out.

::

    running ──wave_passed──────► running     (another wave follows: the engine starts it)
    running ──wave_passed_pause► paused      (pause_between_waves: resume starts the next one)
    running ──last_wave_passed─► completed
    running ──pause────────────► paused ──resume──► running    (the engine looks again)
    running, paused ──wave_failed─────────► halted ──resume──► running
                                            (on_failure = "pause"; resume accepts the
                                             failed wave and the next one starts)
    running, paused ──wave_failed_abort───► failed              (on_failure = "abort")
    running, paused, halted, completed ──abort──► aborted

Operator events are ``pause``, ``resume`` and ``abort``; the engine's are the wave verdicts.
The engine turns a gate verdict into an event with :func:`wave_passed_event` and
:func:`wave_failed_event`, as the agent's job lifecycle turns a failure into ``retry`` or
``give_up``: the table stays a literal table.

Decisions the design left open, and why:

- ``halted`` is a state of its own, apart from ``paused``. Resuming an operator's pause asks
  the engine to look at the current wave again; resuming after a failed wave means the
  operator has looked at the failure and accepts it, so the engine moves on to the next wave
  (or completes). With one ``paused`` state, resume after a failure would re-evaluate the same
  failed wave and bounce straight back, leaving abort as the only way out.
- A pause holds progress, not protection: while paused the engine still evaluates the
  current wave and reports a failure (``paused → halted``, or ``paused → failed`` when
  ``on_failure`` is ``abort``), but it never starts the next wave (no ``wave_passed`` there).
- No ``aborting`` state: abort publishes every device's new desired state at once and the
  rollout is ``aborted`` at once. Waiting for rollbacks would let one offline device hold the
  rollout open for as long as it is away; the per-device rows (``rolling_back`` →
  ``rolled_back``) say how far the rollback got, and they keep updating after the rollout
  ended, like pending devices do.
- ``completed`` can still be aborted: its devices still run the new model and late joiners
  still get it, so an operator who finds the model bad a day later can stop and roll it back.
- ``aborted`` and ``failed`` take nothing (:data:`FINAL`); ``failed`` is an abort the rollout
  did to itself, with the same device effects.

Any other (state, event) pair raises :class:`IllegalRolloutTransition` (409 when an operator
asked for it) and changes nothing.
"""

from __future__ import annotations

from enum import StrEnum

from edgelm_control.rollouts.errors import IllegalRolloutTransition
from edgelm_control.rollouts.settings import OnFailure

__all__ = [
    "ACCEPTS_LATE_JOINERS",
    "ENDED",
    "ENGINE_EVENTS",
    "FINAL",
    "INITIAL",
    "OPERATOR_EVENTS",
    "TRANSITIONS",
    "IllegalRolloutTransition",
    "RolloutEvent",
    "RolloutState",
    "allowed_rollout_events",
    "next_rollout_state",
    "wave_failed_event",
    "wave_passed_event",
]


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # by the operator
    HALTED = "halted"  # by a failed wave, on_failure = "pause"; waiting for the operator
    COMPLETED = "completed"  # every wave passed; its status still lists devices pending
    ABORTED = "aborted"  # by the operator
    FAILED = "failed"  # by a failed wave, on_failure = "abort"; same device effects as abort


class RolloutEvent(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    WAVE_PASSED = "wave_passed"  # a wave passed and another follows
    WAVE_PASSED_PAUSE = "wave_passed_pause"  # the same, and pause_between_waves is on
    LAST_WAVE_PASSED = "last_wave_passed"  # the last wave passed
    WAVE_FAILED = "wave_failed"  # a wave failed and on_failure is "pause"
    WAVE_FAILED_ABORT = "wave_failed_abort"  # a wave failed and on_failure is "abort"


R = RolloutState
V = RolloutEvent

TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.RUNNING, V.PAUSE): R.PAUSED,
    (R.RUNNING, V.ABORT): R.ABORTED,
    (R.RUNNING, V.WAVE_PASSED): R.RUNNING,
    (R.RUNNING, V.WAVE_PASSED_PAUSE): R.PAUSED,
    (R.RUNNING, V.LAST_WAVE_PASSED): R.COMPLETED,
    (R.RUNNING, V.WAVE_FAILED): R.HALTED,
    (R.RUNNING, V.WAVE_FAILED_ABORT): R.FAILED,
    (R.PAUSED, V.RESUME): R.RUNNING,
    (R.PAUSED, V.ABORT): R.ABORTED,
    (R.PAUSED, V.WAVE_FAILED): R.HALTED,
    (R.PAUSED, V.WAVE_FAILED_ABORT): R.FAILED,
    (R.HALTED, V.RESUME): R.RUNNING,
    (R.HALTED, V.ABORT): R.ABORTED,
    (R.COMPLETED, V.ABORT): R.ABORTED,
}

INITIAL = R.RUNNING
#: No event moves these.
FINAL = frozenset({R.ABORTED, R.FAILED})
#: No wave starts any more (a completed rollout still serves pending devices and late joiners).
ENDED = frozenset({R.COMPLETED, R.ABORTED, R.FAILED})
#: A device enrolled later that matches the selector joins the rollout's last wave (as
#: ``waiting``), except once the rollout was aborted or failed: then it must not get the model.
ACCEPTS_LATE_JOINERS = frozenset({R.RUNNING, R.PAUSED, R.HALTED, R.COMPLETED})

OPERATOR_EVENTS = frozenset({V.PAUSE, V.RESUME, V.ABORT})
ENGINE_EVENTS = frozenset(set(RolloutEvent) - OPERATOR_EVENTS)

_ALLOWED: dict[RolloutState, frozenset[RolloutEvent]] = {
    state: frozenset(e for (s, e) in TRANSITIONS if s == state) for state in RolloutState
}


def allowed_rollout_events(state: RolloutState) -> frozenset[RolloutEvent]:
    """The events a rollout in ``state`` takes (the operator's buttons, among others)."""
    return _ALLOWED[state]


def next_rollout_state(state: RolloutState, event: RolloutEvent) -> RolloutState:
    """Where ``event`` takes a rollout in ``state``; raises :class:`IllegalRolloutTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalRolloutTransition(state, event, _ALLOWED[state]) from None


def wave_passed_event(
    wave_index: int, wave_count: int, *, pause_between_waves: bool = False
) -> RolloutEvent:
    """The event for wave ``wave_index`` (0-based) of ``wave_count`` passing."""
    if not 0 <= wave_index < wave_count:
        raise ValueError(f"wave index must be in 0..{wave_count - 1}, got {wave_index}")
    if wave_index == wave_count - 1:
        return V.LAST_WAVE_PASSED
    return V.WAVE_PASSED_PAUSE if pause_between_waves else V.WAVE_PASSED


def wave_failed_event(on_failure: OnFailure) -> RolloutEvent:
    """The event for a wave failing, as the rollout's ``on_failure`` setting decides."""
    return V.WAVE_FAILED_ABORT if on_failure is OnFailure.ABORT else V.WAVE_FAILED
