"""The aiohttp application: every route as an :class:`~.operations.Operation`, and one
middleware for request ids, the operator token, errors, logs and metrics.

Every path under ``/api/`` needs an operator token, except the operations marked public;
the check runs before routing's answer is used, so an unknown ``/api/...`` path answers 401
to a caller without a token rather than telling it which paths exist. Health, metrics and
the repository are public.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import web

from edgelm_control.api import (
    devices_routes,
    events_routes,
    health_routes,
    jobs_routes,
    models_routes,
    repository_routes,
    rollouts_routes,
    root_routes,
    telemetry_routes,
)
from edgelm_control.api.context import CONTEXT, REQUEST_ID, ApiContext
from edgelm_control.api.errors import (
    error_response,
    http_exception_response,
    internal_error_response,
)
from edgelm_control.api.openapi import build_openapi
from edgelm_control.api.operations import Operation, register
from edgelm_control.errors import ControlError, InvalidRequest

log = structlog.get_logger(__name__)

VERSION = "1.0.0"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's convention for "client closed the connection"; only logged

OPERATIONS: tuple[Operation, ...] = (
    *health_routes.OPERATIONS,
    *devices_routes.OPERATIONS,
    *models_routes.OPERATIONS,
    *rollouts_routes.OPERATIONS,
    *jobs_routes.OPERATIONS,
    *telemetry_routes.OPERATIONS,
    *events_routes.OPERATIONS,
    *repository_routes.OPERATIONS,
    *root_routes.OPERATIONS,
)
PUBLIC = frozenset(op.operation_id for op in OPERATIONS if op.public)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else "req-" + secrets.token_hex(8)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _check_url_text(request: web.Request) -> None:
    # Bytes that are not UTF-8 reach Python as lone surrogates; refuse them before any
    # handler uses the path or a query value as an id or a filter.
    try:
        request.path.encode()
        for name, value in request.query.items():
            name.encode()
            value.encode()
    except UnicodeEncodeError:
        raise InvalidRequest("the URL must be valid UTF-8", param="path") from None


async def _guarded(request: web.Request, handler: Any, ctx: ApiContext) -> web.StreamResponse:
    _check_url_text(request)
    if request.path.startswith("/api/") and request.match_info.route.name not in PUBLIC:
        await ctx.tokens.check(request.headers.get("Authorization"))
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def control_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    error: str | None = None
    task = asyncio.current_task()
    if task is not None:
        ctx.inflight.add(task)
    try:
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                response = await _guarded(request, handler, ctx)
            except ControlError as exc:
                error = exc.code
                response = error_response(exc)
            except web.HTTPException as exc:
                response = http_exception_response(exc)
            except (ConnectionResetError, asyncio.CancelledError):
                status = CLIENT_CLOSED
                raise
            except Exception:
                log.exception("request_failed", path=request.path)
                response = internal_error_response(request_id)
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
    finally:
        if task is not None:
            ctx.inflight.discard(task)
        ctx.metrics.requests.labels(_route_label(request), str(status)).inc()
        event = log.error if status == 500 else log.info
        event(
            "request_finished",
            request_id=request_id,
            method=request.method,
            path=request.path,
            status=status,
            error=error,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )


def create_app(ctx: ApiContext) -> web.Application:
    # The size limit of JSON bodies is checked per route (json_body); uploads stream.
    app = web.Application(middlewares=[control_middleware], client_max_size=ctx.max_body_bytes)
    app[CONTEXT] = ctx
    app[health_routes.OPENAPI] = build_openapi(OPERATIONS, version=VERSION)
    register(app, OPERATIONS)
    return app
