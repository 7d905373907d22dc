"""Strict readers for JSON objects: the one place where keys, types and ranges are checked.

Every body class validates through :class:`ObjectReader`, so the rules are written once:

* an object has exactly the keys its schema lists: a missing key and an unknown key are both
  refused (a key whose value may be null must still be present, as ``null``), so a typo in a
  sender is an error rather than a silently ignored field;
* ``true`` is not an integer and ``1.0`` is not an integer (Python's ``bool`` is an ``int``, and
  a lenient ``int()`` would accept both);
* integers stay within ``0 .. 2**53 - 1`` unless a field says otherwise, so every JSON parser
  (and a PostgreSQL ``bigint``) reads the same value;
* text is non-empty, bounded, and free of control characters (newlines only where a field is
  prose), because it ends up in logs, dashboards and SQL;
* errors are :class:`MalformedMessage` with ``field`` set to the JSON path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from enum import Enum
from typing import TypeVar

from edgelm_protocol.errors import InvalidId, MalformedMessage, shown
from edgelm_protocol.strict_json import (
    JSONObject,
    check_tree,
    child_path,
    has_surrogate,
    json_kind,
)

MAX_SAFE_INT = 2**53 - 1
MAX_NUMBER = 1e15

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_WHITESPACE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

E = TypeVar("E", bound=Enum)


def _refuse(path: str, expected: str, value: object) -> MalformedMessage:
    return MalformedMessage(f"{path} must be {expected}, got {_describe(value)}", field=path)


def _describe(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return json_kind(value)
    return shown(value)


def check_integer(
    value: object, path: str, *, minimum: int = 0, maximum: int = MAX_SAFE_INT
) -> int:
    """An integer in ``minimum .. maximum``; never a boolean or a float."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(path, f"an integer from {minimum} to {maximum}", value)
    if not minimum <= value <= maximum:
        raise _refuse(path, f"an integer from {minimum} to {maximum}", value)
    return value


def check_number(
    value: object,
    path: str,
    *,
    minimum: float = 0.0,
    maximum: float = MAX_NUMBER,
    exclusive_minimum: bool = False,
) -> float:
    """A finite number in range, returned as a float (``3`` and ``3.0`` read the same)."""
    low = f"above {minimum:g}" if exclusive_minimum else f"from {minimum:g}"
    expected = f"a number {low} to {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(path, expected, value)
    # Compare before converting: a huge int would overflow float().
    too_low = value <= minimum if exclusive_minimum else value < minimum
    if too_low or value > maximum or (isinstance(value, float) and not math.isfinite(value)):
        raise _refuse(path, expected, value)
    return float(value)


def check_boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(path, "true or false", value)
    return value


def check_text(
    value: object, path: str, *, max_chars: int, min_chars: int = 1, multiline: bool = False
) -> str:
    """Bounded text without control characters (tab and newlines allowed if ``multiline``)."""
    expected = f"a string of {min_chars} to {max_chars} characters"
    if not isinstance(value, str):
        raise _refuse(path, expected, value)
    if not min_chars <= len(value) <= max_chars:
        raise MalformedMessage(f"{path} must be {expected}, got {len(value)}", field=path)
    control = _CONTROL_EXCEPT_WHITESPACE if multiline else _CONTROL
    if control.search(value) is not None:
        raise MalformedMessage(f"{path} must not contain control characters", field=path)
    if has_surrogate(value):
        raise MalformedMessage(f"{path} holds a lone surrogate (not UTF-8)", field=path)
    return value


def check_pattern(value: object, path: str, pattern: re.Pattern[str], expected: str) -> str:
    """A string that ``pattern`` matches in full (hex digests, signatures)."""
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise _refuse(path, expected, value)
    return value


def check_identifier(value: object, path: str, check: Callable[[object], str]) -> str:
    """``value`` through one of :mod:`edgelm_protocol.ids`' checks, failing with its path."""
    try:
        return check(value)
    except InvalidId as exc:
        raise MalformedMessage(f"{path}: {exc}", field=path) from exc


def check_choice(value: object, path: str, enum_type: type[E]) -> E:
    """One of ``enum_type``'s values."""
    allowed = ", ".join(str(member.value) for member in enum_type)
    if not isinstance(value, str):
        raise _refuse(path, f"one of {allowed}", value)
    try:
        return enum_type(value)
    except ValueError:
        raise _refuse(path, f"one of {allowed}", value) from None


def check_json_object(value: object, path: str) -> JSONObject:
    """Any JSON object (an OpenAI request, caller metadata): checked as JSON, not as a schema."""
    if not isinstance(value, dict):
        raise _refuse(path, "an object", value)
    check_tree(value, path)
    return value


def check_array(value: object, path: str, *, min_items: int, max_items: int) -> list[object]:
    if not isinstance(value, list):
        raise _refuse(path, f"an array of {min_items} to {max_items} items", value)
    if not min_items <= len(value) <= max_items:
        raise MalformedMessage(
            f"{path} must hold {min_items} to {max_items} items, got {len(value)}", field=path
        )
    return value


class ObjectReader:
    """Reads one JSON object field by field, after checking its keys.

    ``keys`` are required (nullable fields too). With ``allow_extra=True`` other keys are
    allowed and kept for :meth:`extra` (a job result's ``error`` is the one such object).
    """

    def __init__(
        self, value: object, path: str, keys: Collection[str], *, allow_extra: bool = False
    ) -> None:
        where = path or "the payload"
        if not isinstance(value, dict):
            raise MalformedMessage(f"{where} must be an object, got {json_kind(value)}", field=path)
        missing = [key for key in keys if key not in value]
        if missing:
            raise MalformedMessage(
                f"{where} is missing {', '.join(sorted(missing))}",
                field=child_path(path, missing[0]),
            )
        if not allow_extra:
            unknown = [key for key in value if key not in keys]
            if unknown:
                first = child_path(path, unknown[0])
                raise MalformedMessage(
                    f"{where} has unknown key {shown(unknown[0])}; allowed: "
                    f"{', '.join(sorted(keys))}",
                    field=first,
                )
        self._value: dict[str, object] = value
        self._keys = keys
        self.path = path

    def at(self, key: str) -> str:
        """The JSON path of ``key``."""
        return child_path(self.path, key)

    def raw(self, key: str) -> object:
        return self._value[key]

    def is_null(self, key: str) -> bool:
        return self._value[key] is None

    def extra(self) -> JSONObject:
        """The keys beyond the schema's, checked as plain JSON."""
        rest = {key: item for key, item in self._value.items() if key not in self._keys}
        return check_json_object(rest, self.path)

    def integer(self, key: str, *, minimum: int = 0, maximum: int = MAX_SAFE_INT) -> int:
        return check_integer(self._value[key], self.at(key), minimum=minimum, maximum=maximum)

    def optional_integer(
        self, key: str, *, minimum: int = 0, maximum: int = MAX_SAFE_INT
    ) -> int | None:
        return None if self.is_null(key) else self.integer(key, minimum=minimum, maximum=maximum)

    def number(
        self,
        key: str,
        *,
        minimum: float = 0.0,
        maximum: float = MAX_NUMBER,
        exclusive_minimum: bool = False,
    ) -> float:
        return check_number(
            self._value[key],
            self.at(key),
            minimum=minimum,
            maximum=maximum,
            exclusive_minimum=exclusive_minimum,
        )

    def optional_number(
        self,
        key: str,
        *,
        minimum: float = 0.0,
        maximum: float = MAX_NUMBER,
        exclusive_minimum: bool = False,
    ) -> float | None:
        if self.is_null(key):
            return None
        return self.number(
            key, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum
        )

    def boolean(self, key: str) -> bool:
        return check_boolean(self._value[key], self.at(key))

    def text(self, key: str, *, max_chars: int, min_chars: int = 1, multiline: bool = False) -> str:
        return check_text(
            self._value[key],
            self.at(key),
            max_chars=max_chars,
            min_chars=min_chars,
            multiline=multiline,
        )

    def optional_text(self, key: str, *, max_chars: int, multiline: bool = False) -> str | None:
        if self.is_null(key):
            return None
        return self.text(key, max_chars=max_chars, multiline=multiline)

    def pattern(self, key: str, pattern: re.Pattern[str], expected: str) -> str:
        return check_pattern(self._value[key], self.at(key), pattern, expected)

    def identifier(self, key: str, check: Callable[[object], str]) -> str:
        return check_identifier(self._value[key], self.at(key), check)

    def optional_identifier(self, key: str, check: Callable[[object], str]) -> str | None:
        return None if self.is_null(key) else self.identifier(key, check)

    def choice(self, key: str, enum_type: type[E]) -> E:
        return check_choice(self._value[key], self.at(key), enum_type)

    def json_object(self, key: str) -> JSONObject:
        return check_json_object(self._value[key], self.at(key))

    def optional_json_object(self, key: str) -> JSONObject | None:
        return None if self.is_null(key) else self.json_object(key)

    def nested(self, key: str, keys: Collection[str], *, allow_extra: bool = False) -> ObjectReader:
        return ObjectReader(self._value[key], self.at(key), keys, allow_extra=allow_extra)

    def optional_nested(
        self, key: str, keys: Collection[str], *, allow_extra: bool = False
    ) -> ObjectReader | None:
        return None if self.is_null(key) else self.nested(key, keys, allow_extra=allow_extra)

    def items(self, key: str, *, min_items: int, max_items: int) -> list[tuple[str, object]]:
        """The array at ``key`` as ``(path, item)`` pairs, for per-item checks."""
        array = check_array(
            self._value[key], self.at(key), min_items=min_items, max_items=max_items
        )
        return [(child_path(self.at(key), index), item) for index, item in enumerate(array)]
