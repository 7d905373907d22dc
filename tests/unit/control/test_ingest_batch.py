"""Accepted messages into rows (``fleet/batch.py``) and device rows merged with reports
(``store/devices.merge_report``): both pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.fleet.batch import Accepted, build_batch
from edgelm_control.store.devices import DeviceReport, merge_report, new_record
from edgelm_protocol import (
    Event,
    EventKind,
    Health,
    JobError,
    JobOutcome,
    JobResult,
    ModelRef,
    Percentiles,
    Presence,
    PresenceStatus,
    ReportedState,
    Telemetry,
    new_envelope,
)

ON = PresenceStatus.ONLINE
OFF = PresenceStatus.OFFLINE


def accepted(device: str, body: object) -> Accepted:
    return Accepted(device, new_envelope(body, sender=device, ts_ms=5))  # type: ignore[arg-type]


def state(labels: dict[str, str] | None = None, hardware_class: str = "pi5") -> ReportedState:
    return ReportedState(
        active=ModelRef("m", "1", "a" * 64),
        previous=None,
        installed=(),
        hardware_class=hardware_class,
        labels=labels or {},
        ram_bytes=1,
        accelerator="none",
        disk_free_bytes=1,
        desired_sequence=4,
    )


TELEMETRY = Telemetry(
    window_s=10.0,
    model="m@1",
    requests=3,
    errors=1,
    tokens_per_s=Percentiles(40.0, 50.0),
    ttft_ms=Percentiles(None, None),
    queue_depth=2,
    cpu_percent=None,
    memory_bytes=None,
    memory_total_bytes=None,
    disk_free_bytes=None,
    temperature_c=None,
)


class TestBuildBatch:
    def test_each_type_goes_to_its_rows_and_durable_ones_are_acked(self):
        """Telemetry, events and results become rows; events and results are the acks."""
        event = accepted(
            "d1", Event(seq=1, kind=EventKind.ACTIVATED, model="m@1", health=Health(9.0, None))
        )
        result = accepted(
            "d1",
            JobResult(job_id="f" * 32, state=JobOutcome.FAILED, error=JobError("boom", "no")),
        )
        batch = build_batch(
            [accepted("d1", TELEMETRY), event, result, accepted("d2", Presence(ON, "1"))], 100
        )
        assert [(r["device_id"], r["tokens_per_s_p50"]) for r in batch.telemetry] == [("d1", 40.0)]
        assert [(r["kind"], r["health_tokens_per_s"]) for r in batch.events] == [("activated", 9.0)]
        assert batch.results[0]["error"] == '{"code":"boom","message":"no"}'
        assert batch.acks == {"d1": [event.envelope.id, result.envelope.id]}
        assert {r.device_id for r in batch.reports} == {"d1", "d2"}

    def test_presences_keep_their_order_and_the_last_state_wins(self):
        """A reconnect inside one batch reads offline then online; only the newest state counts."""
        items = [
            accepted("d1", Presence(OFF, "1")),
            accepted("d1", state({"site": "a"})),
            accepted("d1", Presence(ON, "2")),
            accepted("d1", state({"site": "b"})),
        ]
        (report,) = build_batch(items, 100).reports
        assert report.presences == ((OFF, "1"), (ON, "2"))
        assert report.state is not None
        assert dict(report.state.labels) == {"site": "b"}


class TestMergeReport:
    def test_a_new_device_is_created_and_counts_as_changed_facts(self):
        """The first report creates the row; a new device may be a late joiner."""
        record, change = merge_report(None, DeviceReport("d1", 5, ((ON, "1"),), state()), 10)
        assert change.created
        assert change.came_online
        assert change.facts_changed
        assert (record.presence, record.online_since_ms, record.active_model) == (
            "online",
            10,
            "m@1",
        )

    def test_only_a_class_or_label_change_counts_as_changed_facts(self):
        """The same state again changes no facts; a new label does."""
        record, _ = merge_report(None, DeviceReport("d1", 1, (), state({"a": "1"})), 1)
        _, same = merge_report(record, DeviceReport("d1", 2, (), state({"a": "1"})), 2)
        _, moved = merge_report(record, DeviceReport("d1", 2, (), state({"a": "2"})), 2)
        _, reclassed = merge_report(record, DeviceReport("d1", 2, (), state({"a": "1"}, "x86")), 2)
        assert not same.facts_changed
        assert moved.facts_changed
        assert reclassed.facts_changed

    @given(
        st.lists(st.lists(st.sampled_from([ON, OFF]), max_size=4), min_size=1, max_size=6),
    )
    def test_presence_is_the_last_status_heard(self, batches: list[list[PresenceStatus]]):
        """Whatever the sequence of batches, presence is the last status, last_seen only grows,
        and online_since is set exactly when the device was last heard coming online."""
        record = new_record("d1", 0)
        last_status = None
        for now, statuses in enumerate(batches, start=1):
            report = DeviceReport("d1", now, tuple((s, "1") for s in statuses))
            record, change = merge_report(record, report, now)
            if statuses:
                last_status = statuses[-1]
                assert change.came_online == (statuses[-1] is ON)
            assert record.last_seen_ms == now
        expected = "unknown" if last_status is None else str(last_status)
        assert record.presence == expected
        if last_status is ON:
            assert record.online_since_ms is not None
