"""``/v1/registry/...``: list, import, install, activate, roll back, verify and clean models.

These change what the device runs, so they are served on the Unix socket and, like every
route, behind the HTTP listener's access policy. Long operations answer when done; the CLI shows
a spinner meanwhile.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm_agent.api.context import API_CONTEXT
from edgelm_agent.api.openai_routes import read_json
from edgelm_agent.errors import InvalidRequest, NotReady
from edgelm_agent.inference.types import MIN_CONTEXT_LENGTH
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.state import RegistryState


def _manager(request: web.Request) -> ModelManager:
    manager = request.app[API_CONTEXT].models
    if manager is None:
        raise NotReady("this agent has no registry", retry_after_s=60)
    return manager


def _str_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name!r} must be a non-empty string", param=name)
    return value


def state_view(state: RegistryState, history: int = 50) -> dict[str, Any]:
    return {
        "active": state.active,
        "previous": state.previous,
        "pinned": sorted(state.pinned),
        "models": [
            {
                **t.as_dict(),
                "ref": ref,
                "active": ref == state.active,
                "previous": ref == state.previous,
                "pinned": ref in state.pinned,
            }
            for ref, t in sorted(state.models.items())
        ],
        "history": [asdict(h) for h in state.history[-history:]],
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(state_view(_manager(request).registry.state()))


async def import_model(request: web.Request) -> web.Response:
    body = await read_json(request)
    path = Path(_str_field(body, "path") or "")
    if not path.is_absolute():
        raise InvalidRequest(
            "'path' must be absolute: the agent resolves it, not the client", param="path"
        )
    context_length = body.get("context_length", 4096)
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or context_length < MIN_CONTEXT_LENGTH
    ):
        raise InvalidRequest(
            f"'context_length' must be an integer of at least {MIN_CONTEXT_LENGTH}",
            param="context_length",
        )
    manager = _manager(request)
    target = await manager.exclusive(
        manager.registry.import_model,
        path,
        name=_str_field(body, "name", required=False),
        version=_str_field(body, "version", required=False),
        context_length=context_length,
    )
    return web.json_response(target.as_dict(), status=201)


async def install_model(request: web.Request) -> web.Response:
    body = await read_json(request)
    manager = _manager(request)
    target = await manager.exclusive(
        manager.registry.install,
        _str_field(body, "name") or "",
        _str_field(body, "version", required=False),
    )
    return web.json_response(target.as_dict(), status=201)


async def available_models(request: web.Request) -> web.Response:
    manager = _manager(request)
    offered = await manager.exclusive(manager.registry.available)
    return web.json_response({"models": [t.as_dict() for _, t in sorted(offered.items())]})


async def activate(request: web.Request) -> web.Response:
    body = await read_json(request)
    target = await _manager(request).activate(_str_field(body, "model") or "")
    return web.json_response(target.as_dict())


async def rollback(request: web.Request) -> web.Response:
    target = await _manager(request).rollback()
    return web.json_response(target.as_dict())


async def verify(request: web.Request) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    manager = _manager(request)
    results = await manager.exclusive(
        manager.registry.verify, _str_field(body, "model", required=False)
    )
    # 200 either way: the check ran, and its findings are the answer. (A 4xx here made
    # clients, the CLI among them, drop the results that say which model failed and why.)
    ok = all(r.ok for r in results)
    return web.json_response({"ok": ok, "results": [asdict(r) for r in results]})


async def gc(request: web.Request) -> web.Response:
    manager = _manager(request)
    removed, freed = await manager.exclusive(manager.registry.gc)
    return web.json_response({"removed": removed, "freed_bytes": freed})


async def pin(request: web.Request) -> web.Response:
    body = await read_json(request)
    pinned = body.get("pinned", True)
    if not isinstance(pinned, bool):
        raise InvalidRequest("'pinned' must be true or false", param="pinned")
    manager = _manager(request)
    target = await manager.exclusive(manager.registry.pin, _str_field(body, "model") or "", pinned)
    return web.json_response({**target.as_dict(), "pinned": pinned})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/registry/models", list_models)
    app.router.add_get("/v1/registry/available", available_models)
    app.router.add_post("/v1/registry/import", import_model)
    app.router.add_post("/v1/registry/install", install_model)
    app.router.add_post("/v1/registry/activate", activate)
    app.router.add_post("/v1/registry/rollback", rollback)
    app.router.add_post("/v1/registry/verify", verify)
    app.router.add_post("/v1/registry/gc", gc)
    app.router.add_post("/v1/registry/pin", pin)
