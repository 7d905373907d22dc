"""What a revocation means to the pure parts: an ingest batch without the revoked devices, the
remote job rows it cancels, and the wave gates that leave a revoked device out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.fleet.batch import Accepted, IngestBatch, build_batch
from edgelm_control.jobs.states import (
    CANCELLABLE,
    FINAL,
    IllegalJobTransition,
    JobDeviceEvent,
    JobDeviceState,
    next_job_state,
)
from edgelm_control.rollouts.device_states import (
    CLOSED,
    NOT_ELIGIBLE,
    DeviceEvent,
    DeviceState,
    allowed_events,
    next_device_state,
)
from edgelm_control.rollouts.gates import GateCode, Verdict, WaveDevice, evaluate_wave
from edgelm_control.rollouts.settings import RolloutSettings
from edgelm_protocol import (
    Event,
    EventKind,
    JobOutcome,
    JobResult,
    Percentiles,
    Presence,
    PresenceStatus,
    Telemetry,
    new_envelope,
)

TELEMETRY = Telemetry(
    window_s=10.0,
    model=None,
    requests=1,
    errors=0,
    tokens_per_s=Percentiles(None, None),
    ttft_ms=Percentiles(None, None),
    queue_depth=0,
    cpu_percent=None,
    memory_bytes=None,
    memory_total_bytes=None,
    disk_free_bytes=None,
    temperature_c=None,
)
BODIES = (
    TELEMETRY,
    Presence(PresenceStatus.ONLINE, "1.0"),
    Event(seq=1, kind=EventKind.INSTALLED),
    JobResult(job_id="f" * 32, state=JobOutcome.SUCCEEDED),
)
DEVICES = ("d1", "d2", "d3")


def accepted(device: str, body: object) -> Accepted:
    return Accepted(device, new_envelope(body, sender=device, ts_ms=5))  # type: ignore[arg-type]


def devices_in(batch: IngestBatch) -> set[str]:
    """Every device any row, report or ack of the batch names."""
    found: set[str] = set()
    for name in ("telemetry", "events", "results"):
        found |= {row["device_id"] for row in getattr(batch, name)}
    found |= {report.device_id for report in batch.reports}
    return found | set(batch.acks)


class TestBatchWithout:
    @given(
        items=st.lists(
            st.tuples(st.sampled_from(DEVICES), st.sampled_from(BODIES)), min_size=1, max_size=20
        ),
        revoked=st.frozensets(st.sampled_from(DEVICES)),
    )
    def test_only_the_revoked_devices_rows_go(
        self, items: list[tuple[str, object]], revoked: frozenset[str]
    ) -> None:
        """Every row, report and ack of a revoked device goes; everything else stays as built."""
        batch = build_batch([accepted(d, b) for d, b in items], 100)
        kept = batch.without(revoked)
        assert batch.devices == {d for d, _ in items}
        assert kept.devices == batch.devices - revoked
        assert devices_in(kept) == devices_in(batch) - revoked
        for name in ("telemetry", "events", "results"):
            expected = [r for r in getattr(batch, name) if r["device_id"] not in revoked]
            assert getattr(kept, name) == expected, name
        assert [r for r in batch.reports if r.device_id not in revoked] == kept.reports
        assert {d: a for d, a in batch.acks.items() if d not in revoked} == kept.acks

    def test_a_batch_without_revoked_devices_is_the_same_batch(self) -> None:
        """Nothing to drop: the batch itself comes back, and it was never changed."""
        batch = build_batch([accepted("d1", TELEMETRY)], 100)
        assert batch.without(frozenset({"d9"})) is batch
        assert batch.without(frozenset({"d1"})).telemetry == []
        assert len(batch.telemetry) == 1


class TestJobCancel:
    @pytest.mark.parametrize("state", [JobDeviceState.QUEUED, JobDeviceState.SENT])
    def test_a_row_without_a_result_is_cancelled(self, state: JobDeviceState) -> None:
        """queued and sent rows take cancel, to cancelled."""
        assert next_job_state(state, JobDeviceEvent.CANCEL) is JobDeviceState.CANCELLED
        assert state in CANCELLABLE

    @pytest.mark.parametrize("state", sorted(FINAL))
    def test_a_finished_row_keeps_its_outcome(self, state: JobDeviceState) -> None:
        """A row with a result takes no cancel: the answer the device gave stands."""
        with pytest.raises(IllegalJobTransition):
            next_job_state(state, JobDeviceEvent.CANCEL)
        assert state not in CANCELLABLE


class TestRevokedRows:
    @pytest.mark.parametrize("state", sorted(set(DeviceState) - CLOSED))
    def test_every_open_row_leaves_on_revoke(self, state: DeviceState) -> None:
        """From any state that is not closed, revoke leads to revoked, which takes nothing."""
        assert next_device_state(state, DeviceEvent.REVOKE) is DeviceState.REVOKED
        assert allowed_events(DeviceState.REVOKED) == frozenset()
        assert DeviceState.REVOKED in NOT_ELIGIBLE

    def test_a_revoked_device_neither_fails_nor_holds_a_wave(self) -> None:
        """A revoked device that was activating leaves the wave to the others: it passes on
        the one success, with one eligible device of two."""
        wave = [
            WaveDevice("d1", DeviceState.REVOKED, online=True),
            WaveDevice("d2", DeviceState.SUCCEEDED, online=True),
        ]
        result = evaluate_wave(wave, RolloutSettings(), canary=False)
        assert (result.verdict, result.code) == (Verdict.PASSED, GateCode.SUCCESS_THRESHOLD_MET)
        assert (result.tally.devices, result.tally.eligible, result.tally.failures) == (2, 1, 0)

    def test_a_canary_of_revoked_devices_has_no_success_and_fails(self) -> None:
        """Revoking the whole canary leaves nothing to vouch for the model: it fails."""
        wave = [WaveDevice("d1", DeviceState.REVOKED, online=False)]
        result = evaluate_wave(wave, RolloutSettings(), canary=True)
        assert (result.verdict, result.code) == (Verdict.FAILED, GateCode.NO_CANARY_REPORTED)
