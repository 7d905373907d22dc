"""JSON Schema to GBNF, and the checks on a client's GBNF grammar: pure, no runtime."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.gbnf import check_client_grammar, literal
from edgelm_agent.generation.json_schema_grammar import (
    UnsupportedSchema,
    guidance_schema,
    integer_range_patterns,
    schema_gbnf,
)
from edgelm_agent.generation.structured_output import parse_output_constraint

LIMIT = 10**16 - 1


def range_regex(low: int, high: int) -> re.Pattern[str]:
    """The patterns of integer_range_patterns as one Python regex."""
    alternatives = []
    for sign, digits in integer_range_patterns(low, high):
        alternatives.append(re.escape(sign) + "".join(f"[{a}-{b}]{{{n}}}" for a, b, n in digits))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def rule_names(grammar: str) -> list[str]:
    return [line.split(" ::= ")[0] for line in grammar.splitlines() if " ::= " in line]


class TestIntegerRanges:
    @given(
        st.integers(-(10**6), 10**6),
        st.integers(0, 10**6),
        st.lists(st.integers(-(10**7), 10**7), max_size=50),
    )
    def test_patterns_match_exactly_the_range(self, low, width, probes):
        """Every integer in [low, high] matches and none outside does, with no leading zeros."""
        high = low + width
        pattern = range_regex(low, high)
        near = [*range(low - 12, low + 12), *range(high - 12, high + 12), *probes]
        for n in near:
            assert bool(pattern.fullmatch(str(n))) == (low <= n <= high), n
        assert not pattern.fullmatch("-0")
        assert not pattern.fullmatch("0" + str(abs(high) or 1))

    def test_bounds_become_a_range_rule(self):
        """minimum/exclusiveMaximum on an integer give a rule of exactly that range."""
        grammar = schema_gbnf({"type": "integer", "minimum": 7, "exclusiveMaximum": 12})
        assert "root ::= s-integer" in grammar
        assert 's-integer ::= [7-9] | "1" [0-1]' in grammar


class TestSchemaGrammar:
    def test_layout_is_fixed_and_required_members_are_in_order(self):
        """Members follow the schema's order with json.dumps's separators; optional ones may
        be left out."""
        grammar = schema_gbnf(
            {
                "type": "object",
                "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
                "required": ["b"],
            }
        )
        assert '"\\"a\\": " boolean' in grammar
        assert '", " "\\"b\\": " null' in grammar
        assert "[ \\t\\n]" not in grammar  # no free whitespace anywhere

    def test_rule_names_are_unique_whatever_the_property_names(self):
        """Property names that sanitize alike, or like a primitive, never clash."""
        grammar = schema_gbnf(
            {
                "type": "object",
                "properties": {
                    "_": {"type": "string", "maxLength": 2},
                    "-": {"type": "string", "maxLength": 3},
                    "string": {"type": "string", "maxLength": 4},
                    "object": {"type": "object", "properties": {"x": {}}},
                },
            }
        )
        names = rule_names(grammar)
        assert len(names) == len(set(names))
        assert "string ::= " + r'"\"" char* "\""' in grammar  # the primitive kept its body

    def test_refs_and_recursion_become_rules(self):
        """A local $ref is a rule; a recursive one refers to itself."""
        grammar = schema_gbnf(
            {
                "$defs": {
                    "node": {
                        "type": "object",
                        "properties": {
                            "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}
                        },
                    }
                },
                "$ref": "#/$defs/node",
            }
        )
        (ref,) = [n for n in rule_names(grammar) if n.endswith("-ref")]
        assert grammar.count(ref) >= 3  # root uses it, it is defined, and it recurses

    def test_unsupported_features_are_all_named_with_their_place(self):
        """Every keyword the grammar cannot enforce is named, with its JSON pointer."""
        with pytest.raises(UnsupportedSchema) as info:
            schema_gbnf(
                {
                    "type": "object",
                    "properties": {
                        "email": {"type": "string", "format": "email"},
                        "score": {"type": "number", "maximum": 1},
                        "pick": {"oneOf": [{"type": "string"}]},
                        "ext": {"$ref": "https://example.com/schema"},
                    },
                    "required": ["email", "missing"],
                    "uniqueItems": True,
                },
                param="response_format.json_schema.schema",
            )
        error = info.value
        assert error.param == "response_format.json_schema.schema"
        assert error.code == "unsupported_schema"
        assert set(error.features) == {
            "unsupported keyword 'uniqueItems' at /",
            "required property 'missing' that 'properties' lacks at /",
            "unsupported keyword 'format' at /properties/email",
            "'maximum' on a number (only integers take bounds) at /properties/score",
            "unsupported keyword 'oneOf' at /properties/pick",
            "'$ref' 'https://example.com/schema' (only references inside the schema) "
            "at /properties/ext",
        }

    @pytest.mark.parametrize(
        ("schema", "says"),
        [
            ({"type": "string", "maxLength": 100_000}, "at most 2000"),
            ({"type": "array", "minItems": 3, "maxItems": 2}, "above 'maxItems'"),
            ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer meets"),
            (False, "no value satisfies"),
            ({"type": "decimal"}, "unknown type"),
        ],
    )
    def test_schemas_no_grammar_can_hold_are_refused(self, schema, says):
        """Bounds too large to spell out, or that nothing meets, are a 400 saying so."""
        with pytest.raises(UnsupportedSchema, match=re.escape(says)):
            schema_gbnf(schema)

    def test_deep_nesting_is_refused_not_a_crash(self):
        """A schema nested thousands deep is a 400, not a RecursionError."""
        schema: dict[str, object] = {"type": "integer"}
        for _ in range(3000):
            schema = {"type": "array", "items": schema}
        with pytest.raises(UnsupportedSchema, match="nested deeper"):
            schema_gbnf(schema)

    def test_guidance_schema_holds_the_same_documents(self):
        """For llguidance, objects with properties take no other keys, and the layout is set."""
        schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}
        normalized = guidance_schema(schema)
        assert normalized["additionalProperties"] is False
        assert normalized["properties"]["a"]["additionalProperties"] is False
        assert normalized["x-guidance"]["item_separator"] == ", "
        assert "additionalProperties" not in schema  # the client's schema is left as it was


class TestClientGrammar:
    @pytest.mark.parametrize(
        ("grammar", "says"),
        [
            ("", "empty"),
            ('start ::= "a"', "no 'root"),
            ('root ::= "a" [\\x00-\\x1F]', "NUL"),
            ('root ::= "\\u0000"', "NUL"),
            ('root ::= "\\x001"', "NUL"),
            ('root ::= "a" <|im_end|>', "token"),
            ('root ::= "a" <[2]>', "token"),
            ('root ::= "abc', "unterminated string"),
            ("root ::= [abc", "unterminated character class"),
        ],
    )
    def test_grammars_that_could_crash_the_runtime_are_refused(self, grammar, says):
        """NUL, token references and unterminated literals never reach llama.cpp."""
        with pytest.raises(InvalidRequest, match=re.escape(says)) as info:
            check_client_grammar(grammar)
        assert info.value.param == "grammar"

    @pytest.mark.parametrize(
        "grammar",
        [
            'root ::= "<tool>" [^<]+  # a "<" in a string, a class and a comment is text',
            'root ::= "\\x01" | "\\\\x00"',
            "root ::= item+\nitem ::= [a-z]",
        ],
    )
    def test_ordinary_grammars_pass(self, grammar):
        """Angle brackets inside literals, classes and comments are text, not token refs."""
        check_client_grammar(grammar)

    @given(st.text())
    def test_literal_round_trips_through_json_escapes(self, text):
        """literal() writes any text as one GBNF string with only known escapes."""
        quoted = literal(text)
        assert quoted.startswith('"')
        assert quoted.endswith('"')
        assert "\n" not in quoted
        assert "\x00" not in quoted


def fanning_defs(levels: int) -> dict[str, object]:
    """$defs where a_k and b_k are each 'a_(k-1) or b_(k-1)': small as JSON, since the
    converter writes each $ref once, but 2**levels paths for llama.cpp."""
    defs: dict[str, object] = {"a0": {"type": "integer"}, "b0": {"type": "boolean"}}
    for k in range(1, levels + 1):
        pair = [{"$ref": f"#/$defs/a{k - 1}"}, {"$ref": f"#/$defs/b{k - 1}"}]
        defs[f"a{k}"] = {"anyOf": pair}
        defs[f"b{k}"] = {"anyOf": list(reversed(pair))}
    return {"$defs": defs, "$ref": f"#/$defs/a{levels}"}


class TestGrammarWork:
    def test_anyof_over_refs_that_fan_out_is_refused_naming_the_limit(self):
        """A 3 KB schema whose grammar would stall llama.cpp is a 400 naming the bound."""
        with pytest.raises(UnsupportedSchema, match="more than 1024 paths") as info:
            schema_gbnf(fanning_defs(31), param="response_format.json_schema.schema")
        assert info.value.param == "response_format.json_schema.schema"
        schema_gbnf(fanning_defs(8))  # 256 paths: fine

    def test_duplicate_alternatives_are_dropped(self):
        """'anyOf' listing the same $ref twice, or a type twice, is one alternative."""
        defs: dict[str, object] = {"a0": {"type": "integer"}}
        for k in range(1, 32):
            ref = {"$ref": f"#/$defs/a{k - 1}"}
            defs[f"a{k}"] = {"anyOf": [ref, ref]}
        grammar = schema_gbnf({"$defs": defs, "$ref": "#/$defs/a31"})
        assert " | " not in grammar.split("a31-ref ::= ")[1].splitlines()[0]

    def test_a_ref_that_can_never_finish_is_refused(self):
        """An array that must hold at least one of itself has no finite document."""
        schema = {
            "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 1}},
            "$ref": "#/$defs/a",
        }
        with pytest.raises(UnsupportedSchema, match="can never finish"):
            schema_gbnf(schema)

    def test_bounds_above_what_llama_cpp_holds_are_refused(self):
        """maxLength 2001 would be read by llama.cpp as no bound at all: refused."""
        schema_gbnf({"type": "string", "maxLength": 2000})
        with pytest.raises(UnsupportedSchema, match="'maxLength' of 2001 \\(at most 2000\\)"):
            schema_gbnf({"type": "string", "maxLength": 2001})


class TestStringCharacters:
    def test_a_string_character_is_a_unicode_character(self):
        """The class of a string's character is positive and stops at U+10FFFF, without
        surrogates: llama.cpp would let byte tokens spell those, and they decode to U+FFFD."""
        grammar = schema_gbnf({"type": "string", "maxLength": 3})
        char = next(line for line in grammar.splitlines() if line.startswith("char ::= "))
        assert char.startswith(r"char ::= [ -!#-\[\]-~\x80-\uD7FF\uE000-\U0010FFFF] | ")
        assert "[^" not in grammar


class TestExtraKeys:
    @pytest.mark.parametrize("extra", [True, {}, {"type": "string"}])
    def test_additional_properties_beside_properties_is_refused(self, extra):
        """Extra keys could repeat a declared one ({"a": 1, "a": "x"}): a 400 naming it."""
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        with pytest.raises(UnsupportedSchema, match="'additionalProperties' other than false"):
            schema_gbnf({**schema, "additionalProperties": extra})
        schema_gbnf({**schema, "additionalProperties": False})

    def test_a_map_without_properties_still_takes_a_value_schema(self):
        """additionalProperties alone is a map of typed values, as before."""
        grammar = schema_gbnf({"type": "object", "additionalProperties": {"type": "integer"}})
        assert "extra-kv" in grammar


class TestEnumSiblings:
    def test_enum_values_the_siblings_refuse_are_left_out(self):
        """{"enum": ["ok", "toolong"], "maxLength": 3} can only give "ok"."""
        grammar = schema_gbnf({"type": "string", "enum": ["ok", "toolong"], "maxLength": 3})
        assert '"\\"ok\\""' in grammar
        assert "toolong" not in grammar

    @pytest.mark.parametrize(
        ("schema", "kept", "dropped"),
        [
            ({"enum": [1, 1.5, "1", True, None], "type": "integer"}, ["1"], ["1.5", "true"]),
            ({"enum": [3, 5, 8], "minimum": 4, "exclusiveMaximum": 8}, ["5"], ["3", "8"]),
            ({"enum": [0.5, 2.5], "type": "number", "maximum": 1}, ["0.5"], ["2.5"]),
            (
                {"enum": [[1], [1, 2, 3]], "maxItems": 2, "items": {"type": "integer"}},
                ["[1]"],
                ["3"],
            ),
            (
                {
                    "enum": [{"a": 1}, {"a": "x"}, {"b": 1}],
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                },
                ['{\\"a\\": 1}'],
                ['\\"x\\"', '\\"b\\"'],
            ),
        ],
    )
    def test_every_sibling_keyword_filters_the_values(self, schema, kept, dropped):
        """type, bounds, items and members all apply to enum values, as JSON Schema says."""
        grammar = schema_gbnf(schema)
        enum_line = next(line for line in grammar.splitlines() if "-enum ::= " in line)
        for text in kept:
            assert text in enum_line
        for text in dropped:
            assert text not in enum_line

    @pytest.mark.parametrize(
        ("schema", "says"),
        [
            ({"type": "string", "const": 5}, "'const' whose values the keywords beside it"),
            ({"enum": ["abc"], "maxLength": 2}, "'enum' whose values the keywords beside it"),
            ({"enum": ["a"], "const": "b"}, "'const' that 'enum' beside it does not list"),
            ({"enum": ["a"], "format": "email"}, "unsupported keyword 'format'"),
            ({"enum": [1e400]}, "a value JSON cannot hold"),
        ],
    )
    def test_values_nothing_beside_them_accepts_are_refused(self, schema, says):
        """When no value is left, or a sibling cannot be checked, the schema is refused."""
        with pytest.raises(UnsupportedSchema, match=re.escape(says)):
            schema_gbnf(schema)

    def test_const_equal_to_an_enum_value_as_json_passes(self):
        """1 and 1.0 are the same JSON value; true and 1 are not."""
        assert "1" in schema_gbnf({"enum": [1.0, True], "const": 1})
        with pytest.raises(UnsupportedSchema):
            schema_gbnf({"enum": [True], "const": 1})


class TestValueDepth:
    @pytest.mark.parametrize("where", ["default", "examples", "const", "properties"])
    def test_a_deep_value_anywhere_is_a_400_not_a_recursion_error(self, where):
        """600 levels of nesting in an annotation, a const or the subschemas is refused
        before any recursive walk (deepcopy, json) can overflow the stack."""
        deep: object = 0
        for _ in range(600):
            deep = {"x": deep}
        schema: dict[str, object] = {"type": "object", where: deep}
        with pytest.raises(UnsupportedSchema, match="nested deeper than 160 levels"):
            schema_gbnf(schema)

    def test_it_is_a_400_through_response_format(self):
        """The request path gives InvalidRequest (400), not a RecursionError (500)."""
        deep: object = 0
        for _ in range(600):
            deep = [deep]
        body = {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "integer", "default": deep}},
            }
        }
        with pytest.raises(InvalidRequest, match="nested deeper") as info:
            parse_output_constraint(body)
        assert info.value.param == "response_format.json_schema.schema"
