"""Each body type: strict from_json, to_json, and the round trip between them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given

from edgelm_protocol import (
    Ack,
    Announce,
    Event,
    EventKind,
    Health,
    JobError,
    JobOutcome,
    JobResult,
    MalformedMessage,
    ModelRef,
    Presence,
    PresenceStatus,
    Progress,
    RemoteJob,
    ReportedState,
    Telemetry,
)
from edgelm_protocol.bodies import Percentiles
from tests.unit.protocol import strategies

SHA = "ab" * 32
JOB_ID = "7f0c9a3e5b2d4c1a9e8f7a6b5c4d3e2f"


def refused(body_class: Any, value: object) -> MalformedMessage:
    """The MalformedMessage ``body_class.from_json(value)`` raises."""
    with pytest.raises(MalformedMessage) as caught:
        body_class.from_json(value)
    return caught.value


class TestPresence:
    @given(body=strategies.presences)
    def test_round_trip(self, body: Presence) -> None:
        """from_json(to_json(x)) == x."""
        assert Presence.from_json(body.to_json()) == body

    def test_wire_form(self) -> None:
        """The JSON has exactly the keys and values docs/protocol.md lists."""
        body = Presence(status=PresenceStatus.OFFLINE, agent_version="0.1.0")
        assert body.to_json() == {"status": "offline", "agent_version": "0.1.0"}

    def test_unknown_status_is_refused(self) -> None:
        """Only online and offline exist."""
        error = refused(Presence, {"status": "away", "agent_version": "0.1.0"})
        assert error.field == "body.status"
        assert "online, offline" in error.reason


class TestModelRef:
    def test_key_is_name_at_version(self) -> None:
        """Events and telemetry name a model as name@version."""
        assert ModelRef("smollm2", "1.0", SHA).key == "smollm2@1.0"

    @pytest.mark.parametrize(
        ("field", "value"), [("sha256", "AB" * 32), ("sha256", "ab" * 31), ("name", "../x")]
    )
    def test_bad_fields_are_refused_by_path(self, field: str, value: str) -> None:
        """Upper-case or short digests and unsafe names are refused, naming the field."""
        json = {"name": "smollm2", "version": "1.0", "sha256": SHA, field: value}
        with pytest.raises(MalformedMessage) as caught:
            ModelRef.from_json(json, "body.active")
        assert caught.value.field == f"body.active.{field}"


def state_json(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "active": {"name": "smollm2", "version": "1.0", "sha256": SHA},
        "previous": None,
        "installed": [{"name": "smollm2", "version": "1.0", "sha256": SHA}],
        "hardware_class": "rpi5-8g",
        "labels": {"site": "berlin"},
        "ram_bytes": 8 * 2**30,
        "accelerator": "none",
        "disk_free_bytes": 10**10,
        "desired_sequence": 0,
    }
    value.update(changes)
    return value


class TestReportedState:
    @given(body=strategies.reported_states)
    def test_round_trip(self, body: ReportedState) -> None:
        """from_json(to_json(x)) == x."""
        assert ReportedState.from_json(body.to_json()) == body

    def test_reads_the_spec_example(self) -> None:
        """A state as docs/protocol.md describes it is read into values."""
        body = ReportedState.from_json(state_json())
        assert body.active == ModelRef("smollm2", "1.0", SHA)
        assert body.installed == (ModelRef("smollm2", "1.0", SHA),)
        assert dict(body.labels) == {"site": "berlin"}

    def test_labels_cannot_be_changed(self) -> None:
        """A read state is immutable down to its labels."""
        body = ReportedState.from_json(state_json())
        with pytest.raises(TypeError):
            body.labels["site"] = "paris"  # type: ignore[index]

    def test_installed_item_errors_name_the_index(self) -> None:
        """A bad model in the installed list is reported by index."""
        bad = {"name": "smollm2", "version": "1.0", "sha256": "x"}
        error = refused(ReportedState, state_json(installed=[bad]))
        assert error.field == "body.installed[0].sha256"

    @pytest.mark.parametrize(
        ("labels", "field"),
        [({"bad key": "x"}, "body.labels['bad key']"), ({"site": 3}, "body.labels.site")],
    )
    def test_labels_are_string_pairs_with_id_keys(self, labels: object, field: str) -> None:
        """Label keys use the id alphabet and values are strings."""
        assert refused(ReportedState, state_json(labels=labels)).field == field

    def test_boolean_sizes_are_refused(self) -> None:
        """ram_bytes: true is not an integer."""
        assert refused(ReportedState, state_json(ram_bytes=True)).field == "body.ram_bytes"


def telemetry_json(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "window_s": 60,
        "model": "smollm2@1.0",
        "requests": 10,
        "errors": 0,
        "tokens_per_s": {"p50": 140.5, "p90": None},
        "ttft_ms": {"p50": 12, "p90": 30},
        "queue_depth": 0,
        "cpu_percent": 55.0,
        "memory_bytes": 10**8,
        "memory_total_bytes": None,
        "disk_free_bytes": None,
        "temperature_c": -5.5,
    }
    value.update(changes)
    return value


class TestTelemetry:
    @given(body=strategies.telemetries)
    def test_round_trip(self, body: Telemetry) -> None:
        """from_json(to_json(x)) == x."""
        assert Telemetry.from_json(body.to_json()) == body

    def test_percentiles_may_be_null(self) -> None:
        """A window without samples reports null percentiles."""
        body = Telemetry.from_json(telemetry_json())
        assert body.tokens_per_s == Percentiles(p50=140.5, p90=None)
        assert body.ttft_ms == Percentiles(p50=12.0, p90=30.0)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"window_s": 0}, "body.window_s"),
            ({"tokens_per_s": {"p50": -1, "p90": None}}, "body.tokens_per_s.p50"),
            ({"ttft_ms": {"p50": 1}}, "body.ttft_ms.p90"),
            ({"temperature_c": -300}, "body.temperature_c"),
            ({"model": "smollm2"}, "body.model"),
            ({"requests": 1.5}, "body.requests"),
        ],
    )
    def test_out_of_range_values_are_refused_by_path(
        self, changes: dict[str, object], field: str
    ) -> None:
        """Zero windows, negative rates, missing percentiles, impossible temperatures fail."""
        assert refused(Telemetry, telemetry_json(**changes)).field == field


def event_json(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "seq": 7,
        "kind": "activated",
        "model": "smollm2@1.0",
        "desired_sequence": 42,
        "rollout": "ro-3f2a",
        "reason": None,
        "health": {"tokens_per_s": 140.0, "ttft_ms": 11.5},
        "progress": None,
    }
    value.update(changes)
    return value


class TestEvent:
    @given(body=strategies.events)
    def test_round_trip(self, body: Event) -> None:
        """from_json(to_json(x)) == x."""
        assert Event.from_json(body.to_json()) == body

    def test_every_spec_kind_exists(self) -> None:
        """The twelve event kinds of docs/protocol.md, and only those."""
        assert {kind.value for kind in EventKind} == {
            "desired_accepted", "desired_rejected", "download_started", "download_progress",
            "download_retrying", "installed", "install_failed", "install_cancelled",
            "activated", "activation_failed", "rolled_back", "deactivated",
        }  # fmt: skip

    def test_reads_health(self) -> None:
        """An activation carries the health check's measurements."""
        body = Event.from_json(event_json())
        assert body.health == Health(tokens_per_s=140.0, ttft_ms=11.5)
        assert body.kind is EventKind.ACTIVATED

    def test_health_errors_name_the_nested_field(self) -> None:
        """body.health.tokens_per_s is named when it is wrong."""
        health = {"tokens_per_s": True, "ttft_ms": None}
        assert refused(Event, event_json(health=health)).field == "body.health.tokens_per_s"

    def test_progress_cannot_pass_its_total(self) -> None:
        """done_bytes above total_bytes is refused."""
        progress = {"done_bytes": 11, "total_bytes": 10}
        assert refused(Event, event_json(progress=progress)).field == "body.progress.done_bytes"
        done = Event.from_json(event_json(progress={"done_bytes": 10, "total_bytes": 10}))
        assert done.progress == Progress(done_bytes=10, total_bytes=10)

    def test_reason_is_prose_without_nul(self) -> None:
        """A reason may span lines but may not hold NUL."""
        assert Event.from_json(event_json(reason="a\nb")).reason == "a\nb"
        assert refused(Event, event_json(reason="a\x00")).field == "body.reason"

    def test_rollout_ids_are_checked(self) -> None:
        """A rollout id with a wildcard is refused."""
        assert refused(Event, event_json(rollout="ro/+")).field == "body.rollout"


def result_json(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "job_id": JOB_ID,
        "state": "failed",
        "metadata": {"ticket": 5},
        "result": None,
        "error": {"code": "model_not_found", "message": "no model", "param": "model"},
    }
    value.update(changes)
    return value


class TestJobResult:
    @given(body=strategies.job_results)
    def test_round_trip(self, body: JobResult) -> None:
        """from_json(to_json(x)) == x."""
        assert JobResult.from_json(body.to_json()) == body

    def test_error_keeps_extra_keys(self) -> None:
        """The error object is code, message and whatever else the agent adds."""
        body = JobResult.from_json(result_json())
        assert body.state is JobOutcome.FAILED
        assert body.error == JobError("model_not_found", "no model", {"param": "model"})
        assert body.to_json() == result_json()

    def test_error_needs_code_and_message(self) -> None:
        """An error without a message is refused."""
        error = refused(JobResult, result_json(error={"code": "x"}))
        assert error.field == "body.error.message"

    def test_job_id_is_a_message_id_or_a_device_job_id(self) -> None:
        """job_id is a fleet job's 32-hex envelope id, or a device's own job id."""
        assert refused(JobResult, result_json(job_id="job-1")).field == "body.job_id"
        assert refused(JobResult, result_json(job_id="x" * 32)).field == "body.job_id"
        local = "job-" + "ab" * 12
        assert JobResult.from_json(result_json(job_id=local)).job_id == local

    def test_unknown_state_is_refused(self) -> None:
        """Only final states are results; running is not one."""
        assert refused(JobResult, result_json(state="running")).field == "body.state"


def job_json(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "request": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
        "priority": 0,
        "ttl_s": None,
        "metadata": None,
        "max_attempts": 3,
        "wait_for_model": False,
    }
    value.update(changes)
    return value


class TestRemoteJob:
    @given(body=strategies.remote_jobs)
    def test_round_trip(self, body: RemoteJob) -> None:
        """from_json(to_json(x)) == x."""
        assert RemoteJob.from_json(body.to_json()) == body

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"priority": 101}, "body.priority"),
            ({"priority": -101}, "body.priority"),
            ({"max_attempts": 0}, "body.max_attempts"),
            ({"max_attempts": 11}, "body.max_attempts"),
            ({"ttl_s": 0}, "body.ttl_s"),
            ({"wait_for_model": 1}, "body.wait_for_model"),
            ({"request": []}, "body.request"),
        ],
    )
    def test_ranges_from_the_spec(self, changes: dict[str, object], field: str) -> None:
        """priority -100..100, max_attempts 1..10, a positive TTL, a real bool, an object."""
        assert refused(RemoteJob, job_json(**changes)).field == field

    def test_request_is_kept_as_json(self) -> None:
        """The OpenAI body passes through untouched for the agent's API to validate."""
        body = RemoteJob.from_json(job_json())
        assert body.request == job_json()["request"]

    def test_reading_does_not_change_the_input(self) -> None:
        """from_json leaves its argument as it was."""
        value = job_json()
        before = copy.deepcopy(value)
        RemoteJob.from_json(value)
        assert value == before


class TestAck:
    @given(body=strategies.acks)
    def test_round_trip(self, body: Ack) -> None:
        """from_json(to_json(x)) == x."""
        assert Ack.from_json(body.to_json()) == body

    def test_between_one_and_a_thousand_ids(self) -> None:
        """An empty ack and an ack of 1001 ids are refused."""
        assert refused(Ack, {"ids": []}).field == "body.ids"
        assert refused(Ack, {"ids": [JOB_ID] * 1001}).field == "body.ids"
        assert len(Ack.from_json({"ids": [JOB_ID] * 1000}).ids) == 1000

    def test_ids_are_message_ids(self) -> None:
        """Each id is checked and named by index."""
        assert refused(Ack, {"ids": [JOB_ID, "nope"]}).field == "body.ids[1]"


class TestAnnounce:
    @given(body=strategies.announces)
    def test_round_trip(self, body: Announce) -> None:
        """from_json(to_json(x)) == x."""
        assert Announce.from_json(body.to_json()) == body

    def test_version_starts_at_one(self) -> None:
        """TUF versions start at 1."""
        assert refused(Announce, {"timestamp_version": 0}).field == "body.timestamp_version"
