"""The one place where errors become OpenAI-style JSON error bodies.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, with the status the
error class declares. Nothing else in the API builds an error response, and no traceback ever
reaches a client.
"""

from __future__ import annotations

from aiohttp import web

from edgelm_agent.errors import EdgelmError, Overloaded, RequestError

# aiohttp raises these itself (routing, limits); map them to the same body shape.
_HTTP_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
}


def error_body(
    message: str, error_type: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: EdgelmError) -> web.Response:
    param = exc.param if isinstance(exc, RequestError) else None
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    return web.json_response(
        error_body(str(exc), exc.error_type, exc.code, param),
        status=exc.status_code,
        headers=headers,
    )


def http_exception_response(exc: web.HTTPException) -> web.Response:
    error_type, code = _HTTP_TYPES.get(
        exc.status, ("invalid_request_error" if exc.status < 500 else "server_error", None)
    )
    response = web.json_response(
        error_body(
            exc.reason if exc.text is None else exc.text.strip() or exc.reason, error_type, code
        ),
        status=exc.status,
    )
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def internal_error_response(request_id: str) -> web.Response:
    return web.json_response(
        error_body(
            f"internal error; see the agent log for request {request_id}",
            "server_error",
            "internal_error",
        ),
        status=500,
    )
