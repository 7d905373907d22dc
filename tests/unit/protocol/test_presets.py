"""Prompt presets in a target's signed metadata: what is signed, and what is refused before.

Limits and patterns are restated as literals (64 KiB, 64 presets, the name pattern), so a test
does not inherit a mistake from the constant it tests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical

from edgelm_protocol.errors import InvalidModelMetadata
from edgelm_protocol.preset_files import presets_from_document
from edgelm_protocol.presets import Preset, PresetSampling, parse_presets, presets_custom
from edgelm_protocol.targets import model_target_from_dict, parse_model_target

SHA = "ab" * 32
PATH = "models/tiny/1.0/model.gguf"
INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {"total": {"type": "integer", "minimum": 0}, "paid": {"type": "boolean"}},
    "required": ["total", "paid"],
}
EXTRACT: dict[str, Any] = {
    "description": "Invoice fields",
    "system": "You read invoices.",
    "response_format": {"type": "json_schema", "json_schema": {"name": "inv", "schema": INVOICE}},
    "sampling": {"temperature": "0.2", "max_tokens": 64, "stop": ["END"]},
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def edgelm(**fields: Any) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": "tiny",
            "version": "1.0",
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 512,
            "chat_template": None,
            "quantization": "F32",
            "min_ram_bytes": 1,
            "sampling": {},
            "health_check": {},
            **fields,
        }
    }


def parse(presets: Any, **fields: Any):
    return parse_model_target(PATH, 10, {"sha256": SHA}, edgelm(presets=presets, **fields))


def refused(presets: Any, match: str) -> InvalidModelMetadata:
    with pytest.raises(InvalidModelMetadata, match=match) as caught:
        parse(presets)
    return caught.value


class TestSignedForm:
    def test_a_target_with_presets_parses_and_signs_them_back(self) -> None:
        """The custom field round-trips: what is parsed is what is signed again."""
        target = parse({"extract": EXTRACT})
        [preset] = target.presets
        assert preset.name == "extract"
        assert preset.system == "You read invoices."
        assert preset.sampling == PresetSampling(temperature=0.2, max_tokens=64, stop=("END",))
        assert target.custom()["presets"] == {"extract": EXTRACT}
        assert target.preset("extract") == preset
        assert target.preset("other") is None

    def test_a_target_without_presets_signs_as_before(self) -> None:
        """No presets, no key: metadata signed before presets existed stays byte-identical."""
        assert "presets" not in parse(None).custom()
        assert "presets" not in parse({}).custom()

    def test_the_registry_record_round_trips(self) -> None:
        """The agent's state file keeps presets exactly (as_dict, then from_dict)."""
        target = parse({"extract": EXTRACT, "assist": {"tools": [WEATHER_TOOL]}})
        assert model_target_from_dict(target.as_dict()) == target

    def test_the_signed_form_is_canonical_json(self) -> None:
        """TUF signs canonical JSON: the presets encode (no floats anywhere)."""
        target = parse({"extract": EXTRACT})
        canonical = encode_canonical(target.custom())
        assert canonical is not None
        assert json.loads(canonical)["presets"] == {"extract": EXTRACT}

    def test_request_fields_are_openai_fields(self) -> None:
        """A preset as request fields: OpenAI's shapes, decimals as numbers again."""
        [preset] = parse({"extract": EXTRACT}).presets
        assert preset.request_fields() == {
            "response_format": EXTRACT["response_format"],
            "temperature": 0.2,
            "max_tokens": 64,
            "stop": ["END"],
        }
        assert preset.summary() == {"name": "extract", "description": "Invoice fields"}

    def test_an_embedding_model_takes_no_presets(self) -> None:
        """Presets shape generations; an embedding target with some is refused."""
        with pytest.raises(InvalidModelMetadata, match="embedding model takes no presets"):
            parse({"extract": EXTRACT}, role="embedding")


# A valid preset, built from its parts; every one round-trips through its signed form.
decimals = st.integers(0, 100).map(lambda n: n / 100)
valid_presets = st.builds(
    Preset,
    name=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    description=st.text(max_size=30),
    system=st.text(min_size=1, max_size=40).filter(str.strip),
    response_format=st.sampled_from(
        [
            None,
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "inv", "schema": INVOICE}},
        ]
    ),
    sampling=st.builds(
        PresetSampling,
        temperature=st.none() | decimals.map(lambda d: d * 2),
        top_p=st.none() | decimals,
        top_k=st.none() | st.integers(0, 100),
        max_tokens=st.none() | st.integers(1, 512),
        seed=st.none() | st.integers(-(2**63), 2**64 - 1),
        stop=st.lists(st.text(min_size=1, max_size=5), max_size=4).map(tuple),
    ),
)


class TestRoundTrip:
    @given(st.lists(valid_presets, max_size=4, unique_by=lambda p: p.name))
    def test_any_valid_presets_survive_signing_and_parsing(self, presets: list[Preset]) -> None:
        """Signed form (canonical JSON can sign it), on the wire, parsed again: the same."""
        signed = presets_custom(tuple(presets))
        encode_canonical(signed)  # what TUF signs: it raises on anything it cannot carry
        wire = json.loads(json.dumps(signed))
        parsed = parse_presets(wire, "t", context_length=512)
        assert {p.name: p for p in parsed} == {p.name: p for p in presets}


class TestRefused:
    @given(st.text(max_size=70))
    def test_a_name_is_accepted_exactly_when_it_is_a_safe_identifier(self, name: str) -> None:
        """1-64 of a-z 0-9 _ -, starting with a letter or digit; nothing else signs."""
        if re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name) is not None:
            assert [p.name for p in parse_presets({name: {"system": "hi"}}, "t")] == [name]
        else:
            with pytest.raises(InvalidModelMetadata, match="preset name must be"):
                parse_presets({name: {"system": "hi"}}, "t")

    @pytest.mark.parametrize(
        ("preset", "match"),
        [
            ({"sytem": "x"}, r"unknown field 'sytem'"),
            ({"system": ""}, r"system must be a non-empty string"),
            ({"description": "only words"}, r"sets nothing"),
            ({"response_format": {"type": "text"}}, r"json_object or json_schema"),
            ({"response_format": {"type": "json_schema", "json_schema": {}}}, r"has no 'schema'"),
            (
                {"response_format": {"type": "json_object", "schema": {}}},
                r"response_format has unknown field 'schema'",
            ),
            ({"tools": []}, r"non-empty list of function tools"),
            ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, r"names the function 'get_weather' twice"),
            (
                {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {}}},
                r"tool_choice names the function None",
            ),
            ({"tool_choice": "required", "system": "x"}, r"'required' but the preset has no"),
            (
                {"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
                r"sets both response_format and tools",
            ),
            ({"sampling": {"temperature": "2.5"}}, r"temperature must be a decimal from 0 to 2"),
            ({"sampling": {"temperature": "warm"}}, r"temperature must be a decimal"),
            ({"sampling": {"top_p": 2}}, r"top_p must be a decimal from 0 to 1"),
            ({"sampling": {"max_tokens": 0}}, r"max_tokens must be an integer from 1 to 512"),
            ({"sampling": {"max_tokens": 513}}, r"max_tokens must be an integer from 1 to 512"),
            ({"sampling": {"stop": ["a"] * 5}}, r"stop must be"),
            ({"sampling": {"min_p": "0.1"}}, r"unknown field 'min_p'"),
        ],
    )
    def test_a_bad_preset_is_refused_naming_its_place(self, preset: Any, match: str) -> None:
        """Each fault names the preset and the field, so the operator can find it."""
        error = refused({"p1": preset}, match)
        assert "edgelm.presets.p1" in str(error)

    def test_unsupported_schema_keywords_are_named_with_their_pointers(self) -> None:
        """The keywords the agent cannot enforce are refused before signing, each named."""
        schema = {
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}},
            "patternProperties": {},
        }
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
        error = refused({"p1": {"response_format": fmt}}, "cannot be enforced")
        assert "unsupported keyword 'pattern' at /properties/code" in str(error)
        assert "unsupported keyword 'patternProperties' at /" in str(error)

    def test_a_tools_parameters_are_checked_too(self) -> None:
        """A function's parameters pass the same keyword check as a response schema."""
        tool = {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "oneOf": []}},
        }
        refused({"p1": {"tools": [tool]}}, r"tools\[0\]\.function\.parameters cannot be enforced")

    def test_a_float_is_refused_as_unsignable(self) -> None:
        """Canonical JSON has no floats; a float in the custom field never came from a signer."""
        refused({"p1": {"sampling": {"temperature": 0.5}}}, "fractional number")

    def test_more_than_64_presets_are_refused(self) -> None:
        """The count is bounded."""
        refused({f"p{i}": {"system": "x"} for i in range(65)}, "holds 65 presets; at most 64")

    def test_presets_over_64_kib_are_refused(self) -> None:
        """The size is bounded: every device fetches every model's signed metadata."""
        error = refused({"p1": {"system": "x" * 65536}}, r"bytes of JSON; at most 65536")
        assert "p1" not in str(error)  # the whole object's size, not one preset's

    def test_not_an_object_is_refused(self) -> None:
        """presets is an object of named presets."""
        refused(["p1"], "must be an object of named presets")


class TestPresetFiles:
    TOML = b"""
[extract]
description = "Invoice fields"
system = \"\"\"You read invoices.\"\"\"
sampling = { temperature = 0.2, max_tokens = 64, stop = "END" }

[extract.response_format]
type = "json_schema"
json_schema = { name = "inv", schema = { type = "object", required = ["total", "paid"], \
properties = { total = { type = "integer", minimum = 0.0 }, paid = { type = "boolean" } } } }
"""

    def test_toml_and_json_sign_the_same(self) -> None:
        """The TOML file and its JSON twin give one signed object, decimals as strings and a
        whole float as an integer."""
        from_toml = presets_from_document(self.TOML, suffix=".toml")
        expected = {**EXTRACT, "sampling": {"temperature": "0.2", "max_tokens": 64, "stop": "END"}}
        assert from_toml == {"extract": expected}
        as_json = json.dumps({"extract": {**EXTRACT, "sampling": {"temperature": 0.2}}})
        from_json = presets_from_document(as_json.encode(), suffix=".JSON")
        assert from_json["extract"]["sampling"] == {"temperature": "0.2"}

    def test_a_fraction_in_a_schema_is_refused_with_its_place(self) -> None:
        """0.5 cannot be signed; the error says where it is."""
        data = (
            b'{"x": {"response_format": {"type": "json_schema", "json_schema": {"schema": '
            b'{"enum": [1, 0.5]}}}}}'
        )
        with pytest.raises(InvalidModelMetadata, match=r"presets\.x\.response_format.*\[1\]"):
            presets_from_document(data, suffix=".json")

    @pytest.mark.parametrize(
        ("data", "suffix", "match"),
        [
            (b"{}", ".yaml", "must end in .toml or .json"),
            (b"[x", ".toml", "not valid TOML"),
            (b'{"a": {"system": "x"}, "a": {}}', ".json", "duplicate key"),
            (b"[]", ".json", "one table"),
            (b"", ".toml", "one table"),
            (b'x = "y"', ".toml", "must be a table"),
            (b"[a]\nsystem = 1979-05-27\n", ".toml", "must be a JSON value"),
            (b"[A]\nsystem = 'x'\n", ".toml", "preset name must be"),
            (b" " * (1 << 20) + b"{}", ".json", "at most 1048576 bytes"),
        ],
    )
    def test_a_bad_file_says_what_is_wrong(self, data: bytes, suffix: str, match: str) -> None:
        """Each fault of the file is one clear error."""
        with pytest.raises(InvalidModelMetadata, match=match):
            presets_from_document(data, suffix=suffix)
