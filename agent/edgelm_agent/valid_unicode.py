"""Find text that cannot be encoded as UTF-8, so it is refused at the door, not deep inside.

Python strings can hold lone UTF-16 surrogates (``"\\ud800"``): JSON's ``\\ud800`` escape makes
one, and so does a JavaScript app that cuts a string in the middle of an emoji. Such a string
passes every type check, then raises ``UnicodeEncodeError`` wherever it meets a tokenizer,
SQLite or a socket, far from the request that brought it. Every entry point (HTTP bodies,
query strings, path parameters, job requests, messages from the network) checks its input here
first and answers with an error that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InvalidText:
    """Where the first text that is not valid Unicode sits, for a 400 that names it."""

    #: The field for the error's ``param``: the string's path (``messages[0].content``), or
    #: for a bad object key the path of the object holding it; ``None`` for the body itself.
    param: str | None
    #: The same place, said in words.
    where: str

    @property
    def message(self) -> str:
        return describe(self.where)


def is_valid_text(text: str) -> bool:
    if text.isascii():  # the common case, and a cheap one
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_invalid_text(value: Any, path: str = "") -> InvalidText | None:
    """The first string (or object key) in ``value`` that is not valid Unicode, with its
    path below ``path`` (``messages[0].content``); ``None`` when every string is valid.

    ``value`` is what ``json.loads`` returns. Iterative, so a deeply nested value cannot
    exhaust the stack.
    """
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not is_valid_text(item):
                return InvalidText(where or None, where or "the value")
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not is_valid_text(key):
                    return InvalidText(where or None, f"a key of {where or 'the request body'}")
                stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def describe(where: str) -> str:
    """The message for text that failed the check, at ``where`` (a field, in words)."""
    return (
        f"{where} is not valid Unicode: it holds a lone UTF-16 surrogate (such as \\ud800), "
        "which cannot be encoded as UTF-8; send whole characters"
    )
