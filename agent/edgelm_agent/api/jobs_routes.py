"""``/v1/jobs``: durable asynchronous generation jobs.

``POST /v1/jobs`` answers 202 once the job is on disk (fsynced): from then on it survives
crashes and power cuts, and runs when the model is free.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from edgelm_agent.api.openai_routes import read_json
from edgelm_agent.errors import InvalidRequest, ModelNotFound, NotReady, shown
from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.outbox import OutboxLimits
from edgelm_agent.jobs.submission import parse_job
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.model_manager import ModelManager

MAX_LIST = 500
MAX_CURSOR = 2**63 - 1  # a job sequence number is an SQLite integer


@dataclass(frozen=True)
class JobsContext:
    db: Database
    worker: JobWorker
    outbox_limits: OutboxLimits
    #: Which models exist, so a job for a model that does not is refused at once;
    #: ``None`` skips the check (tests with a bare model).
    models: ModelManager | None = None
    #: How many jobs, and how many bytes of them, may wait at once.
    queue_limits: store.QueueLimits = field(default_factory=store.QueueLimits)


JOBS = web.AppKey("jobs", JobsContext)


def _jobs(request: web.Request) -> JobsContext:
    jobs = request.app.get(JOBS)
    if jobs is None:
        raise NotReady("this agent has no job queue", retry_after_s=60)
    return jobs


def _with_position(job: dict[str, Any], position: int | None) -> dict[str, Any]:
    return {**job, "position": position}


async def submit(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    spec = parse_job(await read_json(request), time.time())
    if jobs.models is not None and not spec.wait_for_model:
        known = await jobs.models.known_models()
        if spec.model not in known:
            raise ModelNotFound(spec.model, sorted(known), what="installed or offered")
    job, created = await jobs.db.run(store.submit(spec, jobs.outbox_limits, jobs.queue_limits))
    if created:
        jobs.worker.wake()
    position = await jobs.db.read(store.position(job["id"]))
    # 202 for a new job; 200 when an idempotency key matched a job submitted before.
    return web.json_response(_with_position(job, position), status=202 if created else 200)


async def show(request: web.Request) -> web.Response:
    job, position = await _jobs(request).db.read(store.get(request.match_info["job_id"]))
    return web.json_response(_with_position(job, position))


def _query_int(
    query: Mapping[str, str], name: str, default: int | None, lo: int, hi: int
) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    # Checked before int(): past 4,300 digits int() itself refuses, with a ValueError.
    if (
        not raw.isascii()
        or not raw.isdigit()
        or len(raw) > len(str(hi))
        or not lo <= int(raw) <= hi
    ):
        raise InvalidRequest(
            f"{name!r} must be an integer from {lo} to {hi}, got {shown(raw)}", param=name
        )
    return int(raw)


async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    limit = _query_int(query, "limit", 50, 1, MAX_LIST)
    cursor = _query_int(query, "cursor", None, 0, MAX_CURSOR)
    assert limit is not None
    jobs, next_cursor = await _jobs(request).db.run(
        store.list_jobs(query.get("state"), limit, cursor)
    )
    return web.json_response(
        {"object": "list", "data": jobs, "next_cursor": str(next_cursor) if next_cursor else None}
    )


async def cancel(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job, was_running = await jobs.db.run(store.cancel(request.match_info["job_id"]))
    if was_running:
        jobs.worker.cancel(job["id"])
    return web.json_response(job)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", show)
    app.router.add_delete("/v1/jobs/{job_id}", cancel)
