"""The field readers every body uses: keys, types, ranges, text rules, JSON paths."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_protocol.errors import MalformedMessage
from edgelm_protocol.ids import check_device_id
from edgelm_protocol.schema import (
    ObjectReader,
    check_integer,
    check_number,
    check_pattern,
    check_text,
)


class TestObjectReader:
    def test_missing_key_is_refused_by_path(self) -> None:
        """A nullable field must still be present; the error names the missing key."""
        with pytest.raises(MalformedMessage, match="missing model") as caught:
            ObjectReader({"seq": 1}, "body", ("seq", "model"))
        assert caught.value.field == "body.model"

    def test_unknown_key_is_refused_by_path(self) -> None:
        """A key the schema does not list is refused, with the allowed keys in the message."""
        with pytest.raises(MalformedMessage, match="unknown key 'modle'") as caught:
            ObjectReader({"seq": 1, "model": None, "modle": "x"}, "body", ("seq", "model"))
        assert caught.value.field == "body.modle"

    def test_extra_keys_kept_when_allowed(self) -> None:
        """An open object keeps its other keys for extra()."""
        reader = ObjectReader({"code": "x", "param": "model"}, "e", ("code",), allow_extra=True)
        assert reader.extra() == {"param": "model"}

    @pytest.mark.parametrize("value", [None, [], "body", 3])
    def test_non_objects_are_refused(self, value: object) -> None:
        """Only a JSON object can be read as one."""
        with pytest.raises(MalformedMessage, match="must be an object"):
            ObjectReader(value, "body", ())

    def test_nested_paths_name_the_leaf(self) -> None:
        """A bad value deep in an object is reported by its full path."""
        reader = ObjectReader({"health": {"tokens_per_s": "fast"}}, "body", ("health",))
        health = reader.nested("health", ("tokens_per_s",))
        with pytest.raises(MalformedMessage) as caught:
            health.number("tokens_per_s")
        assert caught.value.field == "body.health.tokens_per_s"

    def test_items_carry_their_index(self) -> None:
        """Array items are handed out with their own paths."""
        reader = ObjectReader({"ids": ["a", "b"]}, "body", ("ids",))
        assert reader.items("ids", min_items=1, max_items=2) == [
            ("body.ids[0]", "a"),
            ("body.ids[1]", "b"),
        ]
        with pytest.raises(MalformedMessage, match="1 to 1 items"):
            reader.items("ids", min_items=1, max_items=1)

    def test_identifier_errors_become_malformed_with_a_path(self) -> None:
        """An invalid id inside a body is a MalformedMessage naming the field."""
        reader = ObjectReader({"device": "kiosk/17"}, "signed", ("device",))
        with pytest.raises(MalformedMessage, match=r"signed\.device: device id") as caught:
            reader.identifier("device", check_device_id)
        assert caught.value.field == "signed.device"


class TestCheckInteger:
    @pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
    def test_only_ints_are_integers(self, value: object) -> None:
        """A boolean is not an integer, and neither is 1.0 nor '1'."""
        with pytest.raises(MalformedMessage, match="must be an integer"):
            check_integer(value, "body.seq")

    @given(value=st.integers())
    def test_range_is_inclusive(self, value: int) -> None:
        """Values in [minimum, maximum] pass and the rest fail."""
        if -100 <= value <= 100:
            assert check_integer(value, "p", minimum=-100, maximum=100) == value
        else:
            with pytest.raises(MalformedMessage):
                check_integer(value, "p", minimum=-100, maximum=100)

    def test_default_range_is_json_safe(self) -> None:
        """Without bounds, integers are 0 .. 2**53 - 1, so every JSON parser reads them exactly."""
        assert check_integer(2**53 - 1, "p") == 2**53 - 1
        for value in (-1, 2**53):
            with pytest.raises(MalformedMessage):
                check_integer(value, "p")


class TestCheckNumber:
    def test_ints_read_as_floats(self) -> None:
        """3 and 3.0 are the same number."""
        assert check_number(3, "p") == 3.0
        assert isinstance(check_number(3, "p"), float)

    @pytest.mark.parametrize("value", [True, "1.5", None, float("nan"), float("inf"), -0.5])
    def test_non_numbers_and_out_of_range_are_refused(self, value: object) -> None:
        """Booleans, strings, null, NaN, infinity and negatives are refused by default."""
        with pytest.raises(MalformedMessage, match="must be a number"):
            check_number(value, "body.cpu_percent")

    def test_exclusive_minimum(self) -> None:
        """A window of 0 s is refused when the minimum is exclusive."""
        with pytest.raises(MalformedMessage, match="above 0"):
            check_number(0, "body.window_s", exclusive_minimum=True)
        assert check_number(0.001, "body.window_s", exclusive_minimum=True) == 0.001

    def test_huge_integers_do_not_overflow(self) -> None:
        """An integer too large for a float is refused, not an OverflowError."""
        with pytest.raises(MalformedMessage):
            check_number(10**400, "p")


class TestCheckText:
    @pytest.mark.parametrize("value", ["a\x00b", "a\nb", "\x1b[31m", "a\x7f", "a\x85"])
    def test_control_characters_are_refused(self, value: str) -> None:
        """NUL, newline, escape sequences, DEL and C1 controls are refused in single-line text."""
        with pytest.raises(MalformedMessage, match="control characters"):
            check_text(value, "body.agent_version", max_chars=64)

    def test_prose_keeps_newlines_and_tabs_only(self) -> None:
        """Multiline text allows tab and newlines, still not NUL."""
        assert check_text("a\n\tb\r\n", "r", max_chars=64, multiline=True) == "a\n\tb\r\n"
        with pytest.raises(MalformedMessage):
            check_text("a\x00", "r", max_chars=64, multiline=True)

    def test_length_bounds(self) -> None:
        """Empty and over-long text are refused; the limit counts characters."""
        with pytest.raises(MalformedMessage, match="1 to 4 characters"):
            check_text("", "t", max_chars=4)
        with pytest.raises(MalformedMessage, match="got 5"):
            check_text("abcde", "t", max_chars=4)
        assert check_text("ééé", "t", max_chars=3) == "ééé"

    def test_lone_surrogates_are_refused(self) -> None:
        """Text that cannot be encoded as UTF-8 is refused even if given directly."""
        with pytest.raises(MalformedMessage, match="lone surrogate"):
            check_text("ok\udfff", "t", max_chars=10)

    def test_pattern_must_match_in_full(self) -> None:
        """A hex digest with a trailing newline does not match."""
        pattern = re.compile(r"[0-9a-f]{4}")
        assert check_pattern("beef", "h", pattern, "hex") == "beef"
        with pytest.raises(MalformedMessage, match="must be hex"):
            check_pattern("beef\n", "h", pattern, "hex")
