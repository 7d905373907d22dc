"""Errors raised by the agent, grouped by who is at fault.

::

    EdgelmError
    ├── ConfigError            the operator's configuration is wrong; the daemon will not start
    ├── ModelError             the model cannot be served
    │   └── ModelLoadError     the runtime refused the file or folder
    ├── RequestError           the client sent something we will not run (4xx)
    │   ├── InvalidRequest         400: malformed JSON, missing or bad fields
    │   ├── ContextOverflow        400: prompt + max_tokens beyond the context window
    │   ├── WrongModelRole         400: a generation request to an embedding model, or back
    │   ├── NotAuthorized          401: missing or wrong bearer token
    │   ├── ForbiddenHost          403: Host or Origin not allowed (DNS rebinding defence)
    │   ├── AdminRequired          403: an admin operation over HTTP without the admin token
    │   ├── ModelNotFound          404: no such model
    │   ├── RequestTimeout         408: the body did not arrive in time
    │   ├── PayloadTooLarge        413: body over the size limit
    │   └── ExpectationFailed      417: an ``Expect`` header other than ``100-continue``
    ├── Overloaded             503/429: we cannot take the work now; carries ``retry_after_s``
    │   ├── QueueFull              429: the wait queue is full
    │   ├── RateLimited            429: one HTTP client over its rate or its requests in flight
    │   └── NotReady               503: no model loaded yet, or shutting down
    └── BackendError           500: the runtime failed while generating

Every error carries a machine-readable ``code`` and the attributes its callers need
(``param``, ``retry_after_s``…), so nobody parses a message. Which HTTP status and OpenAI
error type each class answers with is one table, in :mod:`edgelm_agent.api.errors`.
"""

from __future__ import annotations

#: How much of a value a client sent an error message quotes back.
SHOWN_CHARS = 40


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message says what came without echoing
    a megabyte string or a 400-digit number back to the client and into the log."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {len(str(abs(value)))} digits"  # str() of it costs time itself
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class EdgelmError(Exception):
    """Root of every error the agent raises on purpose."""

    code: str | None = "internal_error"


class ConfigError(EdgelmError):
    """The configuration is invalid; the message names the source and the setting."""


class ModelError(EdgelmError):
    """The model cannot be served."""

    code = "model_error"


class ModelLoadError(ModelError):
    """The runtime could not load the model file or folder."""

    code = "model_load_failed"


class RequestError(EdgelmError):
    """The client is at fault. ``param`` names the offending field, when there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(RequestError):
    code = "invalid_request"


class ContextOverflow(RequestError):
    """``max_tokens`` is ``None`` when the request set none: then the prompt alone leaves no
    room for a reply, and the message says that rather than blame a limit nobody set."""

    code = "context_length_exceeded"

    def __init__(self, *, prompt_tokens: int, max_tokens: int | None, context_length: int) -> None:
        if max_tokens is None:
            message = (
                f"the prompt ({prompt_tokens} tokens) leaves no room for a reply in the "
                f"context length of {context_length} tokens; shorten it"
            )
        else:
            message = (
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_tokens + max_tokens} exceeds the context length of "
                f"{context_length} tokens"
            )
        super().__init__(message, param="max_tokens" if max_tokens is not None else None)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class NotAuthorized(RequestError):
    code = "invalid_api_key"


class ForbiddenHost(RequestError):
    code = "host_not_allowed"


class AdminRequired(RequestError):
    """An admin operation (a registry change) over HTTP without the admin token."""

    code = "admin_required"


class WrongModelRole(InvalidRequest):
    """The request names a model that is served, but for the other kind of request: chat or
    completions to an embedding model, embeddings to a generation model."""

    code = "wrong_model_role"

    def __init__(self, model: str, role: str, *, hint: str = "") -> None:
        if role == "embedding":
            what = "an embedding model: it serves /v1/embeddings, not chat or completions"
        else:
            what = "a generation model: it serves chat and completions, not /v1/embeddings"
        super().__init__(f"model {shown(model)} is {what}{hint}", param="model")
        self.model = model
        self.role = role


class ModelNotFound(RequestError):
    code = "model_not_found"

    def __init__(self, requested: str, available: list[str], *, what: str = "loaded") -> None:
        found = f"{what}: {', '.join(available)}" if available else f"no model is {what}"
        super().__init__(f"model {shown(requested)} not found; {found}", param="model")
        self.requested = requested


class RequestTimeout(RequestError):
    code = "request_timeout"


class ExpectationFailed(RequestError):
    code = "expectation_failed"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"

    def __init__(self, *, limit_bytes: int, actual_bytes: int | None = None) -> None:
        got = f"{actual_bytes} bytes" if actual_bytes is not None else "more"
        super().__init__(f"request body must be at most {limit_bytes} bytes, got {got}")
        self.limit_bytes = limit_bytes


class Overloaded(EdgelmError):
    """Capacity, not correctness: the same request may succeed after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    code = "queue_full"


class NotReady(Overloaded):
    code = "not_ready"


class RateLimited(Overloaded):
    """One HTTP client sent requests faster than its rate (``rate_limited``), or has too many
    in flight (``too_many_requests_in_flight``)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, code: str = "rate_limited") -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.code = code


class BackendError(EdgelmError):
    """The inference runtime failed during generation."""

    code = "backend_error"
