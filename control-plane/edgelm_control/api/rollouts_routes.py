"""``/api/v1/rollouts``: create, list, show, pause, resume, abort."""

from __future__ import annotations

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import CURSOR, LIMIT, Handler, Operation, Param, Reply
from edgelm_control.api.requests import decode_cursor, json_body, limit_of, page
from edgelm_control.api.schemas import ROLLOUT_STATES, ref
from edgelm_control.api.views import rollout_detail, rollout_summary
from edgelm_control.errors import InvalidRequest, NotFound
from edgelm_control.rollouts.request import parse_rollout_request
from edgelm_control.rollouts.rollout_states import RolloutState
from edgelm_control.store.rollouts import (
    get_rollout,
    get_waves,
    list_rollouts,
    rows_of,
    state_counts,
)


async def _detail(request: web.Request, rollout_id: str) -> web.Response:
    ctx = request.app[CONTEXT]
    async with ctx.store.read() as conn:
        rollout = await get_rollout(conn, rollout_id)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id}", param="id")
        waves = await get_waves(conn, rollout_id)
        rows = await rows_of(conn, rollout_id)
    return web.json_response(rollout_detail(rollout, waves, rows))


async def create_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await json_body(request, max_bytes=ctx.max_body_bytes)
    parsed = parse_rollout_request(
        body, device_timeout_s=ctx.device_timeout_s, pending_expiry_s=ctx.pending_expiry_s
    )
    rollout_id = await ctx.engine.create(parsed)
    response = await _detail(request, rollout_id)
    response.set_status(201)
    response.headers["Location"] = f"/api/v1/rollouts/{rollout_id}"
    return response


async def list_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    raw_state = request.query.get("state")
    state = None
    if raw_state is not None:
        try:
            state = RolloutState(raw_state)
        except ValueError:
            raise InvalidRequest(
                f"state must be one of {', '.join(ROLLOUT_STATES)}, got {raw_state!r}",
                param="state",
            ) from None
    limit = limit_of(request)
    cursor = decode_cursor(request, int, str)
    after = None if cursor is None else (cursor[0], cursor[1])
    async with ctx.store.read() as conn:
        found = await list_rollouts(conn, state=state, after=after, limit=limit + 1)
        more = len(found) > limit
        found = found[:limit]
        counts = await state_counts(conn, [r.rollout_id for r in found])
    data = [rollout_summary(r, counts.get(r.rollout_id, {})) for r in found]
    return web.json_response(page(data, list(found[-1].order_key) if more else None))


async def show_handler(request: web.Request) -> web.Response:
    return await _detail(request, request.match_info["id"])


def _operator(action: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        rollout_id = request.match_info["id"]
        await getattr(ctx.engine, action)(rollout_id)
        return await _detail(request, rollout_id)

    handler.__name__ = f"{action}_handler"
    return handler


ID = Param("id", "path", {"type": "string"}, "The rollout id.")
ERR = Reply("The request is refused.", ref("Error"))


def _operator_operation(action: str, summary: str) -> Operation:
    return Operation(
        "POST",
        f"/api/v1/rollouts/{{id}}/{action}",
        _operator(action),
        f"{action}Rollout",
        summary,
        {200: Reply("The rollout after the action.", ref("Rollout")), 404: ERR, 409: ERR},
        params=(ID,),
        tags=("rollouts",),
    )


OPERATIONS = (
    Operation(
        "POST",
        "/api/v1/rollouts",
        create_handler,
        "createRollout",
        "Roll a model out to a selection of devices, in waves; the first wave starts at once.",
        {
            201: Reply("Created; its first wave has started.", ref("Rollout")),
            400: ERR,
            404: ERR,
            422: ERR,
        },
        request=ref("RolloutRequest"),
        tags=("rollouts",),
    ),
    Operation(
        "GET",
        "/api/v1/rollouts",
        list_handler,
        "listRollouts",
        "Rollouts, newest first, with counts of devices per state.",
        {200: Reply("A page of rollouts.", ref("RolloutPage")), 400: ERR},
        params=(
            Param("state", "query", {"enum": ROLLOUT_STATES}, "Only rollouts in this state."),
            LIMIT,
            CURSOR,
        ),
        tags=("rollouts",),
    ),
    Operation(
        "GET",
        "/api/v1/rollouts/{id}",
        show_handler,
        "getRollout",
        "A rollout: its waves with verdicts and reasons, and every device's state and reason.",
        {200: Reply("The rollout.", ref("Rollout")), 404: ERR},
        params=(ID,),
        tags=("rollouts",),
    ),
    _operator_operation("pause", "Hold a running rollout: no further wave starts."),
    _operator_operation(
        "resume", "Resume a paused rollout, or accept a failed wave and move on (halted)."
    ),
    _operator_operation(
        "abort",
        "Abort: devices not started are cancelled, downloads stop, switched devices roll back.",
    ),
)
