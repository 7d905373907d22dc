"""``/api/v1/repository/root``: publish a new root (a TUF or director key rotation)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import Operation, Reply
from edgelm_control.api.requests import json_body
from edgelm_control.api.schemas import ref
from edgelm_control.errors import InvalidRequest
from edgelm_control.repository.director_keys import pem_keyid
from edgelm_control.repository.uploads import MAX_TARGETS_BYTES

#: A root is a few kilobytes; the re-signed targets that may come with it are bounded as a
#: model push's are.
MAX_ROOT_PUSH_BYTES = MAX_TARGETS_BYTES + (1 << 20)


def _metadata(body: dict[str, Any], name: str, *, required: bool) -> bytes | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"{name} must be TUF {name} metadata (a JSON object), got "
            f"{'nothing' if value is None else type(value).__name__}",
            param=name,
        )
    return json.dumps(value).encode()


async def publish_root(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await json_body(request, max_bytes=MAX_ROOT_PUSH_BYTES)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with root and targets", param="body")
    unknown = sorted(set(body) - {"root", "targets"})
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}: expected root, targets", param=unknown[0]
        )
    raw_root = _metadata(body, "root", required=True)
    assert raw_root is not None
    raw_targets = _metadata(body, "targets", required=False)
    plan, timestamp = await ctx.repository.accept_root(raw_root, raw_targets)
    return web.json_response(
        {
            "root_version": plan.version,
            "targets_resigned": plan.targets is not None,
            "targets_version": None
            if plan.targets is None
            else int(plan.targets.metadata.signed.version),
            "timestamp_version": timestamp,
            "director_keys": None
            if plan.director_keys is None
            else [pem_keyid(pem) for pem in plan.director_keys],
        },
        status=201,
    )


ERR = Reply("The root is refused; nothing changed.", ref("Error"))
_METADATA = {"type": "object", "description": "TUF metadata: signed and signatures."}

OPERATIONS = (
    Operation(
        "POST",
        "/api/v1/repository/root",
        publish_root,
        "publishRoot",
        "Publish root version N + 1 (a key rotation), with the targets re-signed if the "
        "targets key changed; devices are told to refresh.",
        {
            201: Reply(
                "Published and announced.",
                {
                    "type": "object",
                    "properties": {
                        "root_version": {"type": "integer"},
                        "targets_resigned": {"type": "boolean"},
                        "targets_version": {"type": ["integer", "null"]},
                        "timestamp_version": {"type": "integer"},
                        "director_keys": {
                            "anyOf": [
                                {"type": "array", "items": {"type": "string"}},
                                {"type": "null"},
                            ],
                            "description": "keyids of the director keys the root lists",
                        },
                    },
                    "required": [
                        "root_version",
                        "targets_resigned",
                        "targets_version",
                        "timestamp_version",
                        "director_keys",
                    ],
                },
            ),
            400: ERR,
            409: ERR,
            413: ERR,
            422: ERR,
        },
        request={
            "type": "object",
            "properties": {
                "root": _METADATA,
                "targets": {"anyOf": [_METADATA, {"type": "null"}]},
            },
            "required": ["root"],
            "additionalProperties": False,
        },
        tags=("repository",),
    ),
)
