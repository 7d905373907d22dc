"""``GET /api/v1/events``: a server-sent-events stream of fleet changes.

::

    event: rollout
    data: {"id": "ro-3f2a...", "state": "running"}

    event: device
    data: {"id": "kiosk-17", "online": true, ...}

    : heartbeat

Notices are hints that something changed (see :mod:`edgelm_control.hub`); a client re-reads
what it shows from the REST API. A comment line every ``sse_heartbeat_s`` keeps the
connection and any proxy in between awake. A client that falls too far behind gets an
``error`` event and the stream ends; it reconnects.
"""

from __future__ import annotations

import json

from aiohttp import web

from edgelm_control.api.context import CONTEXT, REQUEST_ID
from edgelm_control.api.operations import Operation, Reply
from edgelm_control.hub import Ended, Lagging

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a reverse proxy in front must not buffer the stream
}


def sse(kind: str, data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    async with ctx.hub.subscribe() as subscription:
        ctx.metrics.sse_clients.inc()
        try:
            await response.prepare(request)
            await response.write(b": connected\n\n")
            while not ctx.draining:
                try:
                    notice = await subscription.next(ctx.sse_heartbeat_s)
                except (Lagging, Ended) as exc:
                    await response.write(sse("error", {"message": str(exc)}))
                    break
                if notice is None:
                    await response.write(b": heartbeat\n\n")
                else:
                    await response.write(sse(notice.kind, notice.data))
        except ConnectionResetError:
            pass
        finally:
            ctx.metrics.sse_clients.dec()
    return response


OPERATIONS = (
    Operation(
        "GET",
        "/api/v1/events",
        handler,
        "streamEvents",
        "Server-sent events of fleet changes: event device | rollout | job, data a JSON object.",
        {
            200: Reply(
                "An event stream (text/event-stream).", {"type": "string"}, "text/event-stream"
            )
        },
        tags=("events",),
    ),
)
