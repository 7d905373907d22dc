"""Nothing a job holds stops the job queue, and a full disk only pauses it.

The worker runs in-process on a real SQLite database and a scripted backend, under the same
supervisor the daemon uses, so a fault can be placed at an exact moment: a full disk while a
finished job's result is being stored, or a job that raises what nobody foresaw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.services import RestartPolicy, Supervisor
from edgelm_agent.serving import ModelHost, ServingModel
from tests.fake_backend import FakeBackend

FAST = RestartPolicy(backoff_min_s=0.02, backoff_max_s=0.1, healthy_after_s=3600)


@dataclass
class Rig:
    db: Database
    backend: FakeBackend
    worker: JobWorker
    supervisor: Supervisor


@contextlib.asynccontextmanager
async def rig(pieces: list[str], *, gated: bool = False) -> AsyncIterator[Rig]:
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-worker-"))
    db = Database(workdir / "agent.db")
    backend = FakeBackend(pieces, gated=gated)
    scheduler = Scheduler(backend, max_queue=4, retry_after_s=1)
    host = ModelHost()
    host.set_active(ServingModel(backend, scheduler, context_length=4096))
    worker = JobWorker(db, host, retention_s=3600, retention_count=100, idle_poll_s=0.05)
    supervisor = Supervisor([worker], policy=FAST)
    task = asyncio.create_task(supervisor.run())
    try:
        yield Rig(db, backend, worker, supervisor)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await scheduler.close()
        db.close()
        shutil.rmtree(workdir, ignore_errors=True)


def job(prompt: str = "go", **request: Any) -> store.JobSpec:
    return store.JobSpec(
        kind="completion",
        request={"model": "fake", "prompt": prompt, "max_tokens": 8, **request},
        max_attempts=3,
    )


async def until(predicate: Callable[[], Any], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def state_of(db: Database, job_id: str) -> dict[str, Any]:
    view: dict[str, Any]
    view, _ = await db.run(store.get(job_id))
    return view


def insert_raw(db: Database, job_id: str, request_json: str) -> None:
    """A job as an older agent could have stored it, before the checks at the door."""
    db.run_sync(
        lambda c: c.execute(
            "INSERT INTO jobs (id, state, kind, priority, request, report, attempts, "
            "max_attempts, created_at, updated_at, not_before, fingerprint, model) "
            "VALUES (?, 'queued', 'completion', 0, ?, 'local', 0, 3, 1, 1, 0, 'x', 'fake')",
            (job_id, request_json),
        )
    )


class TestJobsCannotStopTheQueue:
    async def test_a_stored_lone_surrogate_fails_its_job_and_the_next_one_runs(self):
        """A prompt holding a lone surrogate (stored before the door checked) fails that job
        at once, naming the field; the worker goes on with the next job."""
        async with rig(["ok"]) as r:
            insert_raw(r.db, "job-bad", json.dumps({"model": "fake", "prompt": "h\ud800i"}))
            good, _ = await r.db.run(store.submit(job()))
            r.worker.wake()
            await until(lambda: _state_is(r.db, good["id"], "succeeded"), "the good job to succeed")
            bad = await state_of(r.db, "job-bad")
            assert bad["state"] == "failed"
            assert bad["error"]["code"] == "invalid_request"
            assert "request.prompt is not valid Unicode" in bad["error"]["message"]
            assert r.supervisor.degraded == []

    async def test_a_row_that_does_not_decode_fails_and_the_next_one_runs(self):
        """A stored job whose JSON is corrupt is failed as corrupt_job instead of being
        picked first for ever."""
        async with rig(["ok"]) as r:
            insert_raw(r.db, "job-corrupt", '{"model": "fake", "prompt": ')
            good, _ = await r.db.run(store.submit(job()))
            r.worker.wake()
            await until(lambda: _state_is(r.db, good["id"], "succeeded"), "the good job to succeed")
            raw = r.db.run_sync(
                lambda c: c.execute(
                    "SELECT state, error FROM jobs WHERE id = 'job-corrupt'"
                ).fetchone()
            )
            assert raw[0] == "failed"
            assert json.loads(raw[1])["code"] == "corrupt_job"

    async def test_an_unforeseen_exception_fails_the_attempt_not_the_worker(self, monkeypatch):
        """Whatever a job makes the code raise fails that attempt; the worker keeps serving."""
        async with rig(["ok"]) as r:
            original = ServingModel.text_prompt

            def explode(self: ServingModel, prompt: str) -> list[int]:
                if prompt == "boom":
                    raise UnicodeEncodeError("utf-8", prompt, 0, 1, "surrogates not allowed")
                return original(self, prompt)

            monkeypatch.setattr(ServingModel, "text_prompt", explode)
            boom, _ = await r.db.run(store.submit(job("boom")))
            good, _ = await r.db.run(store.submit(job("fine")))
            r.worker.wake()
            await until(lambda: _state_is(r.db, good["id"], "succeeded"), "the good job to succeed")
            failed = await state_of(r.db, boom["id"])
            assert failed["error"]["code"] == "internal_error"
            assert failed["state"] in ("queued", "dead")  # retried with backoff, then dead
            assert r.supervisor.degraded == []


class TestFullDisk:
    async def test_full_disk_while_storing_a_result_pauses_the_queue_and_loses_nothing(self):
        """The disk fills while a finished job's result is stored: the worker fails, the
        agent reports itself degraded, and once there is room again the job runs again and
        its result is stored; the next job runs too."""
        big = ["x" * 4000] * 6  # a result that needs new pages
        async with rig(big, gated=True) as r:
            first, _ = await r.db.run(store.submit(job("first", max_tokens=6)))
            r.worker.wake()
            await until(lambda: _flag(r.backend.started.is_set()), "the job to start")
            pages = r.db.run_sync(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            r.db.run_sync(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
            r.backend.release(6)  # the generation ends; storing its result hits the full disk
            await until(lambda: _flag(r.supervisor.degraded == ["jobs"]), "degraded")
            (health,) = r.supervisor.health()
            assert "full" in (health.last_error or "")
            assert (await state_of(r.db, first["id"]))["state"] in ("running", "queued")

            r.db.run_sync(lambda c: c.execute("PRAGMA max_page_count = 1000000"))  # room again
            r.backend.release(6)  # the retry runs the same generation again
            await until(lambda: _state_is(r.db, first["id"], "succeeded"), "the job to succeed")
            done = await state_of(r.db, first["id"])
            assert done["result"]["choices"][0]["text"] == "".join(big)
            second, _ = await r.db.run(store.submit(job("second", max_tokens=6)))
            r.worker.wake()
            r.backend.release(6)
            await until(lambda: _state_is(r.db, second["id"], "succeeded"), "the next job")
            (health,) = r.supervisor.health()
            assert health.restarts >= 1


async def _state_is(db: Database, job_id: str, state: str) -> bool:
    return bool((await state_of(db, job_id))["state"] == state)


async def _flag(value: bool) -> bool:
    return value
