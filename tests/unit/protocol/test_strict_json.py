"""Strict JSON: what json.loads lets through and a receiver must not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given

from edgelm_protocol.errors import MalformedMessage, ProtocolError
from edgelm_protocol.strict_json import (
    JSONValue,
    check_tree,
    child_path,
    dumps_compact,
    loads_strict,
)
from tests.unit.protocol.strategies import hostile_json_values, json_values


def nested(depth: int) -> bytes:
    """An array nested ``depth`` levels deep."""
    return b"[" * depth + b"]" * depth


class TestLoadsStrict:
    @given(value=json_values)
    def test_plain_json_round_trips(self, value: JSONValue) -> None:
        """Any finite, surrogate-free JSON value survives dumps_compact and loads_strict."""
        assert loads_strict(dumps_compact(value)) == value

    def test_duplicate_keys_are_refused(self) -> None:
        """Two parsers must not read two different messages from the same bytes."""
        with pytest.raises(MalformedMessage, match="duplicate key 'v'"):
            loads_strict(b'{"v": 1, "id": "x", "v": 2}')

    def test_duplicate_keys_in_nested_objects_are_refused(self) -> None:
        """The check applies at every level, not only the envelope's."""
        with pytest.raises(MalformedMessage, match="duplicate key 'sha256'"):
            loads_strict(b'{"body": {"hashes": {"sha256": "a", "sha256": "b"}}}')

    @pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
    def test_non_finite_constants_are_refused(self, literal: bytes) -> None:
        """NaN and the infinities are not JSON and would defeat range checks."""
        with pytest.raises(MalformedMessage, match="numbers must be finite"):
            loads_strict(b'{"p50": ' + literal + b"}")

    @pytest.mark.parametrize("literal", [b"1e999", b"-1e400"])
    def test_overflowing_numbers_are_refused(self, literal: bytes) -> None:
        """1e999 would silently become infinity in Python."""
        with pytest.raises(MalformedMessage, match="out of range"):
            loads_strict(b"[" + literal + b"]")

    def test_nesting_at_the_limit_is_accepted(self) -> None:
        """32 levels are fine."""
        assert loads_strict(nested(32)) is not None

    def test_nesting_beyond_the_limit_is_refused(self) -> None:
        """33 levels are refused, naming where."""
        with pytest.raises(MalformedMessage, match="nests deeper than 32") as caught:
            loads_strict(nested(33))
        assert caught.value.field == "[0]" + "[0]" * 31

    def test_nesting_past_the_recursion_limit_is_refused(self) -> None:
        """100 000 levels are a MalformedMessage, not a RecursionError."""
        with pytest.raises(MalformedMessage, match="nests deeper"):
            loads_strict(nested(100_000))

    def test_lone_surrogate_values_are_refused_with_their_path(self) -> None:
        """A \\ud800 escape yields a string that is not UTF-8; the error names its field."""
        with pytest.raises(MalformedMessage, match="lone surrogate") as caught:
            loads_strict(b'{"body": {"reason": "ok \\ud800"}}')
        assert caught.value.field == "body.reason"

    def test_lone_surrogate_keys_are_refused(self) -> None:
        """Keys are strings too; the path names the object that holds the bad key."""
        with pytest.raises(MalformedMessage, match="key holding a lone surrogate") as caught:
            loads_strict(b'{"body": {"labels": {"\\udc00": "x"}}}')
        assert caught.value.field == "body.labels"

    def test_surrogate_pairs_are_accepted(self) -> None:
        """An escaped pair is one valid code point, not a lone surrogate."""
        assert loads_strict(b'"\\ud83d\\ude00"') == "\U0001f600"

    @pytest.mark.parametrize(
        "payload",
        [b"\xff{}", b'{"a": "\xc3"}', b'"\xed\xa0\x80"', b"\xc0\xaf"],
        ids=["invalid-start", "truncated", "encoded-surrogate", "overlong"],
    )
    def test_non_utf8_bytes_are_refused(self, payload: bytes) -> None:
        """Invalid UTF-8 (including UTF-8-encoded surrogates and overlong forms) is refused."""
        with pytest.raises(MalformedMessage, match="must be UTF-8"):
            loads_strict(payload)

    @pytest.mark.parametrize(
        "payload",
        [b"", b"{", b"\xef\xbb\xbf{}", b'{"a": "line\nbreak"}', b"{'a': 1}", b"[1,]", b"1 2"],
        ids=["empty", "truncated", "bom", "raw-newline", "single-quotes", "trailing-comma", "two"],
    )
    def test_invalid_json_is_refused(self, payload: bytes) -> None:
        """Anything the JSON grammar refuses is a MalformedMessage with line and column."""
        with pytest.raises(MalformedMessage, match="must be JSON"):
            loads_strict(payload)

    def test_huge_integer_literals_are_refused(self) -> None:
        """An integer of 5000 digits is a MalformedMessage, not a bare ValueError."""
        with pytest.raises(MalformedMessage):
            loads_strict(b"9" * 5000)

    @given(value=hostile_json_values)
    def test_any_json_text_parses_or_raises_a_protocol_error(self, value: object) -> None:
        """Whatever JSON text a fuzzer writes, the result is a value or a ProtocolError."""
        payload = json.dumps(value).encode()  # NaN, Infinity and \\udXXX escapes included
        try:
            outcome: JSONValue | ProtocolError = loads_strict(payload)
        except ProtocolError as exc:
            outcome = exc
        if isinstance(outcome, ProtocolError):
            assert isinstance(outcome, MalformedMessage)
        else:
            assert dumps_compact(outcome) == dumps_compact(json.loads(payload))


class TestCheckTree:
    @pytest.mark.parametrize(
        ("value", "field"),
        [
            ({"a": float("nan")}, "a"),
            ({"a": [float("inf")]}, "a[0]"),
            ({"a": {1: "x"}}, "a"),
            ({"a": ("tuple",)}, "a"),
            ({"a": {"b": {"x", "y"}}}, "a.b"),
            ({"a": b"bytes"}, "a"),
        ],
    )
    def test_values_json_cannot_carry_are_refused(self, value: object, field: str) -> None:
        """A sender's non-finite float, non-str key, tuple, set or bytes is refused by path."""
        with pytest.raises(MalformedMessage) as caught:
            check_tree(value)
        assert caught.value.field == field

    def test_depth_counts_from_the_root(self) -> None:
        """The root object is level 1."""
        check_tree({"a": {"b": 1}}, max_depth=2)
        with pytest.raises(MalformedMessage, match="nests deeper than 2"):
            check_tree({"a": {"b": {}}}, max_depth=2)


class TestChildPath:
    def test_plain_keys_and_indexes(self) -> None:
        """Paths read like code: body.installed[2].sha256."""
        assert child_path(child_path(child_path("body", "installed"), 2), "sha256") == (
            "body.installed[2].sha256"
        )
        assert child_path("", "v") == "v"

    def test_odd_keys_are_quoted_in_ascii(self) -> None:
        """A key with dots, spaces or surrogates is quoted, so the path stays loggable."""
        assert child_path("body.labels", "a.b") == "body.labels['a.b']"
        assert child_path("x", "\ud800").isascii()
