"""``/api/v1/models``: the fleet's model targets, and pushing a new signed one."""

from __future__ import annotations

import asyncio

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import Operation, Reply
from edgelm_control.api.requests import page
from edgelm_control.api.schemas import ref
from edgelm_control.api.views import model_view
from edgelm_control.repository.uploads import receive_push
from edgelm_control.store.models import list_models


async def list_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    async with ctx.store.read() as conn:
        models = await list_models(conn)
    return web.json_response(page([model_view(m) for m in models], None))


async def push_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    repository = ctx.repository
    upload = await receive_push(
        request,
        repository.incoming_dir,
        max_bytes=ctx.max_upload_bytes,
        check_targets=repository.precheck,
    )
    try:
        added = await repository.accept_push(upload)
    finally:
        await asyncio.to_thread(upload.discard)
    async with ctx.store.read() as conn:
        models = {m.path: m for m in await list_models(conn)}
    views = [model_view(models[m.path]) for m in added if m.path in models]
    version = max((m.targets_version for m in models.values()), default=0)
    return web.json_response({"added": views, "targets_version": version}, status=201)


ERR = Reply("The push is refused; nothing was published.", ref("Error"))

OPERATIONS = (
    Operation(
        "GET",
        "/api/v1/models",
        list_handler,
        "listModels",
        "The model targets in the fleet's TUF repository.",
        {200: Reply("Every target (one page).", ref("ModelPage"))},
        tags=("models",),
    ),
    Operation(
        "POST",
        "/api/v1/models",
        push_handler,
        "pushModel",
        "Publish a model: new signed targets metadata (version + 1) and the blobs it adds.",
        {
            201: Reply("Published and announced.", ref("ModelPushed")),
            400: ERR,
            409: ERR,
            413: ERR,
            422: ERR,
        },
        request=ref("ModelPush"),
        request_type="multipart/form-data",
        tags=("models",),
    ),
)
