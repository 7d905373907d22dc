"""The aiohttp application: routes plus one middleware for ids, access, errors, logs, metrics."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import structlog
from aiohttp import web

from edgelm_agent import __version__
from edgelm_agent.api import (
    embeddings_routes,
    health,
    jobs_routes,
    openai_routes,
    openapi,
    registry_routes,
    sync_routes,
)
from edgelm_agent.api.access import HttpAccessPolicy, needs_admin, needs_token
from edgelm_agent.api.context import (
    ALLOWED_ORIGIN,
    API_CONTEXT,
    CLIENT_LIMITER,
    LOG_FACTS,
    PREPARED_RESPONSE,
    REQUEST_ID,
    STARTED,
    UNKNOWN_EXPECTATION,
    ApiContext,
)
from edgelm_agent.api.errors import error_response, http_exception_response, internal_error_response
from edgelm_agent.api.rate_limit import ClientLimiter, client_key
from edgelm_agent.errors import EdgelmError, ExpectationFailed, InvalidRequest, RateLimited, shown
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
    """Apply the HTTP listener's access policy and per-client limits, then run the handler.
    The Unix socket is guarded by its file mode and group, and is not rate limited."""
    _check_url_text(request)
    policy = ctx.http_policy
    client: str | None = None
    if policy is not None and not _arrived_on_unix_socket(request):
        origin = request.headers.get("Origin")
        policy.check_origin(host=request.headers.get("Host"), origin=origin)
        if origin is not None:  # allowed: every response from here on carries CORS headers
            request[ALLOWED_ORIGIN] = origin
        if request.method == "OPTIONS":  # a CORS preflight: browsers send it without credentials
            return web.Response(status=204)
        authorization = request.headers.get("Authorization")
        if needs_admin(request.method, _route_label(request)):
            policy.check_admin(authorization)
        elif needs_token(request.path):
            policy.check_token(authorization)
        client = _admit(request, authorization)
    try:
        expectation = request.get(UNKNOWN_EXPECTATION)
        if expectation is not None:
            raise ExpectationFailed(
                f"Expect: {shown(expectation)} is not supported; only 100-continue is",
                param="Expect",
            )
        response: web.StreamResponse = await handler(request)
        return response
    finally:
        if client is not None:
            request.app[CLIENT_LIMITER].release(client)


def _admit(request: web.Request, authorization: str | None) -> str | None:
    """Count the request against its client's limits; the key to release, or a 429."""
    limiter = request.app.get(CLIENT_LIMITER)
    if limiter is None:
        return None
    client, who = client_key(authorization, request.remote)
    refusal = limiter.admit(client, time.monotonic())
    if refusal is None:
        return client
    limits = limiter.limits
    if refusal.reason == "concurrency":
        raise RateLimited(
            f"{who} has {limits.max_concurrent} requests in flight, the most allowed per "
            "client (http_client_max_concurrent); wait for one to finish",
            retry_after_s=refusal.retry_after_s,
            code="too_many_requests_in_flight",
        )
    raise RateLimited(
        f"{who} sent more than {limits.rate_per_s:g} requests per second (burst "
        f"{limits.burst}; http_client_rate_per_s, http_client_burst); retry after "
        f"{refusal.retry_after_s} s",
        retry_after_s=refusal.retry_after_s,
    )


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
    if ctx.http_policy is not None:
        app[CLIENT_LIMITER] = ClientLimiter(ctx.http_policy.client_limits)
    if jobs is not None:
        app[jobs_routes.JOBS] = jobs
    health.add_routes(app)
    openai_routes.add_routes(app)
    embeddings_routes.add_routes(app)
    registry_routes.add_routes(app)
    jobs_routes.add_routes(app)
    sync_routes.add_routes(app)
    openapi.register(app, __version__)
    return app
