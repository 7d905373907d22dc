"""``/api/v1/devices``: the fleet's devices, one device in depth, registration, revocation."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import CURSOR, LIMIT, Operation, Param, Reply
from edgelm_control.api.request_schemas import DEVICE_ID, HARDWARE_CLASS, LABEL_FILTER
from edgelm_control.api.requests import decode_cursor, json_body, limit_of, page
from edgelm_control.api.schemas import ref
from edgelm_control.api.views import (
    desired_view,
    device_view,
    event_view,
    revocation_view,
    telemetry_view,
    when,
)
from edgelm_control.errors import Conflict, InvalidRequest, NotFound
from edgelm_control.revocation import DeviceRevoker, RevocationResult
from edgelm_control.rollouts.selection import ByClass, ByLabels
from edgelm_control.store.desired import get_desired
from edgelm_control.store.devices import (
    OFFLINE,
    ONLINE,
    UNKNOWN,
    DeviceFilter,
    get_device,
    list_devices,
    register_device,
)
from edgelm_control.store.events import recent_events
from edgelm_control.store.revocations import (
    REASON_MAX_CHARS,
    get_revocation,
    revocations_of,
)
from edgelm_control.store.rollouts import rows_of_devices
from edgelm_control.store.telemetry import recent_telemetry
from edgelm_protocol import InvalidId, check_device_id

RECENT = 20
PRESENCES = (ONLINE, OFFLINE, UNKNOWN)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, lone surrogates


def _filter(request: web.Request) -> DeviceFilter:
    labels: dict[str, str] = {}
    for text in request.query.getall("label", []):
        key, sep, value = text.partition("=")
        if not sep:
            raise InvalidRequest(f"label takes key=value, got {text!r}", param="label")
        labels.update(ByLabels(((key, value),)).labels)
    hardware_class = request.query.get("class")
    if hardware_class is not None:
        ByClass(hardware_class)  # the selector's rules: a clear 400 for a bad class
    presence = request.query.get("presence")
    if presence is not None and presence not in PRESENCES:
        raise InvalidRequest(
            f"presence must be one of {', '.join(PRESENCES)}, got {presence!r}", param="presence"
        )
    return DeviceFilter(labels=labels, hardware_class=hardware_class, presence=presence)


def _device_id(request: web.Request) -> str:
    device_id = request.match_info["id"]
    try:
        return check_device_id(device_id)
    except InvalidId as exc:
        raise InvalidRequest(str(exc), param="id") from None


async def list_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    where = _filter(request)
    limit = limit_of(request)
    cursor = decode_cursor(request, str)
    async with ctx.store.read() as conn:
        found = await list_devices(
            conn, where, after_id=None if cursor is None else cursor[0], limit=limit + 1
        )
        more = len(found) > limit
        found = found[:limit]
        revoked = await revocations_of(conn, [d.device_id for d in found])
    return web.json_response(
        page(
            [device_view(d, revoked.get(d.device_id)) for d in found],
            [found[-1].device_id] if more else None,
        )
    )


async def show_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    device_id = _device_id(request)
    async with ctx.store.read() as conn:
        device = await get_device(conn, device_id)
        if device is None:
            raise NotFound(f"no device {device_id}", param="id")
        desired = await get_desired(conn, device_id)
        rows = await rows_of_devices(conn, [device_id])
        events = await recent_events(conn, device_id, limit=RECENT)
        telemetry = await recent_telemetry(conn, device_id, limit=RECENT)
        revocation = await get_revocation(conn, device_id)
    view: dict[str, Any] = device_view(device, revocation)
    view |= {
        "reported_state": None if device.reported_state is None else dict(device.reported_state),
        "desired": desired_view(desired),
        "rollouts": [
            {"rollout": r.rollout_id, "wave": r.wave, "state": str(r.state), "reason": r.reason}
            for r in sorted(rows, key=lambda r: r.created_ms)
        ],
        "recent_events": [event_view(e) for e in events],
        "recent_telemetry": [telemetry_view(t) for t in telemetry],
        "revocation": revocation_view(revocation),
    }
    return web.json_response(view)


async def register_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = await json_body(request, max_bytes=ctx.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", param="body")
    unknown = sorted(set(body) - {"id", "hardware_class", "labels"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    try:
        device_id = check_device_id(body.get("id"))
    except InvalidId as exc:
        raise InvalidRequest(str(exc), param="id") from None
    hardware_class = body.get("hardware_class")
    if hardware_class is not None:
        hardware_class = ByClass(hardware_class).hardware_class
    raw_labels = body.get("labels", {})
    if not isinstance(raw_labels, dict):
        raise InvalidRequest("labels must be an object of key: value", param="labels")
    labels = dict(ByLabels(tuple(raw_labels.items())).labels) if raw_labels else {}
    async with ctx.store.write() as conn:
        revocation = await get_revocation(conn, device_id, lock=True)
        if revocation is not None:
            raise Conflict(
                f"device {device_id} was revoked at {when(revocation.revoked_ms)}; a revoked "
                "id never comes back: enroll the device under a new id",
                param="id",
            )
        device, change = await register_device(
            conn,
            device_id,
            hardware_class=hardware_class,
            labels=labels,
            now_ms=ctx.clock.now_ms(),
        )
    if change.facts_changed:
        await ctx.engine.consider(device_id)
        ctx.hub.publish("device", {"id": device_id, "created": change.created})
    return web.json_response(device_view(device), status=201 if change.created else 200)


def _reason(value: object) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= REASON_MAX_CHARS
        or _UNPRINTABLE.search(value)
    ):
        shown = value[:50] if isinstance(value, str) else value
        raise InvalidRequest(
            f"reason must be text of 1-{REASON_MAX_CHARS} characters without control "
            f"characters, got {shown!r}",
            param="reason",
        )
    return value


async def revoke_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    device_id = _device_id(request)
    body = await json_body(request, max_bytes=ctx.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object, {} or {"reason": ...}', param="body")
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; it takes reason", param=unknown[0])
    revoker = DeviceRevoker(store=ctx.store, engine=ctx.engine, clock=ctx.clock, hub=ctx.hub)
    result = await revoker.revoke(device_id, reason=_reason(body.get("reason")))
    return web.json_response(revocation_result_view(result), status=201 if result.created else 200)


def revocation_result_view(result: RevocationResult) -> dict[str, Any]:
    revocation = result.revocation
    return {
        "device": revocation.device_id,
        "revoked_at": when(revocation.revoked_ms),
        "reason": revocation.reason,
        "created": result.created,
        "rollouts": list(result.rollouts),
        "jobs_cancelled": list(result.jobs_cancelled),
        "desired_cleared": result.desired_cleared,
    }


ID = Param("id", "path", DEVICE_ID, "The device id.")
ERR = Reply("The request is refused.", ref("Error"))

OPERATIONS = (
    Operation(
        "GET",
        "/api/v1/devices",
        list_handler,
        "listDevices",
        "The fleet's devices, by id.",
        {200: Reply("A page of devices.", ref("DevicePage")), 400: ERR},
        params=(
            Param("label", "query", LABEL_FILTER, "key=value; repeat to require several."),
            Param("class", "query", HARDWARE_CLASS, "Hardware class."),
            Param("presence", "query", {"enum": list(PRESENCES)}, "Presence."),
            LIMIT,
            CURSOR,
        ),
        tags=("devices",),
    ),
    Operation(
        "POST",
        "/api/v1/devices",
        register_handler,
        "registerDevice",
        "Register a device before its first report, so a rollout can include it (pending).",
        {
            201: Reply("Registered.", ref("Device")),
            200: Reply(
                "Known already; class and labels updated unless it reported its own.",
                ref("Device"),
            ),
            400: ERR,
            409: ERR,
        },
        request=ref("DeviceRegistration"),
        tags=("devices",),
    ),
    Operation(
        "GET",
        "/api/v1/devices/{id}",
        show_handler,
        "getDevice",
        "One device: reported state, desired state, rollouts, recent events and telemetry.",
        {200: Reply("The device.", ref("DeviceDetail")), 404: ERR},
        params=(ID,),
        tags=("devices",),
    ),
    Operation(
        "POST",
        "/api/v1/devices/{id}/revoke",
        revoke_handler,
        "revokeDevice",
        "Revoke a device for good: refuse all it sends (queued messages too), take it out of "
        "its rollouts, cancel its remote jobs, withdraw its desired state.",
        {
            201: Reply("Revoked now.", ref("DeviceRevocation")),
            200: Reply(
                "Revoked before: the first revocation's time and reason.",
                ref("DeviceRevocation"),
            ),
            400: ERR,
        },
        request=ref("DeviceRevocationRequest"),
        params=(ID,),
        tags=("devices",),
    ),
)
