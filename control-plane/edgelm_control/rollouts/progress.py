"""What the engine does next with a rollout's current wave. Pure.

The engine evaluates the current wave's gate (:func:`~.gates.evaluate_wave`) until it has a
verdict, records the verdict once, and turns it into a rollout event (:mod:`.rollout_states`):

==========  ============  ===================  =========================================
rollout     recorded      gate now             step
==========  ============  ===================  =========================================
running     (none)        running              nothing
running     (none)        passed               record ``passed``; ``wave_passed``,
                                               ``wave_passed_pause`` or ``last_wave_passed``
paused      (none)        passed               record ``passed``; no event (a pause holds
                                               progress): resume fires it
running,    (none)        failed               record ``failed``; ``wave_failed`` or
paused                                         ``wave_failed_abort`` (``on_failure``)
running     passed        (not evaluated)      ``wave_passed`` / ``last_wave_passed``
running,    failed        (not evaluated)      ``wave_failed`` / ``wave_failed_abort``
paused
other       any           any                  nothing
==========  ============  ===================  =========================================

The rows with a recorded verdict exist for a crash between recording and acting (both run in
one transaction, so only another replica's race can leave them), and for a wave that passed
while paused. A recorded verdict is never re-evaluated: a ``timed_out`` device that revives
later changes its row, not a decided wave.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgelm_control.rollouts.gates import GateResult, Verdict
from edgelm_control.rollouts.rollout_states import (
    RolloutEvent,
    RolloutState,
    wave_failed_event,
    wave_passed_event,
)
from edgelm_control.rollouts.settings import OnFailure

PASSED = "passed"
FAILED = "failed"
ACCEPTED = "accepted"  # failed, then accepted by the operator's resume


@dataclass(frozen=True)
class WaveStep:
    record: GateResult | None = None  # a verdict to record now
    event: RolloutEvent | None = None  # then the rollout event to fire


def needs_gate(state: RolloutState, recorded: str | None) -> bool:
    """Whether the gate must be evaluated: an undecided wave of a running or paused rollout."""
    return recorded is None and state in (RolloutState.RUNNING, RolloutState.PAUSED)


def wave_step(
    state: RolloutState,
    *,
    wave: int,
    wave_count: int,
    recorded: str | None,
    gate: GateResult | None,
    on_failure: OnFailure,
    pause_between_waves: bool = False,
) -> WaveStep:
    """The step for the current wave (see the module's table)."""
    if state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return WaveStep()
    running = state is RolloutState.RUNNING
    passed = wave_passed_event(wave, wave_count, pause_between_waves=pause_between_waves)
    if recorded is None:
        if gate is None or gate.verdict is Verdict.RUNNING:
            return WaveStep()
        if gate.verdict is Verdict.PASSED:
            return WaveStep(gate, passed if running else None)
        return WaveStep(gate, wave_failed_event(on_failure))
    if recorded == PASSED and running:
        return WaveStep(event=passed)
    if recorded == FAILED:
        return WaveStep(event=wave_failed_event(on_failure))
    return WaveStep()
