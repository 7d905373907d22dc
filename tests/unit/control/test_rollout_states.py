"""A rollout's own state machine: the table, its sets, and the engine's event helpers.

The expected table is written out again in plain strings from the diagram in
``edgelm_control/rollouts/rollout_states.py``, sharing nothing with the table under test.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from edgelm_control.errors import Conflict
from edgelm_control.rollouts.rollout_states import (
    ACCEPTS_LATE_JOINERS,
    ENDED,
    ENGINE_EVENTS,
    FINAL,
    INITIAL,
    OPERATOR_EVENTS,
    TRANSITIONS,
    IllegalRolloutTransition,
    RolloutEvent,
    RolloutState,
    allowed_rollout_events,
    next_rollout_state,
    wave_failed_event,
    wave_passed_event,
)
from edgelm_control.rollouts.settings import OnFailure

EXPECTED: dict[tuple[str, str], str] = {
    ("running", "pause"): "paused",
    ("running", "abort"): "aborted",
    ("running", "wave_passed"): "running",
    ("running", "wave_passed_pause"): "paused",
    ("running", "last_wave_passed"): "completed",
    ("running", "wave_failed"): "halted",
    ("running", "wave_failed_abort"): "failed",
    ("paused", "resume"): "running",
    ("paused", "abort"): "aborted",
    ("paused", "wave_failed"): "halted",
    ("paused", "wave_failed_abort"): "failed",
    ("halted", "resume"): "running",
    ("halted", "abort"): "aborted",
    ("completed", "abort"): "aborted",
}
STATES = {"running", "paused", "halted", "completed", "aborted", "failed"}
EVENTS = {
    "pause", "resume", "abort", "wave_passed", "wave_passed_pause", "last_wave_passed",
    "wave_failed", "wave_failed_abort",
}  # fmt: skip
ILLEGAL = [
    (s, e) for s, e in itertools.product(sorted(STATES), sorted(EVENTS)) if (s, e) not in EXPECTED
]


class TestRolloutTransitionTable:
    def test_table_is_the_diagram(self) -> None:
        """The table holds exactly the diagram's arrows over exactly the declared states."""
        assert {s.value for s in RolloutState} == STATES
        assert {e.value for e in RolloutEvent} == EVENTS
        assert {(s.value, e.value): t.value for (s, e), t in TRANSITIONS.items()} == EXPECTED
        assert INITIAL is RolloutState.RUNNING

    @pytest.mark.parametrize(("state", "event"), sorted(EXPECTED))
    def test_declared_row_moves_the_rollout(self, state: str, event: str) -> None:
        """Each declared (state, event) row leads where the diagram says."""
        got = next_rollout_state(RolloutState(state), RolloutEvent(event))
        assert got == EXPECTED[state, event]

    @pytest.mark.parametrize(("state", "event"), ILLEGAL)
    def test_undeclared_pair_raises_and_changes_nothing(self, state: str, event: str) -> None:
        """Every pair the diagram does not draw raises a 409 and keeps the state."""
        current = RolloutState(state)
        with pytest.raises(IllegalRolloutTransition) as refused:
            current = next_rollout_state(current, RolloutEvent(event))
        assert current == state
        assert refused.value.state == state
        assert refused.value.event == event
        assert refused.value.allowed == allowed_rollout_events(RolloutState(state))
        assert refused.value.status_code == 409
        assert f"a {state} rollout cannot {event}" in str(refused.value)

    def test_refusal_lists_what_the_state_takes(self) -> None:
        """The message of a refused pause on a completed rollout says that abort is possible."""
        with pytest.raises(IllegalRolloutTransition) as refused:
            next_rollout_state(RolloutState.COMPLETED, RolloutEvent.PAUSE)
        assert str(refused.value) == "a completed rollout cannot pause; it takes: abort"
        assert isinstance(refused.value, Conflict)

    def test_sets_of_states_and_events(self) -> None:
        """Final, ended and late-joiner states, and operator/engine events, are as documented."""
        assert {s.value for s in FINAL} == {"aborted", "failed"}
        assert {s.value for s in ENDED} == {"completed", "aborted", "failed"}
        assert {s.value for s in ACCEPTS_LATE_JOINERS} == {
            "running", "paused", "halted", "completed",
        }  # fmt: skip
        assert {e.value for e in OPERATOR_EVENTS} == {"pause", "resume", "abort"}
        assert set(RolloutEvent) == OPERATOR_EVENTS | ENGINE_EVENTS
        assert not OPERATOR_EVENTS & ENGINE_EVENTS
        for state in FINAL:
            assert allowed_rollout_events(state) == frozenset()

    def test_no_wave_starts_while_paused_or_halted(self) -> None:
        """A pause holds progress: paused and halted rollouts take no wave_passed event."""
        for state in (RolloutState.PAUSED, RolloutState.HALTED):
            allowed = allowed_rollout_events(state)
            assert RolloutEvent.WAVE_PASSED not in allowed
            assert RolloutEvent.WAVE_PASSED_PAUSE not in allowed
            assert RolloutEvent.LAST_WAVE_PASSED not in allowed


class TestWaveEvents:
    @given(wave_count=st.integers(1, 50), data=st.data())
    def test_only_the_last_wave_completes(self, wave_count: int, data: st.DataObject) -> None:
        """A passing wave is last_wave_passed exactly when it is the last one."""
        index = data.draw(st.integers(0, wave_count - 1))
        event = wave_passed_event(index, wave_count)
        last = index == wave_count - 1
        assert event == (RolloutEvent.LAST_WAVE_PASSED if last else RolloutEvent.WAVE_PASSED)
        held = wave_passed_event(index, wave_count, pause_between_waves=True)
        assert held == (RolloutEvent.LAST_WAVE_PASSED if last else RolloutEvent.WAVE_PASSED_PAUSE)

    @pytest.mark.parametrize(("index", "count"), [(-1, 3), (3, 3), (0, 0)])
    def test_a_wave_outside_the_plan_is_refused(self, index: int, count: int) -> None:
        """A wave index outside 0..count-1 is a programming error, said with the bounds."""
        with pytest.raises(ValueError, match="wave index"):
            wave_passed_event(index, count)

    def test_on_failure_chooses_the_failed_event(self) -> None:
        """on_failure=pause halts the rollout; on_failure=abort fails it."""
        assert wave_failed_event(OnFailure.PAUSE) == RolloutEvent.WAVE_FAILED
        assert wave_failed_event(OnFailure.ABORT) == RolloutEvent.WAVE_FAILED_ABORT
        running = RolloutState.RUNNING
        assert next_rollout_state(running, wave_failed_event(OnFailure.PAUSE)) == "halted"
        assert next_rollout_state(running, wave_failed_event(OnFailure.ABORT)) == "failed"


class RolloutMachine(RuleBasedStateMachine):
    """Random operator and engine events against one rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.state = INITIAL
        self.history: list[RolloutState] = [INITIAL]

    @rule(event=st.sampled_from(RolloutEvent))
    def fire(self, event: RolloutEvent) -> None:
        before = self.state
        expected = EXPECTED.get((before.value, event.value))
        if expected is None:
            with pytest.raises(IllegalRolloutTransition):
                self.state = next_rollout_state(self.state, event)
            assert self.state == before
        else:
            self.state = next_rollout_state(self.state, event)
            assert self.state == expected
        self.history.append(self.state)

    @invariant()
    def final_states_are_never_left(self) -> None:
        assert self.state.value in STATES
        for earlier, later in itertools.pairwise(self.history):
            if earlier in FINAL:
                assert later == earlier
            if earlier is RolloutState.COMPLETED and later != earlier:
                assert later is RolloutState.ABORTED  # only an abort leaves completed


class TestRolloutStateMachine:
    def test_random_event_sequences_follow_the_diagram(self) -> None:
        """Random events move a rollout as the diagram says, or are refused and change nothing."""
        run_state_machine_as_test(
            RolloutMachine, settings=settings(max_examples=200, stateful_step_count=30)
        )
