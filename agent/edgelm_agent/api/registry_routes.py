"""``/v1/registry/...``: list, import, install, activate, roll back, verify and clean models.

These change what the device runs, so every one but the reads is an admin operation
(:func:`edgelm_agent.api.access.needs_admin`): open to the Unix socket's group, and over HTTP
only with the ``admin_token``. Long operations answer when done; the CLI shows
a spinner meanwhile. A client that hangs up cancels its import, install or verification, which
stops at its next chunk.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from edgelm_agent.api.context import API_CONTEXT
from edgelm_agent.api.openai_routes import read_json
from edgelm_agent.errors import InvalidRequest, NotReady, shown
from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.errors import InvalidModelMetadata
from edgelm_agent.registry.model_target import (
    GENERATION,
    ROLES,
    check_name,
    check_presets,
    check_version,
)
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


def _model_field(body: dict[str, Any], name: str, check: Any) -> str | None:
    """An optional model name or version, checked here so a bad one is the client's 400
    naming the field, not a 422 about signed metadata."""
    value = _str_field(body, name, required=False)
    if value is None:
        return None
    try:
        checked: str = check(value)
    except InvalidModelMetadata:
        raise InvalidRequest(
            f"{name!r} must be 1-64 characters of a-z 0-9 . _ -, starting with a letter or "
            f"digit; got {shown(value)}",
            param=name,
        ) from None
    return checked


def _presets_field(body: dict[str, Any], context_length: int) -> dict[str, Any] | None:
    """The presets to sign with an import, checked here so a bad one is the client's 400
    naming the field (and the preset), not a 422 about signed metadata."""
    presets = body.get("presets")
    if presets is None:
        return None
    try:
        check_presets(presets, context_length=context_length)
    except InvalidModelMetadata as exc:
        raise InvalidRequest(str(exc), param="presets") from exc
    return dict(presets)


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
    text = _str_field(body, "path") or ""
    if "\x00" in text:  # no file has one in its name; os.open would raise ValueError: a 500
        raise InvalidRequest("'path' must not contain a NUL character", param="path")
    path = Path(text)
    if not path.is_absolute():
        raise InvalidRequest(
            "'path' must be absolute: the agent resolves it, not the client", param="path"
        )
    context_length = body.get("context_length", 4096)
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, int)
        or not MIN_CONTEXT_LENGTH <= context_length <= MAX_CONTEXT_LENGTH
    ):
        raise InvalidRequest(
            f"'context_length' must be an integer from {MIN_CONTEXT_LENGTH} to "
            f"{MAX_CONTEXT_LENGTH}, got {shown(context_length)}",
            param="context_length",
        )
    name = _model_field(body, "name", check_name)
    version = _model_field(body, "version", check_version)
    role = body.get("role", GENERATION)
    if role not in ROLES:
        raise InvalidRequest(
            f"'role' must be generation or embedding, got {shown(role)}", param="role"
        )
    presets = _presets_field(body, context_length)
    manager = _manager(request)
    target = await manager.exclusive_work(
        lambda cancel: manager.registry.import_model(
            path,
            name=name,
            version=version,
            context_length=context_length,
            cancel=cancel,
            role=role,
            presets=presets,
        ),
        what="import",
    )
    return web.json_response(target.as_dict(), status=201)


async def install_model(request: web.Request) -> web.Response:
    body = await read_json(request)
    _str_field(body, "name")
    name = _model_field(body, "name", check_name) or ""
    version = _model_field(body, "version", check_version)
    manager = _manager(request)
    target = await manager.exclusive_work(
        lambda cancel: manager.registry.install(name, version, cancel=cancel), what="install"
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
    ref = _str_field(body, "model", required=False)
    results = await manager.exclusive_work(
        lambda cancel: manager.registry.verify(ref, cancel=cancel), what="verify"
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
