"""Hostile payloads for fuzzing the two MQTT receivers, and the checks that they are hostile.

Shared by ``test_fuzz_agent.py`` (the agent's :class:`~edgelm_agent.sync.session.SyncSession`)
and ``test_fuzz_control.py`` (the control plane's :class:`~edgelm_control.fleet.ingest.Ingestor`),
and by the atheris harnesses under ``fuzz/``. A case starts from a *valid* envelope of one
message type (drawn from ``tests/unit/protocol/strategies.py``) and breaks one thing:

* a node of the JSON tree (an envelope key, or any key or item of the body, however deep) is
  replaced by a value of the wrong type or at an edge: lone surrogates, NaN and infinities,
  ``1e999``, integers past 2**53 and past Python's 4300-digit limit, nesting just under, at and
  far over the depth limit, duplicated keys, control characters, bidi overrides;
* a key is removed, added, duplicated or renamed;
* the envelope's ``v``, ``type`` and ``from`` are swapped (wrong topic/type pairings, another
  device's id, ``control`` from a device);
* the bytes: the payload padded with JSON whitespace to exactly its type's limit and one byte
  over, truncated, a byte flipped, a BOM in front, garbage after, UTF-8-encoded surrogates;
* or the payload is random bytes.

The number of examples is set by ``EDGELM_FUZZ_EXAMPLES`` for a long campaign; ``make test``
uses each test's small default.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelm_protocol import (
    MAX_PAYLOAD_BYTES,
    Envelope,
    MessageRefused,
    MessageType,
    Topic,
    decode,
)
from edgelm_protocol.strict_json import MAX_DEPTH
from tests.unit.protocol import strategies

CAMPAIGN_EXAMPLES = int(os.environ.get("EDGELM_FUZZ_EXAMPLES", "0"))
DEVICE_TYPES = (
    MessageType.PRESENCE,
    MessageType.STATE,
    MessageType.TELEMETRY,
    MessageType.EVENT,
    MessageType.JOB_RESULT,
)
CONTROL_TYPES = (MessageType.DESIRED, MessageType.JOB, MessageType.ACK, MessageType.ANNOUNCE)


CASES_RUN: Counter[str] = Counter()
"""Hostile messages handed to each receiver, by receiver and message type (all phases)."""


def count_case(receiver: str, message_type: MessageType) -> None:
    CASES_RUN[f"{receiver} {message_type}"] += 1


def _report_cases() -> None:
    for label, number in sorted(CASES_RUN.items()):
        print(f"fuzz cases: {label}: {number}", file=sys.stderr)
    print(f"fuzz cases: total: {sum(CASES_RUN.values())}", file=sys.stderr)


if CAMPAIGN_EXAMPLES:
    atexit.register(_report_cases)


def fuzz_settings(default_examples: int) -> settings:
    """``default_examples`` in ``make test``; ``EDGELM_FUZZ_EXAMPLES`` in a campaign."""
    return settings(
        max_examples=CAMPAIGN_EXAMPLES or default_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# --- a serialiser that can write what json.dumps will not ---------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: ``NaN``, ``1e999``, 5000 digits, 100000 brackets."""

    text: str


@dataclass(frozen=True)
class Dup:
    """An object written with its pairs in order, duplicate keys included."""

    pairs: tuple[tuple[str, Any], ...]


def dump(value: Any, *, ascii_only: bool = True) -> str:
    """JSON text for ``value``. Lone surrogates come out as ``\\ud800`` escapes (``ascii_only``)
    or as themselves, which :func:`to_bytes` encodes as (invalid) UTF-8 surrogates."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Dup):
        inner = ",".join(f"{dump(k, ascii_only=ascii_only)}:{dump(v, ascii_only=ascii_only)}"
                         for k, v in value.pairs)  # fmt: skip
        return "{" + inner + "}"
    if isinstance(value, dict):
        return dump(Dup(tuple(value.items())), ascii_only=ascii_only)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(item, ascii_only=ascii_only) for item in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value) if abs(value) < 10**4000 else "9" * 4000
    return json.dumps(value, ensure_ascii=ascii_only)


def to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# --- edge values ---------------------------------------------------------------------------------


def _nested(depth: int, kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "null" + "}" * depth)


EDGE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.0,
    -0.0,
    0.5,
    2**53 - 1,
    2**53,
    2**63,
    -(2**63) - 1,
    2**64,
    1.7976931348623157e308,
    5e-324,
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1" * 4300),
    Raw("1" * 4301),
    Raw("-" + "9" * 20000),
    Raw("1E400"),
    Raw("0.0000000000000000000000001e-400"),
    "",
    " ",
    "\ud800",
    "a\udfff",
    "\udbff\udfff",  # a valid pair written as two escapes
    "\x00",
    "\x1b[31m",
    "\u202e",
    "\ufeff",
    "\u2028",
    "control",
    "+",
    "#",
    "/",
    "$SYS/x",
    "../../etc/passwd",
    "é" * 300,
    "😀" * 100,
    "x" * 5000,
    [],
    {},
    [None],
    {"": None},
    _nested(MAX_DEPTH - 2),
    _nested(MAX_DEPTH),
    _nested(MAX_DEPTH + 1),
    _nested(MAX_DEPTH + 1, "dict"),
    _nested(1000),
    _nested(100_000),
    _nested(3000, "dict"),
    Dup((("a", 1), ("a", 2))),
)
"""Values that are wrong for most fields and, some of them, for every field."""

ALWAYS_INVALID: tuple[Any, ...] = (
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1" * 4301),
    Raw("-" + "9" * 20000),
    Raw("1E400"),
    "\ud800",
    "a\udfff",
    _nested(MAX_DEPTH + 1),
    _nested(MAX_DEPTH + 1, "dict"),
    _nested(1000),
    _nested(100_000),
    _nested(3000, "dict"),
    Dup((("a", 1), ("a", 2))),
)
"""Values no receiver may accept anywhere in a payload (whatever the field's schema)."""

edge_values = st.sampled_from(EDGE_VALUES) | strategies.hostile_json_values
edge_keys = st.sampled_from(["", "v", "body", "__proto__", "\ud800", "é", "a" * 1000, "\x00"])


# --- valid messages ------------------------------------------------------------------------------


@st.composite
def envelopes(draw: st.DrawFn, message_type: MessageType, device: str) -> Envelope:
    """A valid envelope of ``message_type``: from ``device`` if devices send it."""
    sender = device if message_type in DEVICE_TYPES else "control"
    return Envelope(
        id=draw(strategies.message_ids),
        sender=sender,
        ts_ms=draw(strategies.counts),
        body=draw(strategies.BODIES[message_type]),
    )


# --- mutations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fuzz case: the payload, what was done to it, and whether it cannot be valid."""

    payload: bytes
    mutation: str
    surely_invalid: bool


Path = tuple[str | int, ...]


def _paths(value: Any, prefix: Path = ()) -> list[Path]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _set(document: Any, path: Path, new: Any) -> Any:
    if not path:
        return new
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return document


def _parent_and_key(document: Any, path: Path) -> tuple[Any, str | int]:
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    return parent, path[-1]


@st.composite
def tree_mutations(draw: st.DrawFn, document: dict[str, Any]) -> Case:
    """``document`` with one node replaced, removed, duplicated, renamed, or a key added."""
    document = _copy(document)
    path = draw(st.sampled_from(_paths(document)))
    kind = draw(st.sampled_from(["replace", "replace_always_invalid", "remove", "add", "dup"]))
    ascii_only = draw(st.booleans())
    surely_invalid = False
    if kind == "replace_always_invalid" or (kind == "replace" and draw(st.booleans())):
        new = draw(st.sampled_from(ALWAYS_INVALID))
        document = _set(document, path, new)
        surely_invalid = True
        # A lone surrogate written raw is refused as invalid UTF-8 whatever ascii_only says.
    elif kind == "replace":
        new = draw(edge_values)
        document = _set(document, path, new)
        # Every envelope key is typed: a value of another type there is wrong.
        surely_invalid = len(path) == 1 and _wrong_envelope_value(path[0], new)
    elif kind == "remove" and path:
        parent, key = _parent_and_key(document, path)
        del parent[key]
        surely_invalid = len(path) == 1  # every envelope key is required
    elif kind == "add" or not path:
        target_path = path if isinstance(_get(document, path), dict) else ()
        target = _get(document, target_path)
        key = draw(edge_keys | st.text(max_size=8))
        if key in target:
            pairs = (*target.items(), (key, draw(edge_values)))
            document = _set(document, target_path, Dup(pairs))
            surely_invalid = True
        else:
            target[key] = draw(edge_values)
            surely_invalid = target_path == ()  # the envelope is closed
    else:  # dup: the key at path written twice
        parent, key = _parent_and_key(document, path)
        if isinstance(parent, dict):
            pairs = (*parent.items(), (key, parent[key]))
            document = _set(document, path[:-1], Dup(pairs))
            surely_invalid = True
        else:
            document = _set(document, path, draw(edge_values))
    payload = to_bytes(dump(document, ascii_only=ascii_only))
    return Case(payload, f"{kind} {_shown_path(path)}", surely_invalid)


def _get(document: Any, path: Path) -> Any:
    for step in path:
        document = document[step]
    return document


def _shown_path(path: Path) -> str:
    return "." + ".".join(str(step) for step in path) if path else "(root)"


def _wrong_envelope_value(key: str | int, value: Any) -> bool:
    if isinstance(value, Raw | Dup):
        return True
    if key == "v":
        return not (type(value) is int and value == 1)
    if key in ("id", "type", "from"):
        return not isinstance(value, str)
    if key == "ts_ms":
        return type(value) is not int or not 0 <= value <= 2**53 - 1
    if key == "body":
        return not isinstance(value, dict)
    return False


@st.composite
def envelope_swaps(
    draw: st.DrawFn, document: dict[str, Any], own_device: str, other_device: str
) -> Case:
    """The envelope's ``v``, ``type`` or ``from`` set to another plausible value."""
    document = _copy(document)
    key = draw(st.sampled_from(["v", "type", "from"]))
    if key == "v":
        document["v"] = draw(st.sampled_from([0, 2, -1, 2**53, "1", 1.0, True, None]))
    elif key == "type":
        document["type"] = draw(
            st.sampled_from([*(str(t) for t in MessageType), "Presence", "", "job_results"])
        )
    else:
        document["from"] = draw(st.sampled_from([own_device, other_device, "control", "", "+"]))
    return Case(to_bytes(dump(document)), f"swap {key}={document[key]!r}", surely_invalid=False)


@st.composite
def byte_mutations(draw: st.DrawFn, payload: bytes, message_type: MessageType) -> Case:
    """The payload's bytes: padded to its limit or one over, cut, flipped, prefixed, suffixed."""
    limit = MAX_PAYLOAD_BYTES[message_type]
    kind = draw(
        st.sampled_from(["at_limit", "over_limit", "truncate", "flip", "bom", "trailing", "utf8"])
    )
    if kind in ("at_limit", "over_limit"):
        size = limit if kind == "at_limit" else limit + 1
        padding = size - len(payload)
        if padding < 0:
            return Case(payload, kind, surely_invalid=False)
        # JSON whitespace before the closing brace: the same envelope, exactly `size` bytes.
        mutated = payload[:-1] + b" " * padding + payload[-1:]
        return Case(mutated, kind, surely_invalid=kind == "over_limit")
    if kind == "truncate":
        cut = draw(st.integers(0, len(payload) - 1))
        return Case(payload[:cut], f"truncate at {cut}", surely_invalid=True)
    if kind == "flip":
        index = draw(st.integers(0, len(payload) - 1))
        byte = draw(st.integers(0, 255))
        mutated = payload[:index] + bytes([byte]) + payload[index + 1 :]
        return Case(mutated, f"byte {index}={byte:#04x}", surely_invalid=False)
    if kind == "bom":
        return Case(b"\xef\xbb\xbf" + payload, "bom", surely_invalid=True)
    if kind == "trailing":
        tail = draw(st.sampled_from([b"x", b"{}", b"\x00", b"\xff", b",", b"]"]))
        return Case(payload + tail, f"trailing {tail!r}", surely_invalid=True)
    # UTF-8-encoded surrogate, overlong encoding, or a stray continuation byte, in a string.
    bad = draw(st.sampled_from([b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"]))
    index = payload.index(b'"') + 1
    return Case(payload[:index] + bad + payload[index:], f"utf8 {bad!r}", surely_invalid=True)


@st.composite
def raw_payloads(draw: st.DrawFn) -> Case:
    """Bytes with no structure, or JSON that is not an envelope at all."""
    payload = draw(
        st.binary(max_size=2048)
        | st.sampled_from([b"", b"null", b"[]", b"{}", b'""', b"1", b"\x00" * 100, b"{" * 5000])
        | strategies.hostile_json_values.map(lambda value: to_bytes(dump(value)))
    )
    return Case(payload, "raw", surely_invalid=False)


@st.composite
def hostile_cases(
    draw: st.DrawFn, message_type: MessageType, own_device: str, other_device: str
) -> Case:
    """One hostile case built from a valid envelope of ``message_type``."""
    envelope = draw(envelopes(message_type, own_device))
    document = envelope.to_json()
    payload = to_bytes(dump(document, ascii_only=False))
    kind = draw(st.sampled_from(["tree", "tree", "tree", "swap", "bytes", "bytes", "raw"]))
    if kind == "tree":
        return draw(tree_mutations(document))
    if kind == "swap":
        return draw(envelope_swaps(document, own_device, other_device))
    if kind == "bytes":
        return draw(byte_mutations(payload, message_type))
    return draw(raw_payloads())


def verdict(topic: str, payload: bytes) -> str | None:
    """The code :func:`decode` refuses ``payload`` on ``topic`` with, or ``None`` if it decodes."""
    try:
        decode(topic, payload)
    except MessageRefused as exc:
        return exc.code
    return None


# --- the mutations themselves are hostile --------------------------------------------------------

FLEET, DEVICE, OTHER = "acme", "kiosk-1", "kiosk-2"


@pytest.mark.parametrize("message_type", list(MessageType), ids=str)
@fuzz_settings(30)
@given(data=st.data())
def test_what_is_surely_invalid_is_refused_and_decode_raises_nothing_else(
    message_type: MessageType, data: st.DataObject
) -> None:
    """decode either returns or raises a MessageRefused with a code, for every case; a case
    that cannot be valid (a NaN, a lone surrogate, a duplicate key, too deep, one byte over the
    type's limit, a missing or wrongly typed envelope key...) is always refused."""
    case = data.draw(hostile_cases(message_type, DEVICE, OTHER))
    topic = Topic.for_type(FLEET, DEVICE, message_type).value
    count_case("decode", message_type)
    code = verdict(topic, case.payload)
    if case.surely_invalid:
        assert code is not None, case.mutation


@pytest.mark.parametrize("message_type", list(MessageType), ids=str)
@fuzz_settings(5)
@given(data=st.data())
def test_a_payload_at_its_types_limit_decodes_and_one_byte_over_does_not(
    message_type: MessageType, data: st.DataObject
) -> None:
    """Padding a valid envelope with JSON whitespace to exactly the limit keeps it valid."""
    envelope = data.draw(envelopes(message_type, DEVICE))
    payload = to_bytes(dump(envelope.to_json()))
    limit = MAX_PAYLOAD_BYTES[message_type]
    topic = Topic.for_type(FLEET, DEVICE, message_type).value
    at_limit = payload[:-1] + b" " * (limit - len(payload)) + payload[-1:]
    assert len(at_limit) == limit
    assert verdict(topic, at_limit) is None
    assert verdict(topic, at_limit[:-1] + b"  }") == "message_too_large"
