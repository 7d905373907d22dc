"""``/healthz`` (alive), ``/readyz`` (store and broker reachable), ``/metrics``, and the
OpenAPI document. Health and metrics need no token: load balancers and Prometheus call them."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import Operation, Reply
from edgelm_control.api.schemas import ref
from edgelm_control.errors import StoreUnavailable

OPENAPI = web.AppKey("edgelm_control_openapi", dict)


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about the store or the broker."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers and the broker link is up (and we are not stopping)."""
    ctx = request.app[CONTEXT]
    checks: dict[str, str] = {}
    try:
        await ctx.store.ping(timeout_s=5.0)
        checks["store"] = "ok"
    except StoreUnavailable as exc:
        checks["store"] = str(exc)
    checks["broker"] = "ok" if ctx.link.connected else "not connected"
    if ctx.draining:
        checks["server"] = "stopping"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "fleet": ctx.fleet, "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    ctx.metrics.broker_connected.set(1 if ctx.link.connected else 0)
    return web.Response(
        body=ctx.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


OPERATIONS = (
    Operation(
        "GET",
        "/healthz",
        healthz,
        "healthz",
        "Liveness.",
        {200: Reply("Alive.", ref("Status"))},
        public=True,
        tags=("health",),
    ),
    Operation(
        "GET",
        "/readyz",
        readyz,
        "readyz",
        "Readiness: the store answers and the broker link is up.",
        {200: Reply("Ready.", ref("Status")), 503: Reply("Not ready, and why.", ref("Status"))},
        public=True,
        tags=("health",),
    ),
    Operation(
        "GET",
        "/metrics",
        metrics,
        "metrics",
        "Prometheus metrics.",
        {200: Reply("The text exposition format.", {"type": "string"}, "text/plain")},
        public=True,
        tags=("health",),
    ),
    Operation(
        "GET",
        "/api/v1/openapi.json",
        openapi,
        "openapi",
        "This document.",
        {200: Reply("The OpenAPI 3.1 document.", {"type": "object"})},
        tags=("meta",),
    ),
)
