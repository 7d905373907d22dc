"""The aiohttp application: routes plus one middleware for ids, access, errors, logs, metrics."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import web

from edgelm_agent.api import health, jobs_routes, openai_routes, registry_routes, sync_routes
from edgelm_agent.api.access import HttpAccessPolicy
from edgelm_agent.api.context import (
    ALLOWED_ORIGIN,
    API_CONTEXT,
    LOG_FACTS,
    PREPARED_RESPONSE,
    REQUEST_ID,
    STARTED,
    UNKNOWN_EXPECTATION,
    ApiContext,
)
from edgelm_agent.api.errors import error_response, http_exception_response, internal_error_response
from edgelm_agent.errors import EdgelmError, ExpectationFailed, InvalidRequest, shown
from edgelm_agent.valid_unicode import describe, is_valid_text

log = structlog.get_logger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's convention for "client closed the connection"; only logged


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else "req-" + secrets.token_hex(8)


def _arrived_on_unix_socket(request: web.Request) -> bool:
    """Fail closed: only a request we can see came through the socket skips the HTTP checks."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _check_url_text(request: web.Request) -> None:
    """The path and query must be valid Unicode before any handler uses them as a job id or
    a filter: raw bytes that are not UTF-8 reach Python as lone surrogates."""
    if not is_valid_text(request.path):
        raise InvalidRequest(describe("the URL path"), param="path")
    for name, value in request.query.items():
        if not is_valid_text(name) or not is_valid_text(value):
            raise InvalidRequest(describe("a query parameter"), param="query")


async def _guarded(request: web.Request, handler: Any, ctx: ApiContext) -> web.StreamResponse:
    """Apply the HTTP listener's access policy, then run the handler."""
    _check_url_text(request)
    policy = ctx.http_policy
    if policy is not None and not _arrived_on_unix_socket(request):
        origin = request.headers.get("Origin")
        policy.check_origin(host=request.headers.get("Host"), origin=origin)
        if origin is not None:  # allowed: every response from here on carries CORS headers
            request[ALLOWED_ORIGIN] = origin
        if request.method == "OPTIONS":  # a CORS preflight: browsers send it without credentials
            return web.Response(status=204)
        policy.check_token(request.headers.get("Authorization"))
    expectation = request.get(UNKNOWN_EXPECTATION)
    if expectation is not None:
        raise ExpectationFailed(
            f"Expect: {shown(expectation)} is not supported; only 100-continue is",
            param="Expect",
        )
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def edge_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    ctx = request.app[API_CONTEXT]
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    request[STARTED] = started = time.perf_counter()
    facts: dict[str, Any] = {}
    request[LOG_FACTS] = facts
    status = 500
    task = asyncio.current_task()
    if task is not None:
        ctx.inflight.add(task)  # the daemon waits for these at shutdown
    try:
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                response = await _guarded(request, handler, ctx)
            except EdgelmError as exc:
                facts["error"] = exc.code
                response = error_response(exc)
            except web.HTTPException as exc:
                response = http_exception_response(exc)
            except (ConnectionResetError, asyncio.CancelledError):
                status = CLIENT_CLOSED
                facts["client_disconnected"] = True
                raise
            except Exception:
                log.exception("request_failed", path=request.path)
                response = internal_error_response(request_id)
            prepared = request.get(PREPARED_RESPONSE)
            if prepared is not None and response is not prepared:
                # Headers are already on the wire: a second response would corrupt the
                # stream. The handler has ended the stream; keep the one the client has.
                response = prepared
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
                origin = request.get(ALLOWED_ORIGIN)
                if origin is not None:  # errors too: the page must be able to read them
                    response.headers.update(HttpAccessPolicy.cors_headers(origin))
            return response
    finally:
        if task is not None:
            ctx.inflight.discard(task)
        ctx.metrics.requests.labels(_route_label(request), str(status)).inc()
        # 503s (loading, draining) are expected states; only a 500 means something broke.
        event = log.error if status == 500 else log.info
        event(
            "request_finished",
            request_id=request_id,
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **facts,
        )


def create_app(ctx: ApiContext, jobs: jobs_routes.JobsContext | None = None) -> web.Application:
    app = web.Application(client_max_size=ctx.max_body_bytes, middlewares=[edge_middleware])
    app[API_CONTEXT] = ctx
    if jobs is not None:
        app[jobs_routes.JOBS] = jobs
    health.add_routes(app)
    openai_routes.add_routes(app)
    registry_routes.add_routes(app)
    jobs_routes.add_routes(app)
    sync_routes.add_routes(app)
    return app
