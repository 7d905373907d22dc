"""What a device's report means for its rollout row (``rollouts/reports.py``)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.rollouts.device_states import (
    TRANSITIONS,
    DeviceEvent,
    DeviceState,
    allowed_events,
)
from edgelm_control.rollouts.reports import (
    REPORT_EVENTS,
    Report,
    RowFacts,
    device_event_for,
    state_means_rolled_back,
)
from edgelm_protocol import EventKind

K = EventKind
E = DeviceEvent
S = DeviceState
NEW = "m@2"
OLD = "m@1"


def row(state: S = S.PENDING, *, abort: int | None = None, desired: int = 10) -> RowFacts:
    return RowFacts(
        state=state, model=NEW, previous_model=OLD, desired_sequence=desired, abort_sequence=abort
    )


EXPECTED = {
    "desired_accepted": "download_started",
    "download_started": "download_started",
    "download_progress": "download_started",
    "installed": "installed",
    "install_failed": "install_failed",
    "desired_rejected": "install_failed",
    "activated": "activated",
    "activation_failed": "activation_failed",
    "install_cancelled": None,
    "rolled_back": None,
    "deactivated": None,
    "download_retrying": None,  # a retry is not progress: the device timeout keeps running
}


class TestReportEvents:
    @pytest.mark.parametrize(("kind", "expected"), sorted(EXPECTED.items()))
    def test_each_report_about_the_new_model_maps_as_the_table_says(
        self, kind: str, expected: str | None
    ):
        """Every event kind of the protocol has its row event (or none), as documented."""
        got = device_event_for(row(), Report(K(kind), NEW, 10))
        assert (None if got is None else str(got)) == expected

    def test_the_table_covers_every_event_kind(self):
        """No event kind is forgotten: mapped, or deliberately meaning nothing."""
        assert set(EXPECTED) == {str(k) for k in EventKind}
        assert {str(k) for k in REPORT_EVENTS} == {k for k, v in EXPECTED.items() if v}

    def test_a_report_about_another_model_means_nothing(self):
        """A straggler about the model the device ran before is not about this row."""
        assert device_event_for(row(), Report(K.ACTIVATED, OLD, 10)) is None

    def test_a_report_about_an_older_desired_state_means_nothing(self):
        """A report for a sequence before the row's own is from an earlier assignment."""
        assert device_event_for(row(desired=10), Report(K.ACTIVATED, NEW, 9)) is None

    def test_a_report_without_model_or_sequence_is_taken_at_its_word(self):
        """A desired_rejected that names no model still fails the row it reached."""
        assert device_event_for(row(), Report(K.DESIRED_REJECTED, None, None)) is E.INSTALL_FAILED


class TestRollbackReports:
    def test_running_the_previous_model_after_the_abort_is_rolled_back(self):
        """activated (or rolled_back) naming the previous model, at or after the abort's
        desired state, completes a rollback."""
        waiting = row(S.ROLLING_BACK, abort=20)
        for kind in (K.ACTIVATED, K.ROLLED_BACK):
            assert device_event_for(waiting, Report(kind, OLD, 20)) is E.ROLLED_BACK
            assert device_event_for(waiting, Report(kind, OLD, 21)) is E.ROLLED_BACK

    def test_a_report_of_the_previous_model_before_the_abort_is_not_a_rollback(self):
        """An older report of the old model (before the abort's sequence) proves nothing."""
        assert device_event_for(row(S.ROLLING_BACK, abort=20), Report(K.ACTIVATED, OLD, 19)) is None

    def test_a_late_activation_of_the_new_model_keeps_the_row_waiting(self):
        """The new model activating after the abort is the table's rolling_back loop."""
        got = device_event_for(row(S.ROLLING_BACK, abort=20), Report(K.ACTIVATED, NEW, 10))
        assert got is E.ACTIVATED
        assert TRANSITIONS[(S.ROLLING_BACK, got)] is S.ROLLING_BACK

    def test_a_reported_state_shows_a_rollback_done(self):
        """The device's retained state with the previous model active and a sequence at or
        after the abort's says the same as the event would."""
        waiting = row(S.ROLLING_BACK, abort=20)
        assert state_means_rolled_back(waiting, active_model=OLD, applied_sequence=20)
        assert not state_means_rolled_back(waiting, active_model=OLD, applied_sequence=19)
        assert not state_means_rolled_back(waiting, active_model=NEW, applied_sequence=25)
        assert not state_means_rolled_back(row(S.SUCCEEDED, abort=20), active_model=OLD,
                                           applied_sequence=25)  # fmt: skip

    def test_after_a_release_anything_but_the_rollouts_model_is_rolled_back(self):
        """A released device runs nothing, or a model of its own that the row never saw
        (imported locally before the wave): either way the rollout's model is gone."""
        released = dataclasses.replace(row(S.ROLLING_BACK, abort=20), previous_model=None,
                                       released=True)  # fmt: skip
        assert state_means_rolled_back(released, active_model=None, applied_sequence=20)
        assert state_means_rolled_back(released, active_model="local@1", applied_sequence=20)
        assert not state_means_rolled_back(released, active_model=NEW, applied_sequence=25)
        assert not state_means_rolled_back(released, active_model=None, applied_sequence=19)


@given(
    state=st.sampled_from(list(DeviceState)),
    kind=st.sampled_from(list(EventKind)),
    model=st.sampled_from([NEW, OLD, None]),
    sequence=st.one_of(st.none(), st.integers(0, 30)),
    abort=st.one_of(st.none(), st.integers(11, 25)),
)
def test_a_mapped_event_is_always_one_the_table_knows(
    state: DeviceState, kind: EventKind, model: str | None, sequence: int | None, abort: int | None
):
    """Whatever comes in, the mapping yields None or a report event of the table's alphabet
    (never a clock or operator event), so the engine's legality check is all that remains."""
    got = device_event_for(row(state, abort=abort), Report(kind, model, sequence))
    operator_or_clock = {E.WAVE_STARTED, E.DEVICE_TIMEOUT, E.PENDING_EXPIRED, E.ABORT, E.SUPERSEDE}
    assert got is None or got not in operator_or_clock
    if got is not None and got in allowed_events(state):
        assert (state, got) in TRANSITIONS
