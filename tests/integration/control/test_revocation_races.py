"""A revocation against every writer that acts on a device, on SQLite and PostgreSQL.

A revocation is final: once it has committed, nothing signs, stores or publishes a desired
state for the device, nothing sends it a remote job, and every rollout row it had open ends
``revoked``. On PostgreSQL writers run side by side, so each race here holds one transaction
open at the moment that matters (the revocation's, or the other writer's), starts the other
writer, waits until the database shows that writer blocked on a lock (``pg_stat_activity``,
never a clock) or finished, and only then commits. On SQLite the store's write lane orders
the two instead; the same tests show the outcome there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text

from edgelm_control.clock import ManualClock, seconds
from edgelm_control.director import Assignment, Director
from edgelm_control.fleet.ports import PUBLISH_CONCURRENCY
from edgelm_control.hub import FleetHub
from edgelm_control.jobs.service import RemoteJobs
from edgelm_control.jobs.states import JobDeviceState
from edgelm_control.metrics import ControlMetrics
from edgelm_control.revocation import DeviceRevoker
from edgelm_control.rollouts.actions import Changes, RolloutActions
from edgelm_control.rollouts.device_states import DeviceEvent, DeviceState
from edgelm_control.rollouts.driver import RolloutDriver
from edgelm_control.rollouts.engine import RolloutEngine, new_row
from edgelm_control.rollouts.rollout_states import RolloutState
from edgelm_control.rollouts.settings import RolloutSettings
from edgelm_control.store import Store
from edgelm_control.store.desired import (
    DesiredRecord,
    clear_desired,
    get_desired,
    next_sequence,
    record_desired,
)
from edgelm_control.store.devices import DeviceReport, apply_reports, get_devices
from edgelm_control.store.jobs import JobRecord, cancel_device_jobs, insert_job, job_device_rows
from edgelm_control.store.revocations import record_revocation
from edgelm_control.store.rollouts import (
    RolloutRecord,
    RowRecord,
    cas_row,
    get_row,
    insert_rollout,
    insert_rows,
    insert_waves,
)
from edgelm_protocol import Channel, TargetRef, Topic, new_message_id
from tests.integration.control.conftest import until

FLEET = "acme"
NOW_MS = 1_795_000_000_000
DAY_S = 86_400
EXPIRY_S = 7 * DAY_S
THIEF = "kiosk-9"  # the device revoked in every test; ids of others sort before it
ROLLOUT = "ro-1"
TARGET = TargetRef("models/m/1/model.gguf", 10, "ab" * 32)
REVOKED_MARK = ("--- the revocation committed ---", b"")

T = TypeVar("T")


class WatchedLane(asyncio.Lock):
    """The SQLite store's write lane, counting the transactions waiting for it, so a test can
    tell "blocked behind the open transaction" without a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


class FakeBroker:
    """The fleet link's publishing side: logs every publish in the order it is made; while
    ``gate`` is set and closed, publishes wait (the broker has not answered)."""

    connected = True

    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.gate: asyncio.Event | None = None
        self.held = 0

    async def publish(self, topic: Topic, payload: bytes, *, retain: bool) -> None:
        self.log.append((topic.value, payload))
        if self.gate is not None:
            self.held += 1
            await self.gate.wait()


@dataclass
class Plane:
    """A control plane's parts on the real store, with a fake broker and a manual clock."""

    store: Store
    clock: ManualClock
    broker: FakeBroker
    keys: list[Ed25519PrivateKey]
    director: Director
    actions: RolloutActions
    engine: RolloutEngine
    driver: RolloutDriver
    revoker: DeviceRevoker
    jobs: RemoteJobs
    devices: list[str] = field(default_factory=list)


@pytest.fixture
def plane(store: Store) -> Plane:
    if store.dialect == "sqlite":
        store._write_lane = WatchedLane()
    clock, broker, metrics, hub = ManualClock(NOW_MS), FakeBroker(), ControlMetrics(), FleetHub()
    keys = [Ed25519PrivateKey.generate()]
    director = Director(
        fleet=FLEET,
        key=lambda: keys[-1],
        store=store,
        publisher=broker,
        clock=clock,
        metrics=metrics,
        expiry_s=EXPIRY_S,
    )
    actions = RolloutActions(director=director, clock=clock, metrics=metrics)
    engine = RolloutEngine(store=store, actions=actions, clock=clock, hub=hub)
    driver = RolloutDriver(
        store=store, actions=actions, engine=engine, clock=clock, hub=hub, tick_s=3600
    )
    revoker = DeviceRevoker(store=store, engine=engine, clock=clock, hub=hub)
    jobs = RemoteJobs(
        fleet=FLEET, store=store, publisher=broker, clock=clock, metrics=metrics, hub=hub
    )
    return Plane(store, clock, broker, keys, director, actions, engine, driver, revoker, jobs)


# --- waiting for a lock, not for a clock ------------------------------------------------------


async def blocked(store: Store) -> bool:
    """Whether a transaction waits for a lock: on PostgreSQL, a backend of this database
    waiting on a lock; on SQLite, a transaction waiting for the write lane."""
    if store.dialect == "sqlite":
        lane = store._write_lane
        assert isinstance(lane, WatchedLane)
        return lane.waiting > 0
    async with store.read() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool((await conn.execute(query)).scalar_one())


async def until_blocked_or_done(store: Store, task: asyncio.Task[T]) -> None:
    """Wait until ``task`` is blocked behind a lock, or has finished (it did not wait)."""

    async def ready() -> bool:
        return task.done() or await blocked(store)

    await until(ready)


async def race_behind_revocation(plane: Plane, device: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call`` while the revocation of ``device`` is in flight: every write of the
    revocation done, its transaction open; it commits once ``call`` waits for it (or ``call``
    finished without waiting). Return what ``call`` returned."""
    async with revocation_in_flight(plane, device):
        task = asyncio.ensure_future(call())
        await until_blocked_or_done(plane.store, task)
    return await task


@contextlib.asynccontextmanager
async def revocation_in_flight(plane: Plane, device: str) -> AsyncIterator[None]:
    """What :meth:`DeviceRevoker.revoke` does in its transaction, held open for the block;
    committed when it ends, with :data:`REVOKED_MARK` logged at the broker right after."""
    now_ms = plane.clock.now_ms()
    async with plane.store.write() as conn:
        await record_revocation(conn, device, reason="stolen", now_ms=now_ms)
        await plane.engine.revoke_device(conn, device, reason="revoked: stolen", changes=Changes())
        await cancel_device_jobs(conn, device, now_ms=now_ms)
        await clear_desired(conn, device, now_ms=now_ms)
        yield
    plane.broker.log.append(REVOKED_MARK)


async def revoke_now(plane: Plane, device: str) -> None:
    async with revocation_in_flight(plane, device):
        pass


# --- fleet set-up -----------------------------------------------------------------------------


async def known(plane: Plane, *devices: str) -> None:
    async with plane.store.write() as conn:
        await apply_reports(conn, [DeviceReport(d, NOW_MS) for d in devices], NOW_MS)
    plane.devices.extend(devices)


async def rollout_not_started(plane: Plane, *devices: str) -> None:
    """A running one-wave rollout whose wave has not started (every row ``waiting``): the
    driver's next pass starts it, as after a crash in the middle of a start."""
    now_ms = plane.clock.now_ms()
    record = RolloutRecord(
        rollout_id=ROLLOUT,
        model="m@1",
        target_path=TARGET.path,
        target_length=TARGET.length,
        target_sha256=TARGET.sha256,
        selector={"devices": list(devices)},
        settings=RolloutSettings(),
        baselines={},
        state=RolloutState.RUNNING,
        current_wave=0,
        wave_count=1,
        created_ms=now_ms,
        updated_ms=now_ms,
        ended_ms=None,
    )
    async with plane.store.write() as conn:
        await insert_rollout(conn, record)
        await insert_waves(conn, ROLLOUT, 1)
        facts = await get_devices(conn, devices)
        await insert_rows(conn, [new_row(ROLLOUT, facts[d], 0, None, now_ms) for d in devices])


async def rollout_started(plane: Plane, *devices: str) -> None:
    """The same rollout, started by the driver: every row ``pending``, its state issued."""
    await rollout_not_started(plane, *devices)
    await plane.driver.advance(Changes())
    assert await row_states(plane) == dict.fromkeys(devices, DeviceState.PENDING)


async def row_states(plane: Plane) -> dict[str, DeviceState]:
    async with plane.store.read() as conn:
        rows = [await get_row(conn, ROLLOUT, d) for d in plane.devices]
    return {r.device_id: r.state for r in rows if r is not None}


async def row(plane: Plane, device: str) -> RowRecord:
    async with plane.store.read() as conn:
        found = await get_row(conn, ROLLOUT, device)
    assert found is not None
    return found


async def desired(plane: Plane, device: str) -> DesiredRecord | None:
    async with plane.store.read() as conn:
        return await get_desired(conn, device)


async def issue(plane: Plane, *devices: str) -> None:
    """A current desired state for each device, issued in that order, a second apart."""
    for device in devices:
        async with plane.store.write() as conn:
            await plane.director.issue(conn, device, Assignment("m@1", TARGET, None), floor=0)
        plane.clock.advance(1)


def desired_topic(device: str) -> str:
    return Topic.for_device(FLEET, device, Channel.DESIRED).value


def jobs_topic(device: str) -> str:
    return Topic.for_device(FLEET, device, Channel.JOBS).value


def signed_after_the_mark(log: list[tuple[str, bytes]], topic: str) -> list[bytes]:
    """What was published non-empty on ``topic`` after the revocation committed."""
    assert REVOKED_MARK in log
    return [p for t, p in log[log.index(REVOKED_MARK) :] if t == topic and p]


# --- the tests --------------------------------------------------------------------------------


class TestIssue:
    async def test_nothing_is_signed_for_a_revoked_device(self, plane: Plane):
        """issue() for a device whose revocation has committed signs and stores nothing and
        says so (None); another device gets its state."""
        await revoke_now(plane, THIEF)
        async with plane.store.write() as conn:
            refused = await plane.director.issue(
                conn, THIEF, Assignment("m@1", TARGET, None), floor=0
            )
            issued = await plane.director.issue(
                conn, "kiosk-1", Assignment("m@1", TARGET, None), floor=0
            )
        assert refused is None
        assert issued == 1
        assert await desired(plane, THIEF) is None
        assert await plane.director.publish_pending() == 1
        assert [t for t, _ in plane.broker.log if t != REVOKED_MARK[0]] == [
            desired_topic("kiosk-1")
        ]


class TestIssuingWhileARevocationCommits:
    async def test_resigning_before_expiry_skips_a_device_revoked_meanwhile(self, plane: Plane):
        """Re-signing that reads the expiring states while the revocation is in flight issues
        nothing for the revoked device once it has committed: its state stays withdrawn."""
        await known(plane, "kiosk-1", THIEF)
        await issue(plane, "kiosk-1", THIEF)
        plane.clock.advance(EXPIRY_S - 3600)
        count = await race_behind_revocation(
            plane, THIEF, lambda: plane.director.resign_expiring(before_s=DAY_S)
        )
        after = await desired(plane, THIEF)
        assert after is not None
        assert (after.document, after.expires_s) == (None, None)
        assert count == 1
        other = await desired(plane, "kiosk-1")
        assert other is not None
        assert other.sequence == 2
        assert signed_after_the_mark(plane.broker.log, desired_topic(THIEF)) == []

    async def test_resigning_with_a_new_director_key_skips_a_device_revoked_meanwhile(
        self, plane: Plane
    ):
        """After a key rotation, re-signing every state signed with the old key leaves the
        device revoked meanwhile without a state."""
        await known(plane, "kiosk-1", THIEF)
        await issue(plane, "kiosk-1", THIEF)
        plane.keys.append(Ed25519PrivateKey.generate())
        count = await race_behind_revocation(plane, THIEF, plane.director.resign_other_keys)
        after = await desired(plane, THIEF)
        assert after is not None
        assert after.document is None
        assert count == 1
        assert signed_after_the_mark(plane.broker.log, desired_topic(THIEF)) == []

    async def test_a_wave_starting_meanwhile_gives_the_revoked_device_no_state(self, plane: Plane):
        """The driver starts a wave while the revocation of one of its devices is in flight:
        the other device is pending with a desired state; the revoked one has none, and its
        row is revoked."""
        await known(plane, "kiosk-1", THIEF)
        await rollout_not_started(plane, "kiosk-1", THIEF)
        await race_behind_revocation(plane, THIEF, lambda: plane.driver.advance(Changes()))
        assert await row_states(plane) == {
            "kiosk-1": DeviceState.PENDING,
            THIEF: DeviceState.REVOKED,
        }
        assert await desired(plane, THIEF) is None
        other = await desired(plane, "kiosk-1")
        assert other is not None
        assert other.document is not None

    async def test_an_abort_meanwhile_issues_no_release_for_the_revoked_device(self, plane: Plane):
        """The operator aborts while the revocation is in flight: the other device gets the
        abort's release, the revoked one keeps its withdrawn state and its revoked row."""
        await known(plane, "kiosk-1", THIEF)
        await rollout_started(plane, "kiosk-1", THIEF)
        withdrawn_at = (await desired(plane, THIEF) or pytest.fail("no state")).sequence + 1
        await race_behind_revocation(plane, THIEF, lambda: plane.engine.abort(ROLLOUT))
        states = await row_states(plane)
        assert states == {"kiosk-1": DeviceState.CANCELLED, THIEF: DeviceState.REVOKED}
        after = await desired(plane, THIEF)
        assert after is not None
        assert (after.sequence, after.document) == (withdrawn_at, None)
        assert (await row(plane, "kiosk-1")).abort_sequence == 2
        assert signed_after_the_mark(plane.broker.log, desired_topic(THIEF)) == []


class TestRowsTheRevocationMissed:
    async def test_a_waiting_row_of_a_revoked_device_is_revoked_when_its_wave_starts(
        self, plane: Plane
    ):
        """A row that names a device revoked before it was written (however it got there) is
        not started: its wave start moves it to revoked and issues nothing for it."""
        await known(plane, "kiosk-1", THIEF)
        async with plane.store.write() as conn:
            await record_revocation(conn, THIEF, reason="stolen", now_ms=NOW_MS)
        await rollout_not_started(plane, "kiosk-1", THIEF)
        await plane.driver.advance(Changes())
        assert await row_states(plane) == {
            "kiosk-1": DeviceState.PENDING,
            THIEF: DeviceState.REVOKED,
        }
        assert (await row(plane, THIEF)).reason == "revoked: stolen"
        assert await desired(plane, THIEF) is None

    async def test_an_abort_revokes_a_revoked_devices_open_row_instead_of_releasing_it(
        self, plane: Plane
    ):
        """A pending row of a revoked device that is still open at an abort ends revoked; the
        abort signs no release for it and withdraws the state it still held (published as
        the empty message)."""
        await known(plane, "kiosk-1", THIEF)
        await rollout_started(plane, "kiosk-1", THIEF)
        before = await desired(plane, THIEF)
        assert before is not None
        async with plane.store.write() as conn:
            await record_revocation(conn, THIEF, reason=None, now_ms=NOW_MS)
        await plane.engine.abort(ROLLOUT)
        assert await row_states(plane) == {
            "kiosk-1": DeviceState.CANCELLED,
            THIEF: DeviceState.REVOKED,
        }
        assert (await row(plane, THIEF)).reason == "revoked"
        after = await desired(plane, THIEF)
        assert after is not None
        assert (after.sequence, after.document) == (before.sequence + 1, None)
        assert [p for t, p in plane.broker.log if t == desired_topic(THIEF)][-1] == b""


class TestRowsMovedWhileRevoking:
    async def test_a_row_the_driver_moves_meanwhile_still_ends_revoked(self, plane: Plane):
        """The driver moves the device's row (pending → downloading) in a transaction that is
        open when the revocation starts: once both commit, the row is revoked and the
        revocation names the rollout it left."""
        await known(plane, "kiosk-1", THIEF)
        await rollout_started(plane, "kiosk-1", THIEF)
        async with plane.store.write() as conn:
            pending = await get_row(conn, ROLLOUT, THIEF)
            assert pending is not None
            moved = await plane.actions.move(conn, pending, DeviceEvent.DOWNLOAD_STARTED, Changes())
            assert moved is DeviceState.DOWNLOADING
            revoking = asyncio.ensure_future(plane.revoker.revoke(THIEF, reason="stolen"))
            await until_blocked_or_done(plane.store, revoking)
        result = await revoking
        assert result.rollouts == (ROLLOUT,)
        assert (await row(plane, THIEF)).state is DeviceState.REVOKED
        assert (await row(plane, THIEF)).reason == "revoked: stolen"

    async def test_a_row_moved_by_a_writer_that_takes_no_lock_still_ends_revoked(
        self, plane: Plane
    ):
        """A writer that does not order itself against revocations (a replica still on the
        previous release) moves the row first: the revocation's compare-and-set misses, and
        it tries again on what that writer left, until the row is revoked."""
        await known(plane, "kiosk-1", THIEF)
        await rollout_started(plane, "kiosk-1", THIEF)
        async with plane.store.write() as conn:
            assert await cas_row(
                conn,
                ROLLOUT,
                THIEF,
                expected=DeviceState.PENDING,
                state=DeviceState.DOWNLOADING,
                updated_ms=NOW_MS,
            )
            revoking = asyncio.ensure_future(plane.revoker.revoke(THIEF, reason="stolen"))
            await until_blocked_or_done(plane.store, revoking)
        result = await revoking
        assert result.rollouts == (ROLLOUT,)
        assert (await row(plane, THIEF)).state is DeviceState.REVOKED


class TestPublishingWhileARevocationCommits:
    async def test_a_state_read_before_the_revocation_is_not_published_after_it(self, plane: Plane):
        """The director is publishing a batch in which the device's signed state waits its
        turn when the revocation comes: the signed state is published before the revocation
        commits, or not at all, and what the broker keeps last for it is empty."""
        others = [f"kiosk-{i:03d}" for i in range(PUBLISH_CONCURRENCY)]
        await issue(plane, *others, THIEF)
        plane.broker.gate = asyncio.Event()
        publishing = asyncio.ensure_future(plane.director.publish_pending())
        await until(lambda: plane.broker.held == PUBLISH_CONCURRENCY)
        revoking = asyncio.ensure_future(revoke_now(plane, THIEF))
        await until_blocked_or_done(plane.store, revoking)
        plane.broker.gate.set()
        await asyncio.gather(publishing, revoking)
        await plane.director.publish_pending()
        assert signed_after_the_mark(plane.broker.log, desired_topic(THIEF)) == []
        last = [p for t, p in plane.broker.log if t == desired_topic(THIEF)][-1]
        assert last == b""

    async def test_a_signed_state_stored_for_a_revoked_device_goes_out_empty(self, plane: Plane):
        """A signed state stored for a device that is revoked (however it got there) is never
        published: the director publishes the empty retained message in its place."""
        await revoke_now(plane, THIEF)
        async with plane.store.write() as conn:
            await record_desired(
                conn,
                THIEF,
                sequence=await next_sequence(conn, THIEF, floor=0, now_ms=NOW_MS),
                rollout_id=None,
                model="m@1",
                target=(TARGET.path, TARGET.length, TARGET.sha256),
                issued_at_s=seconds(NOW_MS),
                expires_s=seconds(NOW_MS) + EXPIRY_S,
                document='{"signed": true}',
                now_ms=NOW_MS,
            )
        assert await plane.director.publish_pending() == 1
        assert signed_after_the_mark(plane.broker.log, desired_topic(THIEF)) == []
        assert plane.broker.log[-1] == (desired_topic(THIEF), b"")


class TestDispatchWhileARevocationCommits:
    async def test_a_job_read_before_the_revocation_is_not_sent_after_it(self, plane: Plane):
        """The dispatcher is sending a batch in which the device's job waits its turn when the
        revocation comes: the job is sent before the revocation commits or not at all, and
        its row ends cancelled."""
        others = [f"kiosk-{i:03d}" for i in range(PUBLISH_CONCURRENCY)]
        await submitted(plane, [*others, THIEF])
        plane.broker.gate = asyncio.Event()
        dispatching = asyncio.ensure_future(plane.jobs.dispatch())
        await until(lambda: plane.broker.held == PUBLISH_CONCURRENCY)
        revoking = asyncio.ensure_future(revoke_now(plane, THIEF))
        await until_blocked_or_done(plane.store, revoking)
        plane.broker.gate.set()
        await asyncio.gather(dispatching, revoking)
        assert signed_after_the_mark(plane.broker.log, jobs_topic(THIEF)) == []
        assert (await job_states(plane))[THIEF] is JobDeviceState.CANCELLED

    async def test_a_queued_job_of_a_revoked_device_is_never_sent(self, plane: Plane):
        """A queued row for a device that is revoked (however it got there) is cancelled by
        the dispatcher, not sent; the other device's goes out."""
        await revoke_now(plane, THIEF)
        await submitted(plane, ["kiosk-1", THIEF])
        assert await plane.jobs.dispatch() == 1
        assert [t for t, _ in plane.broker.log if t != REVOKED_MARK[0]] == [jobs_topic("kiosk-1")]
        assert await job_states(plane) == {
            "kiosk-1": JobDeviceState.SENT,
            THIEF: JobDeviceState.CANCELLED,
        }


async def submitted(plane: Plane, devices: list[str]) -> None:
    """One job, queued for each device (stored as submit() stores it)."""
    job = JobRecord("job-1", {"prompt": "hi"}, {"all": True}, 0, None, 3, None, False, NOW_MS)
    async with plane.store.write() as conn:
        await insert_job(conn, job, [(d, new_message_id()) for d in devices])


async def job_states(plane: Plane) -> dict[str, JobDeviceState]:
    async with plane.store.read() as conn:
        return {r.device_id: r.state for r in await job_device_rows(conn, "job-1")}
