"""The one place where errors become HTTP: a status and the agent's JSON error body.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, the shape the agent
answers with (and OpenAI's), so the operator CLI reads errors from both the same way. The
status is the error class's ``status_code``; the ``type`` follows from the status. Nothing
else in the API builds an error response, and no traceback ever reaches a client.
"""

from __future__ import annotations

from aiohttp import web

from edgelm_control.errors import ControlError, NotAuthorized, PayloadTooLarge, RequestError

INVALID = "invalid_request_error"
SERVER = "server_error"
_TYPES = {401: "authentication_error", 403: "permission_error"}

# aiohttp raises these itself (routing, limits); map them to the same body shape.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, INVALID if status < 500 else SERVER)


def error_body(
    message: str, kind: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ControlError) -> web.Response:
    status = exc.status_code
    param = exc.param if isinstance(exc, RequestError) else None
    headers = {}
    if isinstance(exc, NotAuthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="edgelm-control"'
    body = error_body(str(exc), error_type(status), exc.code, param)
    if isinstance(exc, PayloadTooLarge):
        body["error"]["limit_bytes"] = str(exc.limit_bytes)
    return web.json_response(body, status=status, headers=headers)


def http_exception_response(exc: web.HTTPException) -> web.Response:
    text = exc.reason if exc.text is None else exc.text.strip() or exc.reason
    if exc.status == 405:
        text = f"{exc.reason}: this path does not take that method"
    response = web.json_response(
        error_body(text, error_type(exc.status), _HTTP_CODES.get(exc.status)), status=exc.status
    )
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def internal_error_response(request_id: str) -> web.Response:
    return web.json_response(
        error_body(
            f"internal error; see the control plane's log for request {request_id}",
            SERVER,
            "internal_error",
        ),
        status=500,
    )
