"""The control plane's root error and the families every part of it derives from.

::

    ControlError              500: the control plane failed; a bug or a broken dependency
    └── RequestError          the operator is at fault (4xx); carries ``param``
        ├── InvalidRequest        400: malformed input: a bad field, option or value
        ├── NotFound              404: no such rollout, device or model
        ├── Conflict              409: the request does not fit the current state
        └── Unprocessable         422: well formed, but it cannot be done as asked

Subsystems derive their errors from these (the rollouts' tree is drawn in
:mod:`edgelm_control.rollouts.errors`). Every error carries ``status_code`` and ``code`` as
class attributes, so the HTTP layer and the CLI map them in one place without parsing a
message.
"""

from __future__ import annotations


class ControlError(Exception):
    """Root of every error the control plane raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"


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


class NotFound(RequestError):
    """404: the request names something that does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(RequestError):
    """409: valid on its own, but not in the state the target is in now."""

    status_code = 409
    code = "conflict"


class Unprocessable(RequestError):
    """422: well formed, but what it asks for cannot be done (an empty selection, say)."""

    status_code = 422
    code = "unprocessable"
