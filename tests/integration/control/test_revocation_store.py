"""Revoked devices in the store, and the ingest path refusing them, on SQLite and PostgreSQL.

Every test runs once per database (the ``db_url`` fixture). The ingest tests drive a real
:class:`~edgelm_control.fleet.ingest.Ingestor` on the real store, with a fake broker link that
records what is acknowledged: the refusal must hold for messages that were already waiting in
a batch when the revocation landed, and (PostgreSQL, where writers run concurrently) for a
batch whose transaction starts while a revocation is being committed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select, text
from structlog.testing import capture_logs

from edgelm_control.clock import ManualClock
from edgelm_control.fleet.batch import Accepted, build_batch
from edgelm_control.fleet.ingest import Ingestor
from edgelm_control.jobs.states import JobDeviceState
from edgelm_control.metrics import ControlMetrics
from edgelm_control.store import Store
from edgelm_control.store.desired import (
    clear_desired,
    get_desired,
    mark_published,
    next_sequence,
    record_desired,
    unpublished,
)
from edgelm_control.store.devices import (
    DeviceReport,
    apply_reports,
    get_device,
    targetable_devices,
)
from edgelm_control.store.ingest import write_batch
from edgelm_control.store.jobs import JobRecord, cancel_device_jobs, insert_job, job_device_rows
from edgelm_control.store.revocations import (
    get_revocation,
    record_revocation,
    revocations_of,
    revoked_among,
)
from edgelm_control.store.schema import metadata
from edgelm_protocol import (
    Channel,
    Event,
    EventKind,
    JobOutcome,
    JobResult,
    Percentiles,
    Presence,
    PresenceStatus,
    Telemetry,
    Topic,
    encode,
    new_envelope,
    new_message_id,
)
from edgelm_protocol.mqtt import InboundMessage
from tests.integration.control.conftest import until

FLEET = "acme"
NOW_MS = 1_795_000_000_000
STORED_TABLES = ("telemetry", "device_events", "job_results")


class FakeLink:
    """The broker side of the ingest path: records broker acks and end-to-end acks."""

    fleet = FLEET
    connected = True

    def __init__(self) -> None:
        self.acked: list[InboundMessage] = []
        self.published: list[tuple[str, bytes]] = []

    def ack(self, message: InboundMessage) -> bool:
        self.acked.append(message)
        return True

    async def publish(self, topic: Topic, payload: bytes, *, retain: bool) -> None:
        self.published.append((topic.value, payload))


TELEMETRY = Telemetry(
    window_s=10.0,
    model=None,
    requests=1,
    errors=0,
    tokens_per_s=Percentiles(40.0, 50.0),
    ttft_ms=Percentiles(None, None),
    queue_depth=0,
    cpu_percent=None,
    memory_bytes=None,
    memory_total_bytes=None,
    disk_free_bytes=None,
    temperature_c=None,
)


def message(device: str, body: Any) -> InboundMessage:
    envelope = new_envelope(body, sender=device, ts_ms=NOW_MS)
    topic = Topic.for_type(FLEET, device, body.TYPE)
    return InboundMessage(topic=topic.value, payload=encode(envelope), qos=1)


def every_kind(device: str) -> list[InboundMessage]:
    """One message of each kind a device sends: presence, telemetry, an event, a result."""
    return [
        message(device, Presence(PresenceStatus.ONLINE, "1.0")),
        message(device, TELEMETRY),
        message(device, Event(seq=1, kind=EventKind.ACTIVATED, model="m@1")),
        message(device, JobResult(job_id=new_message_id(), state=JobOutcome.SUCCEEDED)),
    ]


def ingestor(store: Store) -> tuple[Ingestor, FakeLink, ControlMetrics]:
    link, metrics = FakeLink(), ControlMetrics()
    receiver = Ingestor(
        store=store,
        link=link,  # type: ignore[arg-type]  # the part of FleetLink the ingest path uses
        clock=ManualClock(NOW_MS),
        metrics=metrics,
        batch_max=100,
        flush_interval_s=0,
    )
    return receiver, link, metrics


async def rows(store: Store, table: str, device: str) -> int:
    async with store.read() as conn:
        columns = metadata.tables[table].c
        query = select(func.count()).select_from(metadata.tables[table])
        return int((await conn.execute(query.where(columns.device_id == device))).scalar_one())


async def known(store: Store, device: str) -> bool:
    """Whether the store has a device row for ``device``."""
    async with store.read() as conn:
        return await get_device(conn, device) is not None


def refused(metrics: ControlMetrics, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "edgelm_control_messages_refused_total", {"code": code}
    )
    return value or 0.0


async def revoke(store: Store, device: str, reason: str | None = "stolen") -> None:
    async with store.write() as conn:
        await record_revocation(conn, device, reason=reason, now_ms=NOW_MS)


class TestRevocationRecord:
    async def test_revoking_twice_keeps_the_first_time_and_reason(self, store: Store):
        """The first revocation is the record; a second one says it is not new."""
        async with store.write() as conn:
            first, created = await record_revocation(conn, "kiosk-1", reason="stolen", now_ms=5)
        async with store.write() as conn:
            again, created_again = await record_revocation(conn, "kiosk-1", reason="x", now_ms=9)
        assert created
        assert not created_again
        assert again == first
        assert (first.revoked_ms, first.reason) == (5, "stolen")
        async with store.read() as conn:
            assert await get_revocation(conn, "kiosk-1") == first
            assert await get_revocation(conn, "kiosk-2") is None
            assert set(await revocations_of(conn, ["kiosk-1", "kiosk-2"])) == {"kiosk-1"}

    async def test_revoked_devices_are_found_among_others(self, store: Store):
        """revoked_among names exactly the revoked ones, with the lock taken or not."""
        await revoke(store, "kiosk-1")
        async with store.write() as conn:
            assert await revoked_among(conn, ["kiosk-1", "kiosk-2"], lock=True) == {"kiosk-1"}
            assert await revoked_among(conn, [], lock=True) == frozenset()
        async with store.read() as conn:
            assert await revoked_among(conn, ["kiosk-2"], lock=False) == frozenset()

    async def test_a_revoked_device_is_no_target(self, store: Store):
        """New rollouts and jobs select among every device but the revoked ones."""
        async with store.write() as conn:
            await apply_reports(
                conn, [DeviceReport("kiosk-1", NOW_MS), DeviceReport("kiosk-2", NOW_MS)], NOW_MS
            )
        await revoke(store, "kiosk-1")
        async with store.write() as conn:
            assert [d.device_id for d in await targetable_devices(conn)] == ["kiosk-2"]


class TestWhatARevocationUndoes:
    async def test_the_desired_state_is_withdrawn_and_published_empty(self, store: Store):
        """The row gets the next sequence and no document, so the director publishes an
        empty retained message; nothing is left to re-sign, and a second clear does nothing."""
        async with store.write() as conn:
            sequence = await next_sequence(conn, "kiosk-1", floor=0, now_ms=NOW_MS)
            await record_desired(
                conn,
                "kiosk-1",
                sequence=sequence,
                rollout_id="ro-1",
                model="m@1",
                target=("m/1/x.gguf", 5, "a" * 64),
                issued_at_s=1,
                expires_s=2,
                document="{signed}",
                now_ms=NOW_MS,
            )
            await mark_published(conn, "kiosk-1", sequence)
            assert await clear_desired(conn, "kiosk-1", now_ms=NOW_MS + 1)
            assert not await clear_desired(conn, "kiosk-1", now_ms=NOW_MS + 2)
            assert not await clear_desired(conn, "kiosk-9", now_ms=NOW_MS + 2)
            desired = await get_desired(conn, "kiosk-1")
            pending = await unpublished(conn)
        assert desired is not None
        assert desired.sequence == sequence + 1
        assert (desired.document, desired.model, desired.target, desired.expires_s) == (
            None,
            None,
            None,
            None,
        )
        assert [(p.device_id, p.document) for p in pending] == [("kiosk-1", None)]

    async def test_jobs_without_a_result_are_cancelled_and_finished_ones_kept(self, store: Store):
        """queued and sent rows of the device become cancelled; its finished rows and other
        devices' rows stay as they were."""
        async with store.write() as conn:
            for job_id in ("job-1", "job-2", "job-3"):
                job = JobRecord(job_id, {"prompt": "hi"}, {"all": True}, 0, None, 3, None, False, 1)
                await insert_job(
                    conn, job, [("kiosk-1", new_message_id()), ("kiosk-2", "m" + job_id)]
                )
            await conn.execute(text("UPDATE job_devices SET state = 'sent' WHERE job_id = 'job-2'"))
            await conn.execute(
                text(
                    "UPDATE job_devices SET state = 'succeeded' "
                    "WHERE job_id = 'job-3' AND device_id = 'kiosk-1'"
                )
            )
            cancelled = await cancel_device_jobs(conn, "kiosk-1", now_ms=NOW_MS)
            states = {
                (r.job_id, r.device_id): r.state
                for job_id in ("job-1", "job-2", "job-3")
                for r in await job_device_rows(conn, job_id)
            }
        assert cancelled == ["job-1", "job-2"]
        assert states[("job-1", "kiosk-1")] is JobDeviceState.CANCELLED
        assert states[("job-2", "kiosk-1")] is JobDeviceState.CANCELLED
        assert states[("job-3", "kiosk-1")] is JobDeviceState.SUCCEEDED
        assert {states[(j, "kiosk-2")] for j in ("job-1", "job-3")} == {JobDeviceState.QUEUED}
        assert states[("job-2", "kiosk-2")] is JobDeviceState.SENT


class TestWriteBatch:
    async def test_a_revoked_devices_rows_are_dropped_in_the_transaction(self, store: Store):
        """write_batch stores the other device's rows and nothing of the revoked one's, and
        names it in the outcome."""
        await revoke(store, "kiosk-1")
        items = [
            Accepted(device, new_envelope(body, sender=device, ts_ms=1))
            for device in ("kiosk-1", "kiosk-2")
            for body in (
                Presence(PresenceStatus.ONLINE, "1.0"),
                TELEMETRY,
                Event(seq=1, kind=EventKind.INSTALLED, model="m@1"),
                JobResult(job_id=new_message_id(), state=JobOutcome.FAILED),
            )
        ]
        async with store.write() as conn:
            outcome = await write_batch(conn, build_batch(items, NOW_MS), NOW_MS)
        assert outcome.revoked == {"kiosk-1"}
        assert {c.device_id for c in outcome.device_changes} == {"kiosk-2"}
        assert len(outcome.new_events) == len(outcome.new_results) == 1
        for table in STORED_TABLES:
            assert await rows(store, table, "kiosk-1") == 0, table
            assert await rows(store, table, "kiosk-2") == 1, table
        assert not await known(store, "kiosk-1")

    async def test_without_revoked_devices_the_batch_is_written_whole(self, store: Store):
        """No revoked device in the batch: nothing is dropped."""
        await revoke(store, "kiosk-9")
        items = [Accepted("kiosk-2", new_envelope(TELEMETRY, sender="kiosk-2", ts_ms=1))]
        async with store.write() as conn:
            outcome = await write_batch(conn, build_batch(items, NOW_MS), NOW_MS)
        assert outcome.revoked == frozenset()
        assert await rows(store, "telemetry", "kiosk-2") == 1


class TestIngestRefusal:
    async def test_messages_waiting_in_a_batch_when_the_revocation_lands_are_refused(
        self, store: Store
    ):
        """Accepted and queued before the revocation, stored after it: every message of the
        revoked device is refused as device_revoked (counted, logged once each, acked to the
        broker, never acked end to end) and nothing of it is stored; the other device's are."""
        receiver, link, metrics = ingestor(store)
        revoked, other = every_kind("kiosk-1"), every_kind("kiosk-2")
        for inbound in revoked + other:
            receiver.accept(inbound)
        await revoke(store, "kiosk-1")
        with capture_logs() as logs:
            await receiver.drain()
        lines = [e for e in logs if e["event"] == "fleet_message_refused"]
        assert sorted(e["topic"] for e in lines) == sorted(ascii(m.topic) for m in revoked)
        assert {(e["code"], e["device"]) for e in lines} == {("device_revoked", "kiosk-1")}
        assert refused(metrics, "device_revoked") == len(revoked)
        assert sorted(id(m) for m in link.acked) == sorted(id(m) for m in revoked + other)
        assert [t for t, _ in link.published] == [
            Topic.for_device(FLEET, "kiosk-2", Channel.ACK).value
        ]
        for table in STORED_TABLES:
            assert await rows(store, table, "kiosk-1") == 0, table
            assert await rows(store, table, "kiosk-2") == 1, table
        assert not await known(store, "kiosk-1")

    async def test_a_device_revoked_after_it_was_stored_is_not_updated_any_more(self, store: Store):
        """A device the store knows keeps its last presence and last seen once revoked."""
        receiver, _, metrics = ingestor(store)
        receiver.accept(message("kiosk-1", Presence(PresenceStatus.ONLINE, "1.0")))
        await receiver.drain()
        async with store.read() as conn:
            before = (await conn.execute(text("SELECT * FROM devices"))).all()
        await revoke(store, "kiosk-1")
        receiver.accept(message("kiosk-1", Presence(PresenceStatus.OFFLINE, "1.0")))
        receiver.accept(message("kiosk-1", TELEMETRY))
        await receiver.drain()
        async with store.read() as conn:
            after = (await conn.execute(text("SELECT * FROM devices"))).all()
        assert after == before
        assert refused(metrics, "device_revoked") == 2


class TestRevocationOrdering:
    async def test_a_batch_that_starts_while_a_revocation_commits_waits_and_sees_it(
        self, store: Store
    ):
        """PostgreSQL: a revocation holds its lock until it commits; an ingest transaction
        that starts meanwhile waits for it (seen in pg_locks, not on a clock) and then
        refuses the device. SQLite orders the two with its one write lane instead."""
        if store.dialect != "postgresql":
            return  # the write lane makes this sequential; the test above covers it
        receiver, _, metrics = ingestor(store)
        for inbound in every_kind("kiosk-1"):
            receiver.accept(inbound)

        async def waiting_for_the_lock() -> bool:
            async with store.read() as conn:
                query = text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"
                )
                return bool((await conn.execute(query)).scalar_one())

        async with store.write() as conn:
            await record_revocation(conn, "kiosk-1", reason=None, now_ms=NOW_MS)
            draining = asyncio.create_task(receiver.drain())
            await until(waiting_for_the_lock)
            assert not draining.done()
        await asyncio.wait_for(draining, 60)
        assert refused(metrics, "device_revoked") == 4
        for table in STORED_TABLES:
            assert await rows(store, table, "kiosk-1") == 0, table
