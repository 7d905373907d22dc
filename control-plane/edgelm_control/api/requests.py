"""Reading requests: JSON bodies within a size limit, query parameters, paging cursors.

A cursor is opaque to clients: base64url of a small JSON array (the sort key of the last
item of the page). A cursor that does not decode is a 400 naming ``cursor``, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from edgelm_control.errors import InvalidRequest, PayloadTooLarge

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


async def json_body(request: web.Request, *, max_bytes: int) -> Any:
    """The request's JSON body; 400 if it is not JSON, 413 if it is too large."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(
            f"a request body must be at most {max_bytes} bytes, got {request.content_length}",
            limit_bytes=max_bytes,
        )
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 << 10):
        raw += chunk
        if len(raw) > max_bytes:
            raise PayloadTooLarge(
                f"a request body must be at most {max_bytes} bytes", limit_bytes=max_bytes
            )
    if not raw:
        raise InvalidRequest("the request needs a JSON body", param="body")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the body must be UTF-8 JSON", param="body") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            param="body",
        ) from None
    except RecursionError:
        raise InvalidRequest("the body nests too deeply", param="body") from None


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not JSON", param="body")


def limit_of(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(
            f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}", param="limit"
        )
    return int(raw)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    text = raw.strip()
    digits = text[1:] if text.startswith("-") else text
    if not text.isascii() or not digits.isdigit():
        raise InvalidRequest(f"{name} must be an integer, got {raw[:60]!r}", param=name)
    significant = digits.lstrip("0")
    # More than 19 significant digits is out of range anyway; int() of a huge string is slow.
    value = int(text) if len(significant) <= 19 else None
    if value is None or not _INT64_MIN <= value <= _INT64_MAX:
        # The databases' BIGINT: beyond it SQLite raises OverflowError, a 500.
        raise InvalidRequest(
            f"{name} must be between {_INT64_MIN} and {_INT64_MAX}, got {raw[:60]!r}", param=name
        )
    return value


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(request: web.Request, *shape: type) -> list[Any] | None:
    """The cursor's key, checked against ``shape`` (the type of each element)."""
    raw = request.query.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if (
        not isinstance(key, list)
        or len(key) != len(shape)
        or not all(
            isinstance(k, t) and not isinstance(k, bool) for k, t in zip(key, shape, strict=True)
        )
        or any(isinstance(k, int) and not _INT64_MIN <= k <= _INT64_MAX for k in key)
    ):
        raise InvalidRequest("cursor is not one this server gave out", param="cursor")
    return key


def page(data: list[Any], next_key: list[Any] | None) -> dict[str, Any]:
    return {"data": data, "next_cursor": None if next_key is None else encode_cursor(next_key)}
