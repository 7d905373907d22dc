"""Text that cannot be encoded as UTF-8 is found, with its path, before it goes anywhere."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.openai_schema import decode_json_object, parse_completion
from edgelm_agent.valid_unicode import first_invalid_text, is_valid_text

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


class TestFirstInvalidText:
    @pytest.mark.parametrize(
        ("value", "param"),
        [
            ({"prompt": "h\ud800i"}, "prompt"),
            (
                {"messages": [{"role": "user", "content": "ok"}, {"content": "\udfff"}]},
                "messages[1].content",
            ),
            ({"request": {"prompt": "x"}, "idempotency_key": "k\ud83d"}, "idempotency_key"),
            ({"a": {"b": {"\ud800": 1}}}, "a.b"),
            ({"\ud800": 1}, None),
            ("\ud800", None),
        ],
    )
    def test_names_the_field(self, value, param):
        """The param says which field holds the lone surrogate; for a bad key, the object
        holding it (None for the body itself)."""
        invalid = first_invalid_text(value)
        assert invalid is not None
        assert invalid.param == param

    def test_a_bad_key_names_the_object_holding_it(self):
        """A bad key is reported as a key of its object, a field a client can find."""
        invalid = first_invalid_text({"metadata": {"\ud800": 1}})
        assert invalid is not None
        assert invalid.param == "metadata"
        assert invalid.message.startswith("a key of metadata is not valid Unicode")
        top = first_invalid_text({"\ud800": 1})
        assert top is not None
        assert top.message.startswith("a key of the request body")

    def test_a_base_path_prefixes_the_param(self):
        """Checked below a base (a job's stored request), the param carries the base."""
        invalid = first_invalid_text({"k": {"\ud800": 1}}, "request")
        assert invalid is not None
        assert invalid.param == "request.k"

    def test_whole_characters_pass(self):
        """Emoji, accents and CJK are valid text."""
        assert first_invalid_text({"p": ["😀", "é", "漢字", ""]}) is None

    def test_deep_nesting_does_not_exhaust_the_stack(self):
        """The walk is iterative: a very deep value is checked, not a RecursionError."""
        value: object = "\ud800"
        for _ in range(100_000):
            value = [value]
        assert first_invalid_text(value) is not None

    @given(JSON_VALUES)
    def test_agrees_with_utf8_encoding(self, value):
        """A value passes exactly when its JSON encodes as UTF-8 without escapes."""
        encodable = True
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            encodable = False
        assert (first_invalid_text(value) is None) == encodable

    @given(st.text())
    def test_is_valid_text_matches_encode(self, text):
        """is_valid_text is exactly 'encodes as UTF-8'."""
        try:
            text.encode()
            expected = True
        except UnicodeEncodeError:
            expected = False
        assert is_valid_text(text) == expected


class TestBodiesAtTheDoor:
    @pytest.mark.parametrize(
        "raw",
        [
            b'{"model": "m", "prompt": "h\\ud800i"}',  # a JSON escape
            b'{"model": "m", "prompt": "h\xed\xa0\x80i"}',  # the same surrogate as raw bytes
        ],
    )
    def test_lone_surrogate_is_a_400_naming_the_field(self, raw):
        """Both spellings of a lone surrogate are refused, naming the field."""
        with pytest.raises(InvalidRequest) as refused:
            decode_json_object(raw)
        assert refused.value.param == "prompt"
        assert "not valid Unicode" in str(refused.value)

    @pytest.mark.parametrize("raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}'])
    def test_non_standard_numbers_are_refused(self, raw):
        """NaN and Infinity are not JSON; they are refused rather than stored and re-sent."""
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_json_object(raw)

    @pytest.mark.parametrize("prompt", ["", [""]])
    def test_empty_prompt_is_refused_for_every_model(self, prompt):
        """An empty prompt is a 400 at parse time, whatever the model would make of it."""
        with pytest.raises(InvalidRequest) as refused:
            parse_completion({"model": "m", "prompt": prompt})
        assert refused.value.param == "prompt"
