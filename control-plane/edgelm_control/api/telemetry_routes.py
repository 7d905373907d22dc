"""``/api/v1/telemetry``: rows per device, or fleet aggregates per model and hardware class.

``?device=kiosk-17&since=...&until=...`` pages through rows in the order they were stored;
``?group_by=model,hardware_class&since=...`` aggregates the window (default: the last hour;
with ``device``, of that device's rows): count, requests, errors, and the medians of the
devices' p50 tokens/s and TTFT. ``since`` and ``until`` are Unix milliseconds, as the
telemetry rows store them; ``limit`` and ``cursor`` page rows only.
"""

from __future__ import annotations

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import CURSOR, LIMIT, Operation, Param, Reply
from edgelm_control.api.request_schemas import DEVICE_ID, GROUP_BY, INT64
from edgelm_control.api.requests import decode_cursor, int_query, limit_of, page
from edgelm_control.api.schemas import ref
from edgelm_control.api.views import aggregate_view, telemetry_view
from edgelm_control.errors import InvalidRequest
from edgelm_control.store.telemetry import GROUP_KEYS, aggregate_telemetry, query_telemetry
from edgelm_protocol import InvalidId, check_device_id

DEFAULT_WINDOW_MS = 3600 * 1000


def group_by_keys(text: str) -> list[str]:
    """The keys of ``group_by``: comma-separated, distinct, from :data:`GROUP_KEYS`."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in GROUP_KEYS]
    if not keys or bad or len(set(keys)) != len(keys):
        raise InvalidRequest(
            f"group_by takes distinct keys from {', '.join(GROUP_KEYS)}, got {text!r}",
            param="group_by",
        )
    return keys


async def handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    since = int_query(request, "since")
    until = int_query(request, "until")
    # Every parameter is checked whichever form is asked for: a bad one is never ignored.
    device = request.query.get("device")
    if device is not None:
        try:
            check_device_id(device)
        except InvalidId as exc:
            raise InvalidRequest(str(exc), param="device") from None
    limit = limit_of(request)
    cursor = decode_cursor(request, int)
    group_by = request.query.get("group_by")
    if group_by is not None:
        keys = group_by_keys(group_by)
        start = since if since is not None else ctx.clock.now_ms() - DEFAULT_WINDOW_MS
        async with ctx.store.read() as conn:
            aggregates, truncated = await aggregate_telemetry(
                conn, group_by=keys, since_ms=start, until_ms=until, device_id=device
            )
        return web.json_response(
            {"data": [aggregate_view(a) for a in aggregates], "truncated": truncated}
        )
    async with ctx.store.read() as conn:
        rows = await query_telemetry(
            conn,
            device_id=device,
            since_ms=since,
            until_ms=until,
            after_id=None if cursor is None else cursor[0],
            limit=limit + 1,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response(
        page([telemetry_view(r) for r in rows], [rows[-1].id] if more else None)
    )


OPERATIONS = (
    Operation(
        "GET",
        "/api/v1/telemetry",
        handler,
        "getTelemetry",
        "Telemetry rows (per device) or aggregates (group_by=model,hardware_class).",
        {
            200: Reply(
                "Rows (TelemetryPage) or, with group_by, aggregates (TelemetryAggregates).",
                {"oneOf": [ref("TelemetryPage"), ref("TelemetryAggregates")]},
            ),
            400: Reply("The request is refused.", ref("Error")),
        },
        params=(
            Param("device", "query", DEVICE_ID, "Only this device's rows (or aggregates)."),
            Param("since", "query", INT64, "Unix ms, inclusive."),
            Param("until", "query", INT64, "Unix ms, exclusive."),
            Param(
                "group_by",
                "query",
                GROUP_BY,
                "Comma-separated, from: model, hardware_class, device.",
            ),
            LIMIT,
            CURSOR,
        ),
        tags=("telemetry",),
    ),
)
