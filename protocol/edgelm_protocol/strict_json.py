"""Strict JSON: bytes in, plain JSON values out, or :class:`MalformedMessage`.

Python's :func:`json.loads` is lenient in ways an attacker can use against a receiver:

* duplicate keys: the last one wins, so two parsers (a broker plugin, a log pipeline, this
  code) can read two different messages from the same bytes;
* ``NaN``, ``Infinity`` and ``-Infinity`` are accepted, and ``1e999`` silently becomes ``inf``;
  none of them is JSON and every comparison with NaN is false, which defeats range checks;
* ``"\\ud800"`` yields a lone surrogate: a ``str`` that cannot be encoded as UTF-8, so the
  message crashes whoever logs, stores or re-encodes it later, far from here;
* deep nesting ends in :class:`RecursionError`, which no receiver expects;
* integers of more than 4300 digits raise a bare :class:`ValueError`.

:func:`loads_strict` refuses all of these with one error class, and :func:`check_tree` runs the
same checks on values about to be sent, so a sender cannot produce what a receiver refuses.
Error fields use JSON paths: ``body.installed[2].sha256``.
"""

from __future__ import annotations

import json
import math
import re
from typing import TypeAlias

from edgelm_protocol.errors import MalformedMessage, ProtocolError, shown

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
JSONObject: TypeAlias = dict[str, JSONValue]

MAX_DEPTH = 32
"""Deepest nesting accepted, counting the envelope object as 1.

An OpenAI chat request with tools and a JSON-schema response format nests about 12 deep inside a
job envelope; 32 leaves room and bounds the work a payload can cause.
"""

_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def child_path(path: str, key: str | int) -> str:
    """The JSON path of ``key`` inside ``path``: ``body.health``, ``body.ids[3]``.

    Keys that are not plain names (an attacker's label key, say) are quoted in ASCII, so a path
    is always safe to log.
    """
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PLAIN_KEY.fullmatch(key) is None:
        return f"{path}[{shown(key)}]"
    return f"{path}.{key}" if path else key


def json_kind(value: object) -> str:
    """How an error message names the JSON type of ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__} (not JSON)"


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate, so cannot be encoded as UTF-8."""
    return _SURROGATE.search(text) is not None


def _object_without_duplicates(pairs: list[tuple[str, JSONValue]]) -> JSONObject:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedMessage(f"duplicate key {shown(key)} in an object")
            seen.add(key)
    return result


def _refuse_constant(name: str) -> float:
    raise MalformedMessage(f"{name} is not JSON; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedMessage(f"number {shown(text)} is out of range for a double")
    return value


def loads_strict(payload: bytes, *, max_depth: int = MAX_DEPTH) -> JSONValue:
    """Parse ``payload`` as strict UTF-8 JSON, or raise :class:`MalformedMessage`."""
    try:
        text = payload.decode("utf-8")  # strict: also refuses UTF-8-encoded surrogates
    except UnicodeDecodeError as exc:
        raise MalformedMessage(
            f"payload must be UTF-8, got byte {payload[exc.start]:#04x} at offset {exc.start}"
        ) from None
    try:
        value: JSONValue = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except ProtocolError:
        raise
    except RecursionError:
        raise MalformedMessage(f"payload nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise MalformedMessage(
            f"payload must be JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # an integer literal of more than 4300 digits
        raise MalformedMessage(f"payload must be JSON within limits: {exc}") from None
    check_tree(value, max_depth=max_depth)
    return value


def check_tree(value: object, path: str = "", *, max_depth: int = MAX_DEPTH) -> None:
    """Check that ``value`` is plain JSON that every receiver can handle.

    Only ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` and ``dict`` with
    ``str`` keys; no string (key or value) holding a lone surrogate; at most ``max_depth``
    levels. Raises :class:`MalformedMessage` naming the path of the first offence.
    """
    _check_node(value, path, 1, max_depth)


def _check_node(value: object, path: str, depth: int, max_depth: int) -> None:
    where = path or "the payload"
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, str):
        if has_surrogate(value):
            raise MalformedMessage(f"{where} holds a lone surrogate (not UTF-8)", field=path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedMessage(f"{where} must be a finite number, got {value}", field=path)
        return
    if not isinstance(value, list | dict):
        raise MalformedMessage(f"{where} must be a JSON value, got {json_kind(value)}", field=path)
    if depth > max_depth:
        raise MalformedMessage(f"{where} nests deeper than {max_depth} levels", field=path)
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_node(item, child_path(path, index), depth + 1, max_depth)
        return
    for key, item in value.items():
        if not isinstance(key, str):
            raise MalformedMessage(f"{where} has a non-string key {shown(key)}", field=path)
        if has_surrogate(key):
            raise MalformedMessage(
                f"{where} has a key holding a lone surrogate (not UTF-8)", field=path
            )
        _check_node(item, child_path(path, key), depth + 1, max_depth)


def dumps_compact(value: JSONValue) -> bytes:
    """UTF-8 JSON without whitespace. Call :func:`check_tree` first; this only serialises."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )
