"""What the OpenAPI document says a request may hold, from the validators' own rules.

Each schema restates, as JSON Schema, a rule the routes check in code: device ids and label
keys (:mod:`edgelm_protocol.ids`, :mod:`edgelm_control.rollouts.selection`), label values and
hardware classes, model keys, a rollout's ``canary`` and ``waves``
(:mod:`edgelm_control.rollouts.waves`) and telemetry's ``group_by``. They take the validators'
constants and patterns, so a changed rule changes the document too. The HTTP fuzzing
(``tests/integration/test_fuzz_http_control.py``) sends valid requests generated from them
and checks none is refused with a 400, and invalid ones and checks each is.

Regular expressions are written in the dialect JSON Schema (ECMA-262), Python's ``re`` and the
Rust ``regex`` crate read alike: ASCII classes, and where a validator strips Python's
whitespace (``str.strip``), that whitespace spelled out, since ECMA-262's ``\\s`` is another set.
"""

from __future__ import annotations

from typing import Any

from edgelm_control.rollouts.selection import (
    HARDWARE_CLASS_MAX_CHARS,
    ID_RE,
    LABEL_VALUE_MAX_CHARS,
    RESERVED_ID,
)
from edgelm_control.store.telemetry import GROUP_KEYS
from edgelm_protocol.ids import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN

Schema = dict[str, Any]

#: Python's whitespace (what ``str.strip`` takes away), as a character class body.
SPACE = "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace())
#: A character of text a selector takes: no control character (C0, DEL or C1).
PRINTABLE = "[^\\u0000-\\u001f\\u007f-\\u009f]"
INT64: Schema = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}

ID: Schema = {"type": "string", "pattern": f"^{ID_RE.pattern}$"}
DEVICE_ID: Schema = {
    **ID,
    "not": {"const": RESERVED_ID},
    "description": "1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit; not 'control'",
}
LABEL_VALUE: Schema = {
    "type": "string",
    "maxLength": LABEL_VALUE_MAX_CHARS,
    "pattern": f"^{PRINTABLE}*$",
}
HARDWARE_CLASS: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": HARDWARE_CLASS_MAX_CHARS,
    "pattern": f"^{PRINTABLE}*$",
    "description": f"1-{HARDWARE_CLASS_MAX_CHARS} characters, no control characters",
}
#: Labels a request sets or selects by: keys are ids, values text without control characters.
LABELS: Schema = {
    "type": "object",
    "propertyNames": ID,
    "additionalProperties": LABEL_VALUE,
}
#: The ``label`` filter: ``key=value``, repeated to require several.
LABEL_FILTER: Schema = {
    "type": "array",
    "items": {
        "type": "string",
        "pattern": f"^{ID_RE.pattern}={PRINTABLE}{{0,{LABEL_VALUE_MAX_CHARS}}}$",
    },
}
#: ``name@version``, each as the registry names models (and never holding ``..``).
MODEL_KEY: Schema = {
    "type": "string",
    "pattern": f"^(?!.*\\.\\.){MODEL_NAME_PATTERN.pattern}@{MODEL_VERSION_PATTERN.pattern}$",
}

_COUNT = "0*[1-9][0-9]*"
# A share of more than 0% and at most 100%, as a decimal: 0.5%, 10%, 100.0%.
_SHARE = "(?:0+\\.[0-9]*[1-9][0-9]*|0*[1-9][0-9]?(?:\\.[0-9]+)?|0*100(?:\\.0+)?)%"
_SIZE = f"(?:{_COUNT}|{_SHARE})"
_REST = "[Rr][Ee][Ss][Tt]"
CANARY: Schema = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": f"^[{SPACE}]*{_SIZE}[{SPACE}]*$"},
    ],
    "description": "a count (5) or a share ('10%') of the selection; not with waves",
}
WAVES: Schema = {
    "type": "string",
    "pattern": f"^(?:[{SPACE}]*{_SIZE}[{SPACE}]*,)*[{SPACE}]*(?:{_SIZE}|{_REST})[{SPACE}]*$",
    "description": (
        "wave sizes separated by commas, each a count, a share or 'rest' (last only), e.g. "
        "'1,10,rest'; a rest is added when the last is not one; not with canary"
    ),
}

_KEYS = "|".join(GROUP_KEYS)
_PART = f"[{SPACE}]*(?:{_KEYS})?[{SPACE}]*"


def _twice(key: str) -> str:
    """A ``group_by`` that names ``key`` in two of its comma-separated parts."""
    part = f"[{SPACE}]*{key}[{SPACE}]*"
    return f"(?:^|,){part},(?:[^,]*,)*{part}(?:,|$)"


GROUP_BY: Schema = {
    "type": "string",
    "pattern": f"^(?:{_PART},)*{_PART}$",
    "allOf": [{"pattern": f"(?:{_KEYS})"}, *({"not": {"pattern": _twice(k)}} for k in GROUP_KEYS)],
    "description": f"distinct keys, comma-separated, from: {', '.join(GROUP_KEYS)}",
}
