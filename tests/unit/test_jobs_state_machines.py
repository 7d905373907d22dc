"""The job queue as state machines: the lifecycle table, the SQLite store and the outbox.

Each machine keeps its own model, written from the modules' docstrings rather than from their
code, and checks the real thing against it after every step. Every example gets a fresh
database in its own temporary directory. Focused tests pin down the bugs the machines and the
integration tests found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.jobs import outbox, store
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.lifecycle import (
    FINAL,
    TRANSITIONS,
    IllegalTransition,
    JobEvent,
    JobState,
    backoff_s,
    failure_event,
    next_state,
)
from edgelm_agent.jobs.outbox import MessageKind, OutboxLimits, OutboxMessage
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.serving import ModelHost, ServingModel
from tests.fake_backend import FakeBackend

T = TypeVar("T")

# Store and outbox examples commit with fsync; on a slow disk the runs take minutes.
pytestmark = pytest.mark.timeout(600)

MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# The lifecycle as the diagram in edgelm_agent/jobs/lifecycle.py draws it, in plain strings so
# that it shares nothing with the table under test.
EXPECTED: dict[tuple[str, str], str] = {
    ("queued", "start"): "running",
    ("queued", "cancel"): "cancelled",
    ("queued", "expire"): "expired",
    ("running", "succeed"): "succeeded",
    ("running", "fail_permanent"): "failed",
    ("running", "retry"): "queued",
    ("running", "give_up"): "dead",
    ("running", "cancel"): "cancelled",
    ("running", "recover"): "queued",
}
STATES = {"queued", "running", "succeeded", "failed", "cancelled", "expired", "dead"}
EVENTS = {"start", "succeed", "fail_permanent", "retry", "give_up", "cancel", "expire", "recover"}
TERMINAL = {"succeeded", "failed", "cancelled", "expired", "dead"}


def fresh_database() -> tuple[Path, Database]:
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-jobs-"))
    return workdir, Database(workdir / "agent.db")


# --- the pure lifecycle table ----------------------------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    """Random events against one job; the table must agree with the diagram."""

    def __init__(self) -> None:
        super().__init__()
        self.state = JobState.QUEUED

    @rule(event=st.sampled_from(JobEvent))
    def fire(self, event: JobEvent) -> None:
        expected = EXPECTED.get((self.state.value, event.value))
        before = self.state
        if expected is None:
            with pytest.raises(IllegalTransition) as refused:
                self.state = next_state(self.state, event)
            assert refused.value.state == before
            assert refused.value.event == event
            assert self.state == before
        else:
            self.state = next_state(self.state, event)
            assert self.state.value == expected

    @rule()
    def new_job(self) -> None:
        self.state = JobState.QUEUED

    @invariant()
    def final_states_accept_no_event(self) -> None:
        assert (self.state in FINAL) == (self.state.value in TERMINAL)
        if self.state.value in TERMINAL:
            for event in JobEvent:
                with pytest.raises(IllegalTransition):
                    next_state(self.state, event)


class TestLifecycle:
    def test_state_machine_agrees_with_the_diagram(self) -> None:
        """Random event sequences move a job exactly as the diagram says, or are refused."""
        run_state_machine_as_test(LifecycleMachine, settings=MACHINE_SETTINGS)

    def test_table_is_the_diagram(self) -> None:
        """The transition table holds the diagram's arrows and no others."""
        assert {s.value for s in JobState} == STATES
        assert {e.value for e in JobEvent} == EVENTS
        assert {(s.value, e.value): t.value for (s, e), t in TRANSITIONS.items()} == EXPECTED
        assert {s.value for s in FINAL} == TERMINAL

    @given(attempts=st.integers(1, 20), max_attempts=st.integers(1, 20))
    def test_transient_failure_retries_while_attempts_are_left(
        self, attempts: int, max_attempts: int
    ) -> None:
        """A transient failure retries before the last attempt and gives up on it."""
        expected = JobEvent.RETRY if attempts < max_attempts else JobEvent.GIVE_UP
        assert failure_event(attempts, max_attempts) == expected

    @given(attempts=st.integers(0, 100))
    def test_backoff_doubles_up_to_five_minutes(self, attempts: int) -> None:
        """Backoff is 2, 4, 8 … seconds, never more than 300, never shrinking."""
        assert backoff_s(1) == 2.0
        assert backoff_s(2) == 4.0
        assert backoff_s(3) == 8.0
        assert 2.0 <= backoff_s(attempts) <= 300.0
        assert backoff_s(attempts) <= backoff_s(attempts + 1)


# --- the store ---------------------------------------------------------------------------------

KEYS = ("key-a", "key-b", "key-c")
ROOM = OutboxLimits()
NO_ROOM = OutboxLimits(durable_max_bytes=0)  # an outbox already at its cap
MODELS = ("m", "n")


@dataclass
class ModelJob:
    id: str
    order: int
    priority: int
    max_attempts: int
    report: str
    key: str | None
    deadline: float | None
    model: str = "m"
    state: str = "queued"
    attempts: int = 0
    not_before: float = 0.0
    result: dict[str, Any] | None = None
    #: The view claim() returned for each attempt: what the worker holds while it runs.
    views: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Submission:
    priority: int
    ttl: float | None
    key: str | None
    upstream: bool
    max_attempts: int
    room: bool  # whether the outbox has room for another upstream job
    model: str = "m"  # jobs run only on their own model; two models share the queue


SUBMISSIONS = st.builds(
    Submission,
    priority=st.integers(-2, 2),
    ttl=st.none() | st.sampled_from([1.0, 5.0, 30.0, 500.0]),
    key=st.none() | st.sampled_from(KEYS),
    upstream=st.booleans(),
    max_attempts=st.integers(1, 3),
    room=st.sampled_from([True, True, True, False]),
    model=st.sampled_from(MODELS),
)


def snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every job row, each job's position as get() reports it, and the result messages."""
    rows = [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()]
    positions = {r["id"]: store.get(r["id"])(conn)[1] for r in rows}
    assert all(store.position(i)(conn) == p for i, p in positions.items())  # both ways agree
    bodies = conn.execute("SELECT body FROM outbox WHERE kind = 'result' ORDER BY seq")
    return {
        "rows": rows,
        "positions": positions,
        "messages": [json.loads(b[0]) for b in bodies],
        "queued": store.queued_totals(conn),
    }


class StoreMachine(RuleBasedStateMachine):
    """submit / claim / succeed / fail / cancel / recover on a real database, with a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.workdir, self.db = fresh_database()
        self.now = time.time()  # the clock claim() is given; only the rules move it
        self.jobs: dict[str, ModelJob] = {}
        self.order: list[str] = []
        self.keys: dict[str, str] = {}

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def in_state(self, state: str) -> list[ModelJob]:
        return [self.jobs[i] for i in self.order if self.jobs[i].state == state]

    def has_running(self) -> bool:
        return bool(self.in_state("running"))

    def stale_views(self) -> list[tuple[ModelJob, dict[str, Any]]]:
        """Views of attempts that are over: finishing through them must change nothing."""
        stale = []
        for job in (self.jobs[i] for i in self.order):
            current = job.attempts if job.state == "running" else None
            stale += [(job, view) for view in job.views if view["attempts"] != current]
        return stale

    def expected_position(self, job: ModelJob) -> int | None:
        if job.state != "queued":
            return None
        return sum(
            1
            for other in self.in_state("queued")
            if other.model == job.model
            and (
                other.priority > job.priority
                or (other.priority == job.priority and other.order < job.order)
            )
        )

    def not_before_in_db(self, job_id: str) -> float:
        row = self.db.run_sync(
            lambda c: c.execute("SELECT not_before FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return float(row[0])

    def submit_one(self, sub: Submission) -> None:
        spec = store.JobSpec(
            kind="completion",
            request={"model": sub.model, "prompt": "good", "max_tokens": 3},
            priority=sub.priority,
            deadline=None if sub.ttl is None else self.now + sub.ttl,
            idempotency_key=sub.key,
            metadata={"line": 3},
            report="upstream" if sub.upstream else "local",
            max_attempts=sub.max_attempts,
        )
        earlier = self.keys.get(sub.key) if sub.key is not None else None
        if earlier is None and sub.upstream and not sub.room:
            with pytest.raises(store.OutboxFullForJobs):
                self.db.run_sync(store.submit(spec, ROOM if sub.room else NO_ROOM))
            return
        if earlier is not None:
            first = self.jobs[earlier]
            if (first.priority, first.max_attempts, first.report, first.model) != (
                sub.priority,
                sub.max_attempts,
                spec.report,
                sub.model,
            ):  # the key replayed with another payload: refused, nothing new
                with pytest.raises(store.IdempotencyKeyReused):
                    self.db.run_sync(store.submit(spec, ROOM if sub.room else NO_ROOM))
                return
        view, created = self.db.run_sync(store.submit(spec, ROOM if sub.room else NO_ROOM))
        if earlier is not None:  # the key is known: the earlier job, nothing new
            assert not created
            assert view["id"] == earlier
            return
        assert created
        assert view["state"] == "queued"
        assert view["attempts"] == 0
        job = ModelJob(
            id=view["id"],
            order=len(self.order),
            priority=sub.priority,
            max_attempts=sub.max_attempts,
            report=spec.report,
            key=sub.key,
            deadline=spec.deadline,
            model=sub.model,
        )
        self.jobs[job.id] = job
        self.order.append(job.id)
        if sub.key is not None:
            self.keys[sub.key] = job.id

    @initialize(batch=st.lists(SUBMISSIONS, min_size=1, max_size=5))
    def start_with_some_jobs(self, batch: list[Submission]) -> None:
        for sub in batch:
            self.submit_one(sub)

    @rule(batch=st.lists(SUBMISSIONS, min_size=1, max_size=3))
    def submit(self, batch: list[Submission]) -> None:
        for sub in batch:
            self.submit_one(sub)

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0, 10.0, 60.0, 400.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @rule(model=st.sampled_from(MODELS))
    def claim(self, model: str) -> None:
        for job in self.in_state("queued"):
            if job.deadline is not None and job.deadline < self.now:
                job.state = "expired"
        due = [j for j in self.in_state("queued") if j.not_before <= self.now and j.model == model]
        expected = min(due, key=lambda j: (-j.priority, j.order), default=None)
        claimed = self.db.run_sync(store.claim(self.now, model))
        if expected is None:
            assert claimed is None
            return
        assert claimed is not None
        assert claimed["id"] == expected.id
        assert claimed["deadline"] is None or claimed["deadline"] >= self.now
        assert self.not_before_in_db(expected.id) <= self.now
        expected.state = "running"
        expected.attempts += 1
        assert claimed["state"] == "running"
        assert claimed["attempts"] == expected.attempts
        expected.views.append(claimed)

    @precondition(lambda self: self.has_running())
    @rule(data=st.data(), outcome=st.sampled_from(["succeed", "transient", "permanent"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        job = data.draw(st.sampled_from(self.in_state("running")))
        view = job.views[-1]  # what the worker running this attempt holds
        if outcome == "succeed":
            result = {"text": f" bye from {job.id}"}
            assert self.db.run_sync(store.succeed(view, result)) is True
            job.state, job.result = "succeeded", result
        elif outcome == "permanent":
            assert self.db.run_sync(store.fail(view, {"code": "bad"}, transient=False)) == "failed"
            job.state = "failed"
        else:
            before = time.time()
            state = self.db.run_sync(store.fail(view, {"code": "busy"}, transient=True))
            after = time.time()
            if job.attempts < job.max_attempts:
                assert state == "queued"
                job.state = "queued"
                job.not_before = self.not_before_in_db(job.id)
                wait = backoff_s(job.attempts)
                assert before + wait <= job.not_before <= after + wait
            else:
                assert state == "dead"
                job.state = "dead"

    @precondition(lambda self: bool(self.stale_views()))
    @rule(data=st.data(), outcome=st.sampled_from(["succeed", "transient", "permanent"]))
    def finish_a_stale_attempt(self, data: st.DataObject, outcome: str) -> None:
        _, view = data.draw(st.sampled_from(self.stale_views()))
        if outcome == "succeed":
            assert self.db.run_sync(store.succeed(view, {"text": "stale"})) is False
        else:
            op = store.fail(view, {"code": "stale"}, transient=outcome == "transient")
            assert self.db.run_sync(op) is None

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from([*self.order, "job-unknown"]))
        if job_id not in self.jobs:
            for op in (store.get(job_id), store.cancel(job_id)):
                with pytest.raises(store.JobNotFound):
                    self.db.run_sync(op)
            return
        job = self.jobs[job_id]
        if job.state in TERMINAL:
            with pytest.raises(store.JobConflict):
                self.db.run_sync(store.cancel(job.id))
            return
        view, was_running = self.db.run_sync(store.cancel(job.id))
        assert view["state"] == "cancelled"
        assert was_running == (job.state == "running")
        job.state = "cancelled"

    @rule()
    def recover(self) -> None:
        running = self.in_state("running")
        assert self.db.run_sync(store.recover) == len(running)
        for job in running:
            job.state = "queued" if job.attempts < job.max_attempts else "dead"

    @rule(limit=st.integers(1, 4), state=st.none() | st.sampled_from(JobState))
    def page_through(self, limit: int, state: JobState | None) -> None:
        seen: list[str] = []
        cursor: int | None = None
        for _ in range(len(self.order) + 2):
            page, cursor = self.db.run_sync(
                store.list_jobs(None if state is None else state.value, limit, cursor)
            )
            assert len(page) <= limit
            seen += [j["id"] for j in page]
            if cursor is None:
                break
        expected = [i for i in self.order if state is None or self.jobs[i].state == state.value]
        assert seen == expected

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        view = self.db.run_sync(snapshot)
        rows = view["rows"]
        assert [r["id"] for r in rows] == self.order
        for row in rows:
            job = self.jobs[row["id"]]
            assert row["state"] == job.state
            assert row["attempts"] == job.attempts
            assert 0 <= row["attempts"] <= row["max_attempts"]
            if job.state == "running":
                assert 1 <= row["attempts"] <= row["max_attempts"]
            assert (row["result"] is not None) == (job.state == "succeeded")
            if job.state == "succeeded":
                assert json.loads(row["result"]) == job.result
            assert (row["finished_at"] is not None) == (job.state in TERMINAL)
            assert (row["started_at"] is not None) == (job.attempts > 0)

        # The running totals the queue caps check are what counting the queued rows gives.
        queued = [r for r in rows if r["state"] == "queued"]
        assert view["queued"] == (
            len(queued),
            sum(store.stored_bytes(r["request"], r["metadata"]) for r in queued),
        )

        keyed = Counter(r["idempotency_key"] for r in rows if r["idempotency_key"] is not None)
        assert all(n == 1 for n in keyed.values())
        assert {r["idempotency_key"]: r["id"] for r in rows if r["idempotency_key"]} == self.keys

        positions = view["positions"]
        for model in MODELS:  # each model's queue is its own
            queued = [j for j in self.in_state("queued") if j.model == model]
            assert sorted(positions[j.id] for j in queued) == list(range(len(queued)))
        for job in self.jobs.values():
            assert positions[job.id] == self.expected_position(job)

        # Each upstream job that ended, however it ended, is reported exactly once, with the
        # state it ended in; no other job is.
        sent = Counter(m["job_id"] for m in view["messages"])
        for job in self.jobs.values():
            due = job.report == "upstream" and job.state in TERMINAL
            assert sent[job.id] == (1 if due else 0), (job, sent[job.id])
        for message in view["messages"]:
            job = self.jobs[message["job_id"]]
            assert message["state"] == job.state
            assert set(message) == {"job_id", "state", "metadata", "result", "error"}
            assert (message["result"] is not None) == (job.state == "succeeded")
            assert (message["error"] is not None) == (job.state != "succeeded")


class TestStore:
    def test_state_machine_agrees_with_the_model(self) -> None:
        """Random submit/claim/finish/cancel/recover sequences keep the store and model equal."""
        run_state_machine_as_test(StoreMachine, settings=MACHINE_SETTINGS)

    def test_unknown_state_filter_is_refused(self) -> None:
        """Listing by a state that does not exist names the 'state' parameter."""
        with pytest.raises(InvalidRequest) as refused:
            store.list_jobs("bogus", 10, None)
        assert refused.value.param == "state"

    def test_upstream_job_given_up_at_recovery_is_reported(self) -> None:
        """An upstream job that dies in recovery (no attempts left) is reported upstream."""
        workdir, db = fresh_database()
        try:
            spec = store.JobSpec(
                kind="completion", request={"prompt": "good"}, report="upstream", max_attempts=1
            )
            job, _ = db.run_sync(store.submit(spec))
            assert db.run_sync(store.claim(time.time(), ""))["id"] == job["id"]
            assert db.run_sync(store.recover) == 1
            after, _ = db.run_sync(store.get(job["id"]))
            assert after["state"] == "dead"
            messages = db.run_sync(lambda conn: outbox.peek_rows(conn, 10))
            assert [m.body["job_id"] for m in messages] == [job["id"]]
            assert messages[0].body["state"] == "dead"
        finally:
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)


# --- the database ------------------------------------------------------------------------------


class TestDatabase:
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    async def test_a_caller_that_gives_up_does_not_stop_the_writer(self) -> None:
        """An awaited operation cancelled while it waits leaves the writer serving the rest."""
        workdir, db = fresh_database()
        gate = threading.Event()
        try:
            busy = db.submit(lambda conn: gate.wait(10))  # holds the writer inside a group
            waiting = asyncio.ensure_future(db.run(lambda conn: 1))
            await asyncio.sleep(0)  # the operation is queued behind the busy one
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            gate.set()
            assert busy.result(timeout=30) is True
            assert db.submit(lambda conn: 2).result(timeout=30) == 2
        finally:
            gate.set()
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)


class WatchedDatabase(Database):
    """A database that counts the operations handed to its writer."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.submitted = 0

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        self.submitted += 1
        return super().submit(op)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def fake_job(prompt: str) -> store.JobSpec:
    return store.JobSpec(
        kind="completion", request={"model": "fake", "prompt": prompt, "max_tokens": 4}
    )


class TestWorker:
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
    async def test_cancel_landing_while_the_result_is_stored_keeps_the_worker(self) -> None:
        """A cancel that arrives while a finished job's result is being stored stops nothing."""
        workdir = Path(tempfile.mkdtemp(prefix="edgelm-jobs-"))
        db = WatchedDatabase(workdir / "agent.db")
        backend = FakeBackend(["ok"], gated=True)
        scheduler = Scheduler(backend, max_queue=4, retry_after_s=1)
        host = ModelHost()
        host.set_active(ServingModel(backend, scheduler, context_length=64))
        worker = JobWorker(db, host, retention_s=3600, retention_count=100, idle_poll_s=0.05)
        runner = asyncio.create_task(worker.run())
        gate = threading.Event()
        try:
            first, _ = await db.run(store.submit(fake_job("first")))
            worker.wake()
            await until(backend.started.is_set, "the first job to generate")
            # DELETE /v1/jobs/{id} does two things: record the cancel …
            _, was_running = await db.run(store.cancel(first["id"]))
            assert was_running
            db.submit(lambda conn: gate.wait(10))  # the writer is busy for a moment
            before = db.submitted
            backend.release(1)  # the generation ends; the worker goes to store its result
            await until(lambda: db.submitted > before, "the worker to store the result")
            worker.cancel(first["id"])  # … then stop the running task: it lands right here
            gate.set()
            backend.release(1)
            second, _ = await asyncio.wait_for(db.run(store.submit(fake_job("second"))), 30)
            worker.wake()
            deadline = time.monotonic() + 30
            while (await db.run(store.get(second["id"])))[0]["state"] != "succeeded":
                assert time.monotonic() < deadline, "the next job never ran"
                await asyncio.sleep(0.005)
            assert not runner.done()
            assert (await db.run(store.get(first["id"])))[0]["state"] == "cancelled"
        finally:
            gate.set()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await scheduler.close()
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)


# --- the outbox --------------------------------------------------------------------------------

LIMITS = OutboxLimits(telemetry_max_messages=3, durable_max_bytes=400)
PRIORITY = {MessageKind.RESULT: 0, MessageKind.EVENT: 1, MessageKind.TELEMETRY: 2}
NEVER_ASSIGNED = 10**9


def encoded_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body, separators=(",", ":")))


def put_op(kind: MessageKind, body: dict[str, Any]) -> Callable[[sqlite3.Connection], Any]:
    return lambda conn: outbox.append(conn, kind, body, LIMITS)


class OutboxMachine(RuleBasedStateMachine):
    """put / peek / ack on a real outbox with small limits."""

    def __init__(self) -> None:
        super().__init__()
        self.workdir, self.db = fresh_database()
        self.present: dict[int, OutboxMessage] = {}
        self.acked: list[str] = []  # ids acknowledged before: acking them again is harmless
        self.gone: set[str] = set()  # tags acknowledged or trimmed: never to be seen again
        self.made = 0

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def durable_bytes(self) -> int:
        return sum(encoded_size(m.body) for m in self.present.values() if m.kind != "telemetry")

    def expected_order(self) -> list[tuple[int, MessageKind, dict[str, Any]]]:
        ordered = sorted(self.present.values(), key=lambda m: (PRIORITY[m.kind], m.seq))
        return [(m.seq, m.kind, m.body) for m in ordered]

    @rule(kind=st.sampled_from(MessageKind), pad=st.integers(0, 150))
    def put(self, kind: MessageKind, pad: int) -> None:
        self.made += 1
        body = {"tag": f"m{self.made}", "pad": "x" * pad}
        used = self.durable_bytes()
        if kind == MessageKind.EVENT and used + encoded_size(body) > LIMITS.durable_max_bytes:
            with pytest.raises(outbox.OutboxFull) as full:
                self.db.run_sync(put_op(kind, body))
            assert full.value.used_bytes == used
            assert full.value.cap_bytes == LIMITS.durable_max_bytes
            self.gone.add(body["tag"])  # refused: never stored
            return
        message = self.db.run_sync(put_op(kind, body))
        assert re.fullmatch(r"[0-9a-f]{32}", message.id)
        assert message.schema_version == outbox.SCHEMA_VERSION
        assert all(message.seq > s for s in self.present)  # appended after everything held
        assert message.id not in {m.id for m in self.present.values()} | set(self.acked)
        self.present[message.seq] = message
        telemetry = sorted(s for s, m in self.present.items() if m.kind == "telemetry")
        for old in telemetry[: -LIMITS.telemetry_max_messages]:  # the oldest are dropped
            self.gone.add(self.present.pop(old).body["tag"])

    @rule(limit=st.integers(1, 12))
    def peek(self, limit: int) -> None:
        messages = self.db.run_sync(lambda conn: outbox.peek_rows(conn, limit))
        got = [(m.seq, m.kind, m.body) for m in messages]
        assert got == self.expected_order()[:limit]
        ranks = [(PRIORITY[m.kind], m.seq) for m in messages]
        assert ranks == sorted(ranks)  # result < event < telemetry, then seq within a kind

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        # Acknowledgements may repeat and may name ids never seen: both change nothing else.
        # In seq order, not id order: ids are random, and hypothesis replays a failing case
        # by index, so the choices must line up the same way on every run.
        held = [m.id for _, m in sorted(self.present.items())]
        choices = [*held, *self.acked[-3:], "f" * 32]
        ids = data.draw(st.lists(st.sampled_from(choices), max_size=4, unique=True))
        known = [m for m in self.present.values() if m.id in ids]
        assert self.db.run_sync(lambda conn: outbox.delete_ids(conn, ids)) == len(known)
        for message in known:
            self.gone.add(self.present.pop(message.seq).body["tag"])
            self.acked.append(message.id)

    @rule()
    def has_room(self) -> None:
        expected = self.durable_bytes() < LIMITS.durable_max_bytes
        assert self.db.run_sync(lambda conn: outbox.has_room(conn, LIMITS)) is expected

    @invariant()
    def outbox_agrees_with_the_model(self) -> None:
        held = self.db.run_sync(lambda conn: outbox.peek_rows(conn, 10_000))
        assert [(m.seq, m.kind, m.body) for m in held] == self.expected_order()
        assert [m.id for m in held] == [self.present[m.seq].id for m in held]
        assert not {m.body["tag"] for m in held} & self.gone
        by_kind = Counter(m.kind for m in self.present.values())
        assert self.db.run_sync(outbox.count_rows) == {k: by_kind[k] for k in MessageKind}
        assert by_kind[MessageKind.TELEMETRY] <= LIMITS.telemetry_max_messages
        for kind in MessageKind:
            seqs = [m.seq for m in held if m.kind == kind]
            assert seqs == sorted(set(seqs))  # strictly increasing within a kind


class TestOutbox:
    def test_state_machine_agrees_with_the_model(self) -> None:
        """Random puts, peeks and acks keep order, caps and acknowledgements as documented."""
        run_state_machine_as_test(OutboxMachine, settings=MACHINE_SETTINGS)

    def test_an_ack_repeated_after_a_new_put_deletes_only_its_message(self) -> None:
        """A repeated acknowledgement never deletes a message put after the first one."""
        workdir, db = fresh_database()
        try:
            first = db.run_sync(put_op(MessageKind.RESULT, {"n": 1}))
            assert db.run_sync(lambda conn: outbox.delete_ids(conn, [first.id])) == 1
            second = db.run_sync(put_op(MessageKind.RESULT, {"n": 2}))
            assert db.run_sync(lambda conn: outbox.delete_ids(conn, [first.id])) == 0
            assert [m.body for m in db.run_sync(lambda c: outbox.peek_rows(c, 10))] == [{"n": 2}]
            assert second.seq > first.seq
            assert second.id != first.id
        finally:
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def test_a_full_outbox_refuses_upstream_jobs_in_the_submit_transaction(self) -> None:
        """The room check and the insert are one transaction: an upstream job is refused
        while results and events fill the cap, a local one is still accepted."""
        workdir, db = fresh_database()
        try:
            db.run_sync(put_op(MessageKind.RESULT, {"pad": "x" * 400}))  # results always fit
            upstream = store.JobSpec(
                kind="completion", request={"model": "m", "prompt": "p"}, report="upstream"
            )
            with pytest.raises(store.OutboxFullForJobs):
                db.run_sync(store.submit(upstream, LIMITS))
            local = store.JobSpec(kind="completion", request={"model": "m", "prompt": "p"})
            assert db.run_sync(store.submit(local, LIMITS))[1]
        finally:
            db.close()
            shutil.rmtree(workdir, ignore_errors=True)
