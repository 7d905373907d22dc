"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from edgelm_agent.api.context import API_CONTEXT, ApiContext


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about the model."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a model is loaded, answered its warm-up, is not failing request after request,
    every long-running service is healthy, and we are not shutting down."""
    ctx = request.app[API_CONTEXT]
    host = ctx.host
    active = host.active
    services = {h.name: h.as_dict() for h in ctx.services.health()} if ctx.services else {}
    failing = [name for name, h in services.items() if not h["healthy"]]
    if host.draining:
        return web.json_response({"status": "draining"}, status=503)
    if host.embeddings.loading:  # a client that waits for ready may embed right away
        return web.json_response({"status": "loading", "loading": "embedding_model"}, status=503)
    if active is None:
        if host.starting:
            return web.json_response({"status": "loading"}, status=503)
        hint = (
            "no model is active; the fleet's next desired state brings one"
            if ctx.sync is not None
            else "no model is active; import one with `edgelm models import PATH`"
        )
        body: dict[str, object] = {"status": "no_model", "message": hint, "services": services}
        if failing:
            body["failing_services"] = failing
        if ctx.sync is not None:
            body["sync"] = await _sync_details(ctx)
        return web.json_response(body, status=503)
    if active.health.degraded or failing:
        body = {"status": "degraded", "model": active.model_id}
        if active.health.degraded:
            body["consecutive_failures"] = active.health.count
        if failing:
            body["failing_services"] = failing
        body["services"] = services
        return web.json_response(body, status=503)
    ready: dict[str, object] = {
        "status": "ready",
        "model": active.model_id,
        "queue_depth": active.scheduler.queue_depth,
        "busy": active.scheduler.busy,
        "services": services,
    }
    if ctx.sync is not None:  # offline is normal: it is said, it never makes a device unready
        ready["sync"] = await _sync_details(ctx)
    return web.json_response(ready)


async def _sync_details(ctx: ApiContext) -> dict[str, object]:
    assert ctx.sync is not None
    status = ctx.sync.status()
    sync = {**status["broker"], "applied_sequence": status["desired"]["applied_sequence"]}
    if ctx.outbox is not None:  # an outbox that only grows means the link is not draining
        counts = await ctx.outbox.counts()
        sync["outbox"] = {str(kind): n for kind, n in counts.items()}
    return sync


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[API_CONTEXT]
    active = ctx.host.active
    ctx.metrics.queue_depth.set(active.scheduler.queue_depth if active else 0)
    return web.Response(
        body=ctx.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
