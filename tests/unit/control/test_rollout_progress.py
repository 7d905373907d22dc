"""What the engine does next with a rollout's current wave (``rollouts/progress.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.rollouts.gates import GateCode, GateResult, Verdict, WaveTally
from edgelm_control.rollouts.progress import WaveStep, needs_gate, wave_step
from edgelm_control.rollouts.rollout_states import (
    TRANSITIONS,
    RolloutEvent,
    RolloutState,
)
from edgelm_control.rollouts.settings import OnFailure

R = RolloutState
V = RolloutEvent
TALLY = WaveTally(1, 1, 1, 0, 0, 0)


def gate(verdict: Verdict) -> GateResult:
    return GateResult(verdict, GateCode.IN_PROGRESS, "x", TALLY)


def step(
    state: RolloutState,
    *,
    recorded: str | None = None,
    verdict: Verdict | None = None,
    wave: int = 0,
    count: int = 2,
    on_failure: OnFailure = OnFailure.PAUSE,
    pause_between_waves: bool = False,
) -> WaveStep:
    return wave_step(
        state,
        wave=wave,
        wave_count=count,
        recorded=recorded,
        gate=None if verdict is None else gate(verdict),
        on_failure=on_failure,
        pause_between_waves=pause_between_waves,
    )


class TestWaveStep:
    def test_a_running_gate_does_nothing(self):
        """Devices still at work: nothing is recorded, nothing fires."""
        assert step(R.RUNNING, verdict=Verdict.RUNNING) == WaveStep()

    def test_a_passed_wave_is_recorded_and_the_next_starts(self):
        """Passed with a wave left: record it, fire wave_passed; the last one completes."""
        passed = step(R.RUNNING, verdict=Verdict.PASSED)
        assert passed.record is not None
        assert passed.event is V.WAVE_PASSED
        last = step(R.RUNNING, verdict=Verdict.PASSED, wave=1)
        assert last.event is V.LAST_WAVE_PASSED

    def test_pause_between_waves_pauses_after_each_wave_but_the_last(self):
        """With pause_between_waves a passed wave pauses the rollout before the next one; the
        last wave still completes it (there is nothing left to approve)."""
        held = step(R.RUNNING, verdict=Verdict.PASSED, pause_between_waves=True)
        assert held.record is not None
        assert held.event is V.WAVE_PASSED_PAUSE
        assert TRANSITIONS[(R.RUNNING, V.WAVE_PASSED_PAUSE)] is R.PAUSED
        last = step(R.RUNNING, verdict=Verdict.PASSED, wave=1, pause_between_waves=True)
        assert last.event is V.LAST_WAVE_PASSED
        recorded = step(R.RUNNING, recorded="passed", pause_between_waves=True)
        assert recorded == WaveStep(event=V.WAVE_PASSED_PAUSE)

    def test_a_wave_passing_while_paused_is_recorded_but_holds(self):
        """A pause holds progress: the verdict is kept, the next wave waits for resume."""
        held = step(R.PAUSED, verdict=Verdict.PASSED)
        assert held.record is not None
        assert held.event is None

    @pytest.mark.parametrize("state", [R.RUNNING, R.PAUSED])
    @pytest.mark.parametrize(
        ("on_failure", "event"),
        [(OnFailure.PAUSE, V.WAVE_FAILED), (OnFailure.ABORT, V.WAVE_FAILED_ABORT)],
    )
    def test_a_failed_wave_fires_as_on_failure_says(
        self, state: RolloutState, on_failure: OnFailure, event: RolloutEvent
    ):
        """A failure halts or fails the rollout, paused or not (a pause is not protection)."""
        failed = step(state, verdict=Verdict.FAILED, on_failure=on_failure)
        assert failed.record is not None
        assert failed.event is event

    def test_a_recorded_verdict_is_acted_on_without_a_gate(self):
        """After a crash between recording and acting, the recorded verdict decides."""
        assert step(R.RUNNING, recorded="passed") == WaveStep(event=V.WAVE_PASSED)
        assert step(R.PAUSED, recorded="passed") == WaveStep()
        assert step(R.PAUSED, recorded="failed") == WaveStep(event=V.WAVE_FAILED)

    @pytest.mark.parametrize("state", [R.HALTED, R.COMPLETED, R.ABORTED, R.FAILED])
    def test_a_rollout_that_is_not_moving_takes_no_step(self, state: RolloutState):
        """Halted, completed and ended rollouts are not advanced by the engine."""
        assert step(state, verdict=Verdict.FAILED) == WaveStep()
        assert not needs_gate(state, None)


@given(
    state=st.sampled_from(list(RolloutState)),
    recorded=st.sampled_from([None, "passed", "failed", "accepted"]),
    verdict=st.one_of(st.none(), st.sampled_from(list(Verdict))),
    wave=st.integers(0, 3),
    on_failure=st.sampled_from(list(OnFailure)),
)
def test_every_step_fires_an_event_the_rollout_table_takes(
    state: RolloutState,
    recorded: str | None,
    verdict: Verdict | None,
    wave: int,
    on_failure: OnFailure,
):
    """Whatever the inputs, a step's event is legal in the rollout's state, and a verdict is
    recorded only for a wave that had none."""
    got = step(state, recorded=recorded, verdict=verdict, wave=wave, count=4, on_failure=on_failure)
    if got.event is not None:
        assert (state, got.event) in TRANSITIONS
    if got.record is not None:
        assert recorded is None
