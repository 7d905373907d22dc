"""Find text that cannot be encoded as UTF-8, so it is refused at the door, not deep inside.

Python strings can hold lone UTF-16 surrogates (``"\\ud800"``): JSON's ``\\ud800`` escape makes
one, and so does a JavaScript app that cuts a string in the middle of an emoji. Such a string
passes every type check, then raises ``UnicodeEncodeError`` wherever it meets a tokenizer,
SQLite or a socket, far from the request that brought it. Every entry point (HTTP bodies,
query strings, path parameters, job requests, messages from the network) checks its input here
first and answers with an error that names the field.
"""

from __future__ import annotations

from typing import Any


def is_valid_text(text: str) -> bool:
    if text.isascii():  # the common case, and a cheap one
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_invalid_text(value: Any, path: str = "") -> str | None:
    """The path of the first string (or object key) in ``value`` that is not valid Unicode,
    such as ``messages[0].content``; ``None`` when every string is valid.

    ``value`` is what ``json.loads`` returns. Iterative, so a deeply nested value cannot
    exhaust the stack.
    """
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not is_valid_text(item):
                return where or "(the value)"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and not is_valid_text(key):
                    return f"{where or '(the object)'} (a key)"
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


def describe(path: str) -> str:
    """The message for a field that failed the check."""
    return (
        f"{path} is not valid Unicode: it holds a lone UTF-16 surrogate (such as \\ud800), "
        "which cannot be encoded as UTF-8; send whole characters"
    )
