"""The control plane's root error and the families every part of it derives from.

::

    ControlError              500: the control plane failed; a bug or a broken dependency
    ├── ConfigError               the operator's configuration is wrong; nothing starts
    ├── StoreUnavailable          503: the database cannot be reached or refused the work
    └── RequestError          the operator is at fault (4xx); carries ``param``
        ├── InvalidRequest        400: malformed input: a bad field, option or value
        ├── NotAuthorized         401: no bearer token, or one that is not known
        ├── NotFound              404: no such rollout, device or model
        ├── Conflict              409: the request does not fit the current state
        ├── PayloadTooLarge       413: a body or an upload over its size limit
        └── Unprocessable         422: well formed, but it cannot be done as asked

Subsystems derive their errors from these (the rollouts' tree is drawn in
:mod:`edgelm_control.rollouts.errors`, the repository's in
:mod:`edgelm_control.repository.errors`). Every error carries ``status_code`` and ``code`` as
class attributes, so the HTTP layer and the CLI map them in one place without parsing a
message.
"""

from __future__ import annotations


class ControlError(Exception):
    """Root of every error the control plane raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"


class ConfigError(ControlError):
    """The configuration is invalid; the message names the source and the setting."""

    code = "invalid_config"


class StoreUnavailable(ControlError):
    """503: the store could not be reached or did not answer in time; retrying may work."""

    status_code = 503
    code = "store_unavailable"


class RequestError(ControlError):
    """The operator sent something we will not do. ``param`` names the field or option."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(RequestError):
    """400: a field, option or value is malformed; the message says what was expected."""

    status_code = 400
    code = "invalid_request"


class NotAuthorized(RequestError):
    """401: the request carries no bearer token, or one that matches no operator token."""

    status_code = 401
    code = "invalid_token"


class NotFound(RequestError):
    """404: the request names something that does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(RequestError):
    """409: valid on its own, but not in the state the target is in now."""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(RequestError):
    """413: a request body or an uploaded blob is larger than allowed."""

    status_code = 413
    code = "payload_too_large"

    def __init__(self, message: str, *, limit_bytes: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.limit_bytes = limit_bytes


class Unprocessable(RequestError):
    """422: well formed, but what it asks for cannot be done (an empty selection, say)."""

    status_code = 422
    code = "unprocessable"
