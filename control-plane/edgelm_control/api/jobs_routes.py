"""``/api/v1/jobs``: remote jobs to a device or a selection, with per-device results."""

from __future__ import annotations

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import CURSOR, LIMIT, Operation, Param, Reply
from edgelm_control.api.requests import decode_cursor, json_body, limit_of, page
from edgelm_control.api.schemas import ref
from edgelm_control.api.views import job_view
from edgelm_control.errors import NotFound
from edgelm_control.jobs.service import parse_job_request
from edgelm_control.store.jobs import get_job, job_device_rows, list_jobs, results_of


async def _job(request: web.Request, job_id: str, status: int = 200) -> web.Response:
    ctx = request.app[CONTEXT]
    async with ctx.store.read() as conn:
        job = await get_job(conn, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", param="id")
        rows = await job_device_rows(conn, job_id)
        results = await results_of(conn, [r.result_message_id for r in rows if r.result_message_id])
    return web.json_response(job_view(job, rows, results), status=status)


async def submit_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await json_body(request, max_bytes=ctx.max_body_bytes)
    job_id = await ctx.jobs.submit(parse_job_request(body))
    response = await _job(request, job_id, status=201)
    response.headers["Location"] = f"/api/v1/jobs/{job_id}"
    return response


async def show_handler(request: web.Request) -> web.Response:
    return await _job(request, request.match_info["id"])


async def list_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    limit = limit_of(request)
    cursor = decode_cursor(request, int, str)
    after = None if cursor is None else (cursor[0], cursor[1])
    async with ctx.store.read() as conn:
        found = await list_jobs(conn, after=after, limit=limit + 1)
        more = len(found) > limit
        found = found[:limit]
        views = []
        for job in found:
            rows = await job_device_rows(conn, job.job_id)
            ids = [r.result_message_id for r in rows if r.result_message_id]
            views.append(job_view(job, rows, await results_of(conn, ids)))
    next_key = [found[-1].created_ms, found[-1].job_id] if more else None
    return web.json_response(page(views, next_key))


ERR = Reply("The request is refused.", ref("Error"))

OPERATIONS = (
    Operation(
        "POST",
        "/api/v1/jobs",
        submit_handler,
        "submitJob",
        "Send a remote job (an OpenAI chat or completion request) to the selected devices.",
        {201: Reply("Stored and sent.", ref("Job")), 400: ERR, 413: ERR, 422: ERR},
        request=ref("JobRequest"),
        tags=("jobs",),
    ),
    Operation(
        "GET",
        "/api/v1/jobs",
        list_handler,
        "listJobs",
        "Remote jobs, newest first.",
        {200: Reply("A page of jobs.", ref("JobPage")), 400: ERR},
        params=(LIMIT, CURSOR),
        tags=("jobs",),
    ),
    Operation(
        "GET",
        "/api/v1/jobs/{id}",
        show_handler,
        "getJob",
        "A job and each device's state, result or error.",
        {200: Reply("The job.", ref("Job")), 404: ERR},
        params=(Param("id", "path", {"type": "string"}, "The job id."),),
        tags=("jobs",),
    ),
)
