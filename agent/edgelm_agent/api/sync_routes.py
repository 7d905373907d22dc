"""``GET /v1/sync``: the device's link to its fleet: broker, desired state, outbox."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edgelm_agent.api.context import API_CONTEXT


async def sync_status(request: web.Request) -> web.Response:
    ctx = request.app[API_CONTEXT]
    body: dict[str, Any] = {"enrolled": ctx.sync is not None}
    if ctx.sync is not None:
        body.update(ctx.sync.status())
    if ctx.outbox is not None:
        body["outbox"] = {str(k): n for k, n in (await ctx.outbox.counts()).items()}
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sync", sync_status)
