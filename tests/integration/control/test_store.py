"""The store on SQLite and on PostgreSQL: migrations, each table's queries, compare-and-set.

Every test runs once per database (the ``db_url`` fixture), against a real server or file.
"""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from edgelm_control.jobs.states import JobDeviceState
from edgelm_control.rollouts.device_states import DeviceState
from edgelm_control.rollouts.gates import HealthFigures
from edgelm_control.rollouts.rollout_states import RolloutState
from edgelm_control.rollouts.settings import RolloutSettings
from edgelm_control.store import Store
from edgelm_control.store.desired import (
    expiring,
    get_desired,
    mark_current_unpublished,
    mark_published,
    next_sequence,
    record_desired,
    unpublished,
)
from edgelm_control.store.devices import (
    DeviceFilter,
    DeviceReport,
    apply_reports,
    get_device,
    list_devices,
    register_device,
)
from edgelm_control.store.events import (
    health_samples,
    insert_events,
    mark_processed,
    prune_events,
    unprocessed,
)
from edgelm_control.store.jobs import (
    JobRecord,
    finish,
    get_job,
    insert_job,
    insert_results,
    job_device_rows,
    mark_sent,
    queued,
    results_of,
)
from edgelm_control.store.migrate import current_revision, head_revision
from edgelm_control.store.models import claim_targets_version, list_models, replace_targets
from edgelm_control.store.rollouts import (
    RolloutRecord,
    cas_rollout,
    cas_row,
    get_rollout,
    get_waves,
    insert_rollout,
    insert_rows,
    insert_waves,
    list_rollouts,
    record_verdict,
    rows_of,
    state_counts,
)
from edgelm_control.store.schema import metadata
from edgelm_control.store.telemetry import (
    aggregate_telemetry,
    insert_telemetry,
    prune_telemetry,
    query_telemetry,
)
from edgelm_control.store.tokens import TokenEntry, replace_file_tokens, token_hashes
from edgelm_protocol import ModelRef, PresenceStatus, ReportedState
from edgelm_protocol.targets import parse_model_target
from tests.integration.control.fleet import gguf_custom

SHA = "ab" * 32


def state(**overrides: object) -> ReportedState:
    values: dict[str, object] = {
        "active": ModelRef("smollm2", "1.0", SHA),
        "previous": None,
        "installed": (),
        "hardware_class": "pi5",
        "labels": {"site": "berlin"},
        "ram_bytes": 1,
        "accelerator": "none",
        "disk_free_bytes": 1,
        "desired_sequence": 3,
    } | overrides
    return ReportedState(**values)  # type: ignore[arg-type]


def event_row(message_id: str, device: str = "d1", **overrides: object) -> dict[str, object]:
    return {
        "message_id": message_id,
        "device_id": device,
        "seq": 1,
        "kind": "activated",
        "model": "smollm2@1.0",
        "desired_sequence": 1,
        "rollout_id": "ro-1",
        "reason": None,
        "health_tokens_per_s": 50.0,
        "health_ttft_ms": 100.0,
        "progress_done_bytes": None,
        "progress_total_bytes": None,
        "sent_ms": 1,
        "received_ms": 1000,
        "processed_ms": None,
    } | overrides


def telemetry_row(
    device: str, received_ms: int, model: str = "m@1", tps: float = 10.0
) -> dict[str, object]:
    return {
        "device_id": device,
        "received_ms": received_ms,
        "sent_ms": received_ms,
        "window_s": 10.0,
        "model": model,
        "requests": 2,
        "errors": 1,
        "tokens_per_s_p50": tps,
        "tokens_per_s_p90": tps,
        "ttft_ms_p50": 100.0,
        "ttft_ms_p90": 200.0,
        "queue_depth": 0,
        "cpu_percent": None,
        "memory_bytes": None,
        "memory_total_bytes": None,
        "disk_free_bytes": None,
        "temperature_c": None,
    }


def rollout(rollout_id: str = "ro-1", created_ms: int = 1) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=rollout_id,
        model="smollm2@1.1",
        target_path="models/smollm2/1.1/model.gguf",
        target_length=10,
        target_sha256=SHA,
        selector={"all": True},
        settings=RolloutSettings(),
        baselines={"pi5": HealthFigures(50.0, None)},
        state=RolloutState.RUNNING,
        current_wave=0,
        wave_count=2,
        created_ms=created_ms,
        updated_ms=created_ms,
        ended_ms=None,
    )


class TestMigrations:
    async def test_the_migrated_schema_is_the_schema_module(self, store: Store):
        """The migrations create exactly the tables, columns and indexes the queries use."""

        def diff(connection: Connection) -> list[object]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        async with store.read() as conn:
            differences = await conn.run_sync(diff)
            revision = await conn.run_sync(current_revision)
        assert differences == []
        assert revision == head_revision()

    async def test_opening_again_migrates_nothing_and_keeps_the_data(self, db_url: str):
        """A restart runs the migrations again harmlessly: the rows are still there."""
        first = await Store.open(db_url)
        async with first.write() as conn:
            await register_device(conn, "d1", hardware_class="pi5", labels={}, now_ms=1)
        await first.close()
        second = await Store.open(db_url)
        async with second.read() as conn:
            assert (await get_device(conn, "d1")) is not None
        await second.close()

    async def test_ping_answers_while_the_database_is_there(self, store: Store):
        """``ping`` returns for a reachable database (``/readyz`` relies on it)."""
        await store.ping()
        async with store.read() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


class TestDevices:
    async def test_a_first_report_creates_the_device_online(self, store: Store):
        """A device heard from for the first time appears, online, with what it reported."""
        report = DeviceReport("d1", 5, presences=((PresenceStatus.ONLINE, "1.0"),), state=state())
        async with store.write() as conn:
            (change,) = await apply_reports(conn, [report], now_ms=10)
            device = await get_device(conn, "d1")
        assert change.created
        assert change.came_online
        assert change.facts_changed
        assert device is not None
        assert (device.presence, device.hardware_class, dict(device.labels)) == (
            "online",
            "pi5",
            {"site": "berlin"},
        )
        assert (device.active_model, device.applied_sequence) == ("smollm2@1.0", 3)

    async def test_offline_and_label_changes_are_reported_as_changes(self, store: Store):
        """A will's ``offline`` and a new label each come back as what changed."""
        async with store.write() as conn:
            await apply_reports(
                conn, [DeviceReport("d1", 1, ((PresenceStatus.ONLINE, "1"),), state())], 1
            )
            (offline,) = await apply_reports(
                conn, [DeviceReport("d1", 2, ((PresenceStatus.OFFLINE, "1"),))], 2
            )
            relabelled = state(labels={"site": "paris"})
            (moved,) = await apply_reports(conn, [DeviceReport("d1", 3, (), relabelled)], 3)
            device = await get_device(conn, "d1")
        assert offline.went_offline
        assert not offline.facts_changed
        assert moved.facts_changed
        assert not moved.created
        assert device is not None
        assert device.presence == "offline"

    async def test_registration_never_overrides_what_the_device_reported(self, store: Store):
        """Provisioning's class and labels hold until the device reports its own, then lose."""
        async with store.write() as conn:
            _, first = await register_device(conn, "d1", hardware_class="x86", labels={}, now_ms=1)
            await apply_reports(conn, [DeviceReport("d1", 2, (), state())], 2)
            device, again = await register_device(
                conn, "d1", hardware_class="x86", labels={"a": "b"}, now_ms=3
            )
        assert first.created
        assert not again.created
        assert device.hardware_class == "pi5"

    async def test_listing_filters_by_label_class_and_presence_and_pages(self, store: Store):
        """Filters combine, and pages follow each other by id without gaps or repeats."""
        reports = [
            DeviceReport(
                f"d{i:02}",
                1,
                ((PresenceStatus.ONLINE if i % 2 else PresenceStatus.OFFLINE, "1"),),
                state(labels={"site": "berlin" if i < 6 else "paris"}),
            )
            for i in range(10)
        ]
        async with store.write() as conn:
            await apply_reports(conn, reports, 1)
        async with store.read() as conn:
            berlin_online = await list_devices(
                conn,
                DeviceFilter(labels={"site": "berlin"}, presence="online"),
                after_id=None,
                limit=10,
            )
            first = await list_devices(conn, DeviceFilter(), after_id=None, limit=4)
            second = await list_devices(conn, DeviceFilter(), after_id=first[-1].device_id, limit=4)
        assert [d.device_id for d in berlin_online] == ["d01", "d03", "d05"]
        assert [d.device_id for d in first + second] == [f"d{i:02}" for i in range(8)]


class TestDesiredSequences:
    async def test_sequences_only_grow_and_start_above_what_the_device_applied(self, store: Store):
        """The counter grows by one each time and never falls below the reported floor."""
        async with store.write() as conn:
            first = await next_sequence(conn, "d1", floor=41, now_ms=1)
            second = await next_sequence(conn, "d1", floor=0, now_ms=2)
            third = await next_sequence(conn, "d1", floor=100, now_ms=3)
        assert (first, second, third) == (42, 43, 101)

    async def test_concurrent_issuers_never_get_the_same_sequence(self, store: Store):
        """Eight transactions at once (replicas) each get a different number."""

        async def one() -> int:
            async with store.write() as conn:
                return await next_sequence(conn, "d1", floor=0, now_ms=1)

        got = await asyncio.gather(*(one() for _ in range(8)))
        assert sorted(got) == list(range(1, 9))

    async def test_a_stored_state_is_unpublished_until_marked_and_expiring_finds_it(
        self, store: Store
    ):
        """Publication is tracked per sequence, and near-expiry assignments are found."""
        async with store.write() as conn:
            sequence = await next_sequence(conn, "d1", floor=0, now_ms=1)
            await record_desired(
                conn,
                "d1",
                sequence=sequence,
                rollout_id="ro-1",
                model="m@1",
                target=("models/m/1/model.gguf", 10, SHA),
                issued_at_s=100,
                expires_s=200,
                document='{"doc": 1}',
                now_ms=1,
            )
            pending = await unpublished(conn)
            await mark_published(conn, "d1", sequence)
            after = await unpublished(conn)
            due = await expiring(conn, before_s=150, limit=10)
            later = await expiring(conn, before_s=250, limit=10)
            record = await get_desired(conn, "d1")
        assert [r.device_id for r in pending] == ["d1"]
        assert after == []
        assert due == []
        assert [r.device_id for r in later] == ["d1"]
        assert record is not None
        assert record.published
        assert record.target is not None

    async def test_current_states_are_marked_unpublished_in_batches_by_device_id(
        self, store: Store
    ):
        """After a broker lost its retained messages: every row with a document is marked
        unpublished, a batch at a time in device-id order; a row without one is left alone."""
        async with store.write() as conn:
            for device_id, document in [("c", "{}"), ("a", "{}"), ("b", None), ("d", "{}")]:
                sequence = await next_sequence(conn, device_id, floor=4, now_ms=1)
                await record_desired(
                    conn,
                    device_id,
                    sequence=sequence,
                    rollout_id=None,
                    model=None,
                    target=None,
                    issued_at_s=None,
                    expires_s=None,
                    document=document,
                    now_ms=1,
                )
                await mark_published(conn, device_id, sequence)
            first = await mark_current_unpublished(conn, after_device_id=None, limit=2)
            second = await mark_current_unpublished(conn, after_device_id=first[-1], limit=2)
            third = await mark_current_unpublished(conn, after_device_id=second[-1], limit=2)
            pending = await unpublished(conn)
            untouched = await get_desired(conn, "b")
        assert (first, second, third) == (["a", "c"], ["d"], [])
        assert sorted(r.device_id for r in pending) == ["a", "c", "d"]
        assert {r.sequence for r in pending} == {5}
        assert untouched is not None
        assert untouched.published


class TestEvents:
    async def test_an_event_delivered_twice_is_stored_once(self, store: Store):
        """The second insert of one message id stores nothing and reports nothing new."""
        async with store.write() as conn:
            first = await insert_events(conn, [event_row("a" * 32), event_row("b" * 32)])
            again = await insert_events(conn, [event_row("a" * 32), event_row("a" * 32)])
            count = (await conn.execute(text("SELECT count(*) FROM device_events"))).scalar_one()
        assert first == {"a" * 32, "b" * 32}
        assert again == set()
        assert count == 2

    async def test_an_event_is_marked_processed_once(self, store: Store):
        """Marking is a compare-and-set: a second replica's attempt loses."""
        async with store.write() as conn:
            await insert_events(conn, [event_row("a" * 32)])
            before = await unprocessed(conn, limit=10)
            won = await mark_processed(conn, "a" * 32, 5)
            lost = await mark_processed(conn, "a" * 32, 6)
            after = await unprocessed(conn, limit=10)
        assert [e.message_id for e in before] == ["a" * 32]
        assert (won, lost, after) == (True, False, [])

    async def test_health_samples_carry_the_device_class_and_prune_keeps_unprocessed(
        self, store: Store
    ):
        """Samples join the device's class; pruning leaves events not yet applied."""
        async with store.write() as conn:
            await apply_reports(conn, [DeviceReport("d1", 1, (), state())], 1)
            await insert_events(conn, [event_row("a" * 32), event_row("b" * 32, kind="installed")])
            samples = await health_samples(conn, ["smollm2@1.0"])
            pruned = await prune_events(conn, before_ms=10_000)
        assert [(s.hardware_class, s.tokens_per_s) for s in samples] == [("pi5", 50.0)]
        assert pruned == 0


class TestTelemetry:
    async def test_rows_page_by_id_and_aggregate_by_model_and_class(self, store: Store):
        """Stored rows read back in order, and aggregates give counts and medians."""
        async with store.write() as conn:
            await apply_reports(conn, [DeviceReport("d1", 1, (), state())], 1)
            await insert_telemetry(
                conn,
                [telemetry_row("d1", 1000 + i, tps=float(i)) for i in range(5)]
                + [telemetry_row("d2", 1000, model="other@2")],
            )
        async with store.read() as conn:
            page = await query_telemetry(
                conn, device_id="d1", since_ms=None, until_ms=None, after_id=None, limit=3
            )
            rest = await query_telemetry(
                conn, device_id="d1", since_ms=None, until_ms=None, after_id=page[-1].id, limit=3
            )
            aggregates, truncated = await aggregate_telemetry(
                conn, group_by=["model", "hardware_class"], since_ms=0, until_ms=None
            )
        assert [r.tokens_per_s_p50 for r in page + rest] == [0.0, 1.0, 2.0, 3.0, 4.0]
        by_model = {a.group["model"]: a for a in aggregates}
        assert by_model["m@1"].count == 5
        assert by_model["m@1"].tokens_per_s_p50 == 2.0
        assert by_model["m@1"].group["hardware_class"] == "pi5"
        assert by_model["other@2"].group["hardware_class"] is None
        assert by_model["m@1"].errors == 5
        assert not truncated

    async def test_aggregates_of_one_device(self, store: Store):
        """With a device, the aggregates are of its rows only (the API ignored the filter)."""
        async with store.write() as conn:
            await insert_telemetry(
                conn, [telemetry_row("d1", 1000), telemetry_row("d2", 1000, model="other@2")]
            )
        async with store.read() as conn:
            aggregates, _ = await aggregate_telemetry(
                conn, group_by=["model"], since_ms=0, until_ms=None, device_id="d2"
            )
        assert [(a.group, a.count) for a in aggregates] == [({"model": "other@2"}, 1)]

    async def test_retention_deletes_old_rows_only(self, store: Store):
        """Pruning removes rows received before the cut and keeps the rest."""
        async with store.write() as conn:
            await insert_telemetry(conn, [telemetry_row("d1", t) for t in (1, 2, 10, 11)])
            pruned = await prune_telemetry(conn, before_ms=10)
            left = await query_telemetry(
                conn, device_id=None, since_ms=None, until_ms=None, after_id=None, limit=10
            )
        assert pruned == 2
        assert [r.received_ms for r in left] == [10, 11]


class TestJobs:
    async def test_a_result_delivered_twice_finishes_the_row_once_and_keeps_nul(self, store: Store):
        """A job row moves to its outcome once; a result holding NUL reads back exactly."""
        job = JobRecord("job-1", {"prompt": "hi\u0000"}, {"all": True}, 0, None, 3, None, False, 1)
        result = {
            "message_id": "c" * 32,
            "job_message_id": "a" * 32,
            "device_id": "d1",
            "state": "succeeded",
            "metadata": None,
            "result": '{"text":"a\\u0000b"}',
            "error": None,
            "sent_ms": 1,
            "received_ms": 2,
        }
        async with store.write() as conn:
            await insert_job(conn, job, [("d1", "a" * 32), ("d2", "b" * 32)])
            was_queued = [row.device_id for _, row in await queued(conn, limit=10)]
            sent = await mark_sent(conn, "a" * 32, 5)
            new = await insert_results(conn, [result])
            again = await insert_results(conn, [result])
            finished = await finish(
                conn,
                job_message_id="a" * 32,
                device_id="d1",
                state=JobDeviceState.SUCCEEDED,
                result_message_id="c" * 32,
                now_ms=6,
            )
            twice = await finish(
                conn,
                job_message_id="a" * 32,
                device_id="d1",
                state=JobDeviceState.FAILED,
                result_message_id="c" * 32,
                now_ms=7,
            )
            rows = await job_device_rows(conn, "job-1")
            stored = await results_of(conn, ["c" * 32])
            read_back = await get_job(conn, "job-1")
        assert was_queued == ["d1", "d2"]
        assert sent
        assert (new, again) == ({"c" * 32}, set())
        assert (finished, twice) == ("job-1", None)
        assert [r.state for r in rows] == [JobDeviceState.SUCCEEDED, JobDeviceState.QUEUED]
        assert stored["c" * 32].result == {"text": "a\u0000b"}
        assert read_back is not None
        assert read_back.request == {"prompt": "hi\u0000"}

    async def test_a_device_cannot_finish_another_devices_job(self, store: Store):
        """A result names a job message id; only the device it was sent to can finish it."""
        job = JobRecord("job-1", {}, {"all": True}, 0, None, 3, None, False, 1)
        async with store.write() as conn:
            await insert_job(conn, job, [("d1", "a" * 32)])
            moved = await finish(
                conn,
                job_message_id="a" * 32,
                device_id="d2",
                state=JobDeviceState.SUCCEEDED,
                result_message_id="c" * 32,
                now_ms=1,
            )
        assert moved is None


class TestRollouts:
    async def test_compare_and_set_lets_one_writer_win(self, store: Store):
        """Two writers expecting the same state: the first moves the rollout, the second not."""
        async with store.write() as conn:
            await insert_rollout(conn, rollout())
            first = await cas_rollout(
                conn, "ro-1", expected_state=RolloutState.RUNNING, expected_wave=0, current_wave=1
            )
            second = await cas_rollout(
                conn, "ro-1", expected_state=RolloutState.RUNNING, expected_wave=0, current_wave=1
            )
            loaded = await get_rollout(conn, "ro-1")
        assert (first, second) == (True, False)
        assert loaded is not None
        assert loaded.current_wave == 1
        assert loaded.baselines == {"pi5": HealthFigures(50.0, None)}

    async def test_rows_and_verdicts_move_once(self, store: Store):
        """A row's CAS and a wave's verdict each succeed once; counts follow the rows."""
        from edgelm_control.rollouts.engine import new_row
        from edgelm_control.store.devices import new_record

        async with store.write() as conn:
            await insert_rollout(conn, rollout())
            await insert_waves(conn, "ro-1", 2)
            await insert_rows(
                conn, [new_row("ro-1", new_record(d, 1), 0, None, 1) for d in ("d1", "d2")]
            )
            moved = await cas_row(
                conn, "ro-1", "d1", expected=DeviceState.WAITING, state=DeviceState.PENDING
            )
            stale = await cas_row(
                conn, "ro-1", "d1", expected=DeviceState.WAITING, state=DeviceState.PENDING
            )
            verdict = {"verdict": "passed", "code": "ok", "reason": "ok", "tally": {}, "now_ms": 1}
            first = await record_verdict(conn, "ro-1", 0, **verdict)  # type: ignore[arg-type]
            second = await record_verdict(conn, "ro-1", 0, **verdict)  # type: ignore[arg-type]
            counts = await state_counts(conn, ["ro-1"])
            rows = await rows_of(conn, "ro-1")
            waves = await get_waves(conn, "ro-1")
        assert (moved, stale, first, second) == (True, False, True, False)
        assert counts == {"ro-1": {"pending": 1, "waiting": 1}}
        assert [r.state for r in rows] == [DeviceState.PENDING, DeviceState.WAITING]
        assert [w.verdict for w in waves] == ["passed", None]

    async def test_listing_is_newest_first_and_pages(self, store: Store):
        """Rollouts list newest first; the cursor continues after the last one shown."""
        async with store.write() as conn:
            for i in range(5):
                await insert_rollout(conn, rollout(f"ro-{i}", created_ms=i))
            first = await list_rollouts(conn, state=None, after=None, limit=2)
            rest = await list_rollouts(conn, state=None, after=first[-1].order_key, limit=10)
        assert [r.rollout_id for r in first + rest] == [f"ro-{i}" for i in (4, 3, 2, 1, 0)]


class TestModelsAndTokens:
    async def test_the_targets_version_is_claimed_once(self, store: Store):
        """Two pushes of the same version: the second claim loses."""
        target = parse_model_target(
            "models/m/1/model.gguf", 10, {"sha256": SHA}, gguf_custom("m", "1")
        )
        async with store.write() as conn:
            first = await claim_targets_version(
                conn, expected=None, targets_version=1, timestamp_version=1, now_ms=1
            )
            await replace_targets(conn, [target], targets_version=1, now_ms=1)
            second = await claim_targets_version(
                conn, expected=1, targets_version=2, timestamp_version=2, now_ms=2
            )
            third = await claim_targets_version(
                conn, expected=1, targets_version=2, timestamp_version=2, now_ms=3
            )
            models = await list_models(conn)
            await replace_targets(conn, [], targets_version=2, now_ms=3)
            emptied = await list_models(conn)
        assert (first, second, third) == (True, True, False)
        assert [m.model for m in models] == ["m@1"]
        assert emptied == []

    async def test_file_tokens_are_replaced_as_a_whole(self, store: Store):
        """Loading tokens.json again drops a token that left the file."""
        async with store.write() as conn:
            await replace_file_tokens(
                conn, [TokenEntry("a", "1" * 64, 0), TokenEntry("b", "2" * 64, 0)]
            )
            await replace_file_tokens(conn, [TokenEntry("b", "2" * 64, 0)])
            hashes = await token_hashes(conn)
        assert hashes == ["2" * 64]


@pytest.mark.parametrize("count", [3])
class TestWriteLane:
    async def test_concurrent_writes_all_commit(self, store: Store, count: int):
        """Writers racing on one database all commit (SQLite serialises them in one lane)."""

        async def write(i: int) -> None:
            async with store.write() as conn:
                await register_device(conn, f"d{i}", hardware_class=None, labels={}, now_ms=i)

        await asyncio.gather(*(write(i) for i in range(count)))
        async with store.read() as conn:
            found = await list_devices(conn, DeviceFilter(), after_id=None, limit=10)
        assert len(found) == count
