"""Flat TOML documents (``fleet.toml``, ``control.toml``): written here, read with ``tomllib``.

The standard library reads TOML but does not write it, and the files provisioning writes are
flat tables of strings and integers, so a writer of that subset is a few lines: a value must
read back exactly as it was written, whatever characters it holds, which
:func:`toml_string` guarantees by escaping everything TOML's basic strings forbid raw
(``"``, ``\\``, and every control character but tab: U+0000-U+001F and U+007F).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgelm_provisioning.errors import InvalidValue

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_MUST_ESCAPE = re.compile(r'["\\\x00-\x08\x0a-\x1f\x7f]')

TomlValue = str | int | bool


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string that ``tomllib`` reads back unchanged."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04X}"

    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        # A lone surrogate cannot be written as UTF-8, nor escaped in TOML.
        raise InvalidValue("toml", f"{value!r} holds a lone surrogate, which TOML cannot hold")
    return '"' + _MUST_ESCAPE.sub(escape, value) + '"'


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(value)


def dump_toml(values: Mapping[str, TomlValue], *, comments: Mapping[str, str] | None = None) -> str:
    """A flat TOML document: one ``key = value`` line per entry, in order.

    ``comments`` maps a key to a one-line comment written above it (what the key is for).
    """
    lines: list[str] = []
    for key, value in values.items():
        if not _BARE_KEY.fullmatch(key):
            raise InvalidValue("toml", f"TOML key {key!r} must be a bare key (A-Z a-z 0-9 _ -)")
        comment = (comments or {}).get(key)
        if comment:
            lines.append(f"# {comment}")
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a malformed one raises :class:`InvalidValue` naming the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidValue(str(path), f"{path} is not valid TOML: {exc}") from exc
