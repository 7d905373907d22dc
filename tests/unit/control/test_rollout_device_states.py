"""One device's part in a rollout: the transition table, its state sets and the clock's events.

The expected table is written out again here in plain strings, from the diagram in
``edgelm_control/rollouts/device_states.py``, so that it shares nothing with the table under
test.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from edgelm_control.errors import ControlError, RequestError
from edgelm_control.rollouts.device_states import (
    CLOSED,
    FAILURES,
    FINAL,
    HOLDS_DESIRED_STATE,
    IN_PROGRESS,
    INITIAL,
    NOT_ELIGIBLE,
    TRANSITIONS,
    DeviceEvent,
    DeviceState,
    IllegalTransition,
    allowed_events,
    due_clock_event,
    next_device_state,
)
from edgelm_control.rollouts.settings import RolloutSettings

LATE_REPORTS = {
    "download_started": "downloading",
    "installed": "activating",
    "activated": "succeeded",
    "install_failed": "failed",
    "activation_failed": "failed",
}

EXPECTED: dict[tuple[str, str], str] = {
    ("waiting", "wave_started"): "pending",
    ("waiting", "abort"): "cancelled",
    ("waiting", "supersede"): "superseded",
    **{("pending", event): target for event, target in LATE_REPORTS.items()},
    ("pending", "device_timeout"): "timed_out",
    ("pending", "pending_expired"): "expired",
    ("pending", "abort"): "cancelled",
    ("pending", "supersede"): "superseded",
    **{("downloading", event): target for event, target in LATE_REPORTS.items()},
    ("downloading", "device_timeout"): "timed_out",
    ("downloading", "abort"): "cancelled",
    ("downloading", "supersede"): "superseded",
    ("activating", "activated"): "succeeded",
    ("activating", "activation_failed"): "failed",
    ("activating", "device_timeout"): "timed_out",
    ("activating", "abort"): "rolling_back",
    ("activating", "supersede"): "superseded",
    ("succeeded", "abort"): "rolling_back",
    ("succeeded", "supersede"): "superseded",
    **{("timed_out", event): target for event, target in LATE_REPORTS.items()},
    ("timed_out", "abort"): "rolling_back",
    ("timed_out", "supersede"): "superseded",
    **{("expired", event): target for event, target in LATE_REPORTS.items()},
    ("expired", "abort"): "cancelled",
    ("expired", "supersede"): "superseded",
    ("cancelled", "activated"): "rolling_back",
    ("rolling_back", "rolled_back"): "rolled_back",
    ("rolling_back", "activated"): "rolling_back",
    ("rolling_back", "supersede"): "superseded",
    # A revoked device leaves its rollout from every state that is not closed.
    **{
        (state, "revoke"): "revoked"
        for state in (
            "waiting", "pending", "downloading", "activating", "succeeded", "timed_out",
            "expired", "cancelled", "rolling_back",
        )
    },
}  # fmt: skip
STATES = {
    "waiting", "pending", "downloading", "activating", "succeeded", "failed", "timed_out",
    "expired", "cancelled", "rolling_back", "rolled_back", "superseded", "revoked",
}  # fmt: skip
EVENTS = {
    "wave_started", "download_started", "installed", "activated", "install_failed",
    "activation_failed", "device_timeout", "pending_expired", "abort", "supersede",
    "rolled_back", "revoke",
}  # fmt: skip
SETTLED = {
    "succeeded", "failed", "timed_out", "expired", "cancelled", "rolled_back", "superseded",
    "revoked",
}  # fmt: skip
ABSORBING = {"failed", "rolled_back", "superseded", "revoked"}
# The only ways out of a settled state docs/fleet.md allows: an abort or a newer rollout after
# success; late reports reviving a timed-out or expired device; a device that switched before
# it heard the abort; the device's revocation.
SPEC_EXITS: set[tuple[str, str]] = {
    ("succeeded", "abort"),
    ("succeeded", "supersede"),
    ("succeeded", "revoke"),
    *(("timed_out", e) for e in [*LATE_REPORTS, "abort", "supersede", "revoke"]),
    *(("expired", e) for e in [*LATE_REPORTS, "abort", "supersede", "revoke"]),
    ("cancelled", "activated"),
    ("cancelled", "revoke"),
}
ILLEGAL = [
    (s, e) for s, e in itertools.product(sorted(STATES), sorted(EVENTS)) if (s, e) not in EXPECTED
]


class TestDeviceTransitionTable:
    def test_table_is_the_diagram(self) -> None:
        """The table holds exactly the diagram's arrows over exactly the declared states."""
        assert {s.value for s in DeviceState} == STATES
        assert {e.value for e in DeviceEvent} == EVENTS
        assert {(s.value, e.value): t.value for (s, e), t in TRANSITIONS.items()} == EXPECTED
        assert INITIAL is DeviceState.WAITING

    @pytest.mark.parametrize(("state", "event"), sorted(EXPECTED))
    def test_declared_row_moves_the_device(self, state: str, event: str) -> None:
        """Each declared (state, event) row leads where the diagram says."""
        assert next_device_state(DeviceState(state), DeviceEvent(event)) == EXPECTED[state, event]

    @pytest.mark.parametrize(("state", "event"), ILLEGAL)
    def test_undeclared_pair_raises_and_changes_nothing(self, state: str, event: str) -> None:
        """Every pair the diagram does not draw raises a typed error and keeps the state."""
        current = DeviceState(state)
        with pytest.raises(IllegalTransition) as refused:
            current = next_device_state(current, DeviceEvent(event))
        assert current == state
        assert refused.value.state == state
        assert refused.value.event == event
        assert refused.value.allowed == allowed_events(DeviceState(state))
        assert f"state {state} cannot take {event}" in str(refused.value)

    def test_illegal_transition_is_not_the_operators_fault(self) -> None:
        """A refused device event is a control error, never an operator's 4xx."""
        assert issubclass(IllegalTransition, ControlError)
        assert not issubclass(IllegalTransition, RequestError)
        assert IllegalTransition.code == "illegal_device_transition"

    @pytest.mark.parametrize("state", sorted(STATES))
    def test_allowed_events_are_the_rows_of_a_state(self, state: str) -> None:
        """allowed_events lists the events a state's rows take, no more, no less."""
        expected = {e for (s, e) in EXPECTED if s == state}
        assert {e.value for e in allowed_events(DeviceState(state))} == expected


class TestDeviceStateSets:
    def test_final_and_closed_states(self) -> None:
        """Final states end a device's part in its wave; closed ones take no event at all."""
        assert {s.value for s in FINAL} == SETTLED
        assert {s.value for s in CLOSED} == ABSORBING
        for state in CLOSED:
            assert allowed_events(state) == frozenset()

    def test_final_states_leave_only_by_the_spec_exits(self) -> None:
        """From a settled state the table has exactly the documented exits."""
        exits = {(s.value, e.value) for (s, e) in TRANSITIONS if s in FINAL}
        assert exits == SPEC_EXITS

    def test_gate_categories_partition_the_states(self) -> None:
        """Waiting, in progress, succeeded, failures and not eligible cover each state once."""
        groups = [
            {DeviceState.WAITING},
            IN_PROGRESS,
            {DeviceState.SUCCEEDED},
            FAILURES,
            NOT_ELIGIBLE,
        ]
        assert sum(len(g) for g in groups) == len(DeviceState)
        assert set().union(*groups) == set(DeviceState)
        assert {s.value for s in IN_PROGRESS} == {"pending", "downloading", "activating"}
        assert {s.value for s in FAILURES} == {"failed", "timed_out"}
        assert {"expired", "superseded", "cancelled", "revoked"} <= {s.value for s in NOT_ELIGIBLE}

    def test_holds_desired_state_is_every_state_issued_and_open(self) -> None:
        """A row holds the rollout's desired state once its wave started and until it closes."""
        expected = {"pending", "downloading", "activating", "succeeded", "timed_out", "expired"}
        assert {s.value for s in HOLDS_DESIRED_STATE} == expected
        for state in HOLDS_DESIRED_STATE:  # each has somewhere to go on abort and supersede
            assert {DeviceEvent.ABORT, DeviceEvent.SUPERSEDE} <= allowed_events(state)


class DeviceMachine(RuleBasedStateMachine):
    """Random events against one device row; the table must agree with the diagram."""

    def __init__(self) -> None:
        super().__init__()
        self.state = INITIAL
        self.closed_at: DeviceState | None = None

    @rule(event=st.sampled_from(DeviceEvent))
    def fire(self, event: DeviceEvent) -> None:
        before = self.state
        expected = EXPECTED.get((before.value, event.value))
        if expected is None:
            with pytest.raises(IllegalTransition):
                self.state = next_device_state(self.state, event)
            assert self.state == before
            return
        self.state = next_device_state(self.state, event)
        assert self.state == expected
        if before.value in SETTLED and self.state != before:
            assert (before.value, event.value) in SPEC_EXITS

    @invariant()
    def stays_in_declared_states(self) -> None:
        assert self.state in set(DeviceState)

    @invariant()
    def closed_states_are_never_left(self) -> None:
        if self.closed_at is not None:
            assert self.state == self.closed_at
        if self.state in CLOSED:
            self.closed_at = self.state


class TestDeviceStateMachine:
    def test_random_event_sequences_follow_the_diagram(self) -> None:
        """Random events move a row as the diagram says, or are refused and change nothing."""
        run_state_machine_as_test(
            DeviceMachine, settings=settings(max_examples=200, stateful_step_count=40)
        )

    @given(events=st.lists(st.sampled_from(DeviceEvent), max_size=60))
    def test_any_sequence_ends_in_a_declared_state(self, events: list[DeviceEvent]) -> None:
        """Folding any event sequence (refusals skipped) never leaves the declared states."""
        state = INITIAL
        for event in events:
            if event in allowed_events(state):
                if state in FINAL:
                    assert (state.value, event.value) in SPEC_EXITS
                state = next_device_state(state, event)
            assert state.value in STATES


SETTINGS = RolloutSettings(device_timeout_s=100, pending_expiry_s=1000)


def clock(
    state: DeviceState, *, online: bool, pending_for: float, silent_for: float
) -> DeviceEvent | None:
    now = 10_000.0
    return due_clock_event(
        state,
        online=online,
        now_s=now,
        pending_since_s=now - pending_for,
        silent_since_s=now - silent_for,
        settings=SETTINGS,
    )


class TestDueClockEvent:
    def test_online_pending_device_times_out_on_silence(self) -> None:
        """A notified (online) pending device silent for device_timeout_s is timed out."""
        assert clock(DeviceState.PENDING, online=True, pending_for=100, silent_for=100) == (
            DeviceEvent.DEVICE_TIMEOUT
        )
        assert clock(DeviceState.PENDING, online=True, pending_for=5000, silent_for=99) is None

    def test_offline_pending_device_expires_and_never_times_out(self) -> None:
        """An offline pending device is not a failure: it expires after pending_expiry_s."""
        assert clock(DeviceState.PENDING, online=False, pending_for=999, silent_for=999) is None
        assert clock(DeviceState.PENDING, online=False, pending_for=1000, silent_for=0) == (
            DeviceEvent.PENDING_EXPIRED
        )

    @pytest.mark.parametrize("state", [DeviceState.DOWNLOADING, DeviceState.ACTIVATING])
    @pytest.mark.parametrize("online", [True, False])
    def test_started_device_times_out_online_or_not(self, state: DeviceState, online: bool) -> None:
        """A device silent mid-install times out even offline, so it cannot hold its wave."""
        assert clock(state, online=online, pending_for=0, silent_for=99) is None
        assert clock(state, online=online, pending_for=0, silent_for=100) == (
            DeviceEvent.DEVICE_TIMEOUT
        )

    @pytest.mark.parametrize(
        "state", sorted(set(DeviceState) - {DeviceState.PENDING, *IN_PROGRESS})
    )
    def test_other_states_have_no_clock(self, state: DeviceState) -> None:
        """Waiting and settled rows never get a clock event, however long they wait."""
        for online in (True, False):
            assert clock(state, online=online, pending_for=10**6, silent_for=10**6) is None

    @given(
        state=st.sampled_from(DeviceState),
        online=st.booleans(),
        pending_for=st.floats(0, 10**6),
        silent_for=st.floats(0, 10**6),
    )
    def test_a_due_event_is_always_legal(
        self, state: DeviceState, online: bool, pending_for: float, silent_for: float
    ) -> None:
        """Whatever the clock says is due, the row's state takes it."""
        event = clock(state, online=online, pending_for=pending_for, silent_for=silent_for)
        assert event is None or event in allowed_events(state)
