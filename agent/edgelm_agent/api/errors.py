"""The one place where errors become HTTP: a status and an OpenAI-style JSON error body.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``. :data:`HTTP_ERRORS`
is the whole mapping, one table: each error class the agent raises on purpose, with its HTTP
status and its OpenAI error type. A class that is not listed answers as its nearest listed
base class does. Nothing else in the API builds an error response, and no traceback ever
reaches a client. Job results and fleet job results take the same fields
(:func:`error_fields`), so an error reads the same wherever it surfaces.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edgelm_agent.errors import (
    AdminRequired,
    BackendError,
    ConfigError,
    ContextOverflow,
    EdgelmError,
    ExpectationFailed,
    ForbiddenHost,
    InvalidRequest,
    ModelError,
    ModelNotFound,
    NotAuthorized,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    RequestError,
    RequestTimeout,
)
from edgelm_agent.jobs.database import StorageError, StorageFull
from edgelm_agent.jobs.lifecycle import IllegalTransition
from edgelm_agent.jobs.store import (
    IdempotencyKeyReused,
    JobConflict,
    JobNotFound,
    JobQueueFull,
    OutboxFullForJobs,
)
from edgelm_agent.registry.errors import (
    ActivationFailed,
    Cancelled,
    DownloadError,
    InstallCancelled,
    InsufficientSpace,
    ModelNotInstalled,
    RegistryBusy,
    RegistryError,
    RepositoryError,
    UnsafeSource,
    VersionConflict,
)
from edgelm_agent.residency import InsufficientMemory

INVALID = "invalid_request_error"
SERVER = "server_error"

HTTP_ERRORS: dict[type[EdgelmError], tuple[int, str]] = {
    # the agent
    EdgelmError: (500, SERVER),
    ConfigError: (500, SERVER),
    ModelError: (500, SERVER),
    BackendError: (500, SERVER),
    RequestError: (400, INVALID),
    InvalidRequest: (400, INVALID),
    ContextOverflow: (400, INVALID),
    NotAuthorized: (401, "authentication_error"),
    ForbiddenHost: (403, "permission_error"),
    AdminRequired: (403, "permission_error"),
    ModelNotFound: (404, INVALID),
    RequestTimeout: (408, INVALID),
    PayloadTooLarge: (413, INVALID),
    ExpectationFailed: (417, INVALID),
    Overloaded: (503, SERVER),
    NotReady: (503, SERVER),
    InsufficientMemory: (503, SERVER),  # with the figures, and no Retry-After: it will not fit
    QueueFull: (429, "rate_limit_error"),
    RateLimited: (429, "rate_limit_error"),
    # jobs
    JobNotFound: (404, INVALID),
    JobConflict: (409, INVALID),
    IdempotencyKeyReused: (422, INVALID),
    OutboxFullForJobs: (507, SERVER),
    JobQueueFull: (507, SERVER),
    StorageFull: (507, SERVER),
    StorageError: (500, SERVER),
    IllegalTransition: (500, SERVER),
    # the registry
    RegistryError: (500, "registry_error"),
    RepositoryError: (422, "registry_error"),
    DownloadError: (502, "registry_error"),
    Cancelled: (409, "registry_error"),
    InstallCancelled: (409, "registry_error"),
    InsufficientSpace: (507, "registry_error"),
    ModelNotInstalled: (404, "registry_error"),
    UnsafeSource: (422, "registry_error"),
    VersionConflict: (409, "registry_error"),
    RegistryBusy: (409, "registry_error"),
    ActivationFailed: (422, "registry_error"),
}


def http_status(exc: EdgelmError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an error: its class's row, or its nearest base's."""
    for cls in type(exc).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return HTTP_ERRORS[EdgelmError]


def error_fields(exc: EdgelmError) -> dict[str, Any]:
    """``code``, ``type`` and ``message`` of an error, as job results record it."""
    return {"code": exc.code, "type": http_status(exc)[1], "message": str(exc)}


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
    if isinstance(exc, NotAuthorized):  # RFC 9110: a 401 names the scheme that would do
        headers["WWW-Authenticate"] = 'Bearer realm="edgelm"'
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    status, error_type = http_status(exc)
    return web.json_response(
        error_body(str(exc), error_type, exc.code, param), status=status, headers=headers
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
