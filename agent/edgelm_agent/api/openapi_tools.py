"""What the agent's OpenAPI document says of structured output, tool calls and prompt presets.

Each schema states every rule of its validator that JSON Schema can state, with the
validator's own constants:

* ``response_format`` and ``grammar``: :mod:`edgelm_agent.generation.structured_output`, the
  grammar builder :mod:`edgelm_agent.generation.json_schema_grammar` and the GBNF checks of
  :mod:`edgelm_agent.generation.gbnf`;
* ``tools``, ``tool_choice`` and the messages' ``tool_calls``:
  :mod:`edgelm_agent.generation.tool_calls`;
* an import's ``presets``: :mod:`edgelm_protocol.presets`.

The rest relate one value to another (a ``tool_choice`` names one of the ``tools``, a
``required`` property is one of the ``properties``, a tool call's ``arguments`` hold JSON) or
depend on the runtime (llama.cpp parses a grammar): JSON Schema cannot state them, so each
schema's ``description`` does. Where a request schema cannot be exact it is the looser one, so
that a body it forbids is always refused; the tests generate valid bodies from a document
narrowed to those rules (``tests/integration/agent_valid_bodies.py``).
"""

from __future__ import annotations

from edgelm_agent.api.openapi_parts import (
    BOOL,
    INT,
    NON_EMPTY,
    NULL,
    STR,
    Schema,
    char_class,
    nullable,
    obj,
    present,
    ref,
)
from edgelm_agent.generation.gbnf_check import MAX_GRAMMAR_BYTES, MAX_PATHS, MAX_REPEAT
from edgelm_agent.generation.json_schema_grammar import (
    ANNOTATIONS,
    KEYWORDS,
    MAX_BOUND,
    MAX_DEPTH,
    TYPES,
)
from edgelm_agent.generation.tool_calls import MAX_TOOLS, TOOL_NAME
from edgelm_protocol.presets import (
    MAX_PRESETS,
    MAX_PRESETS_BYTES,
    MAX_STOP_SEQUENCES,
    PRESET_NAME_RE,
    SEED_RANGE,
    TOOL_CHOICES,
    TOP_K_MAX,
)

# --- response_format and grammar -------------------------------------------------------------

#: What a schema's keywords mean to the grammar builder, beyond their names.
SCHEMA_RULES = (
    "Subschemas (properties, items, additionalProperties, anyOf, and the $defs or "
    "definitions a $ref names) take the same keywords, each as JSON Schema 2020-12 defines "
    "it, and the builder also refuses: `$ref` other than `#` or `#/...` inside the schema, or "
    "beside other keywords; `anyOf` beside other keywords; a `required` name that "
    "`properties` lacks; bounds on a `number` (only integers take them); integer bounds "
    "that no integer meets; `minLength`, `maxLength`, `minItems` or `maxItems` above "
    f"{MAX_BOUND}, or a minimum above its maximum; an empty `enum` or `anyOf`; `false` where "
    "a value must match; nesting deeper than "
    f"{MAX_DEPTH}. An object with `properties` takes no other members unless "
    "`additionalProperties` says so."
)
JSON_SCHEMA: Schema = {
    "description": (
        "A JSON Schema the reply is held to while it is generated: `true`, or an object of "
        f"these keywords, enforced: {', '.join(sorted(KEYWORDS))}; and these annotations, "
        f"ignored: {', '.join(sorted(ANNOTATIONS))}. Any other keyword is a 400 "
        f"`unsupported_schema` naming each place that uses it. {SCHEMA_RULES} On llama.cpp, "
        'the grammar made from it must not recurse on its left (`{"$ref": "#"}`).'
    ),
    "anyOf": [
        {"const": True},
        {
            "type": "object",
            "properties": dict.fromkeys(sorted(KEYWORDS | ANNOTATIONS), True),
            "additionalProperties": False,
        },
    ],
}
#: ``response_format`` types that hold the reply to JSON.
HELD_TO_JSON: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["json_object", "json_schema"]}},
}
RESPONSE_FORMAT: Schema = {
    "description": (
        "text: free text; json_object: any JSON object; json_schema: a document "
        "`json_schema.schema` accepts (`name` is a label; `strict` and `description` are "
        "accepted and change nothing: the agent always enforces)"
    ),
    "anyOf": [
        obj({"type": {"const": "text"}}, closed=False),
        obj({"type": {"const": "json_object"}}, closed=False),
        obj(
            {
                "type": {"const": "json_schema"},
                "json_schema": obj(
                    {"name": STR, "schema": ref("JsonSchema")}, required=["schema"], closed=False
                ),
            },
            closed=False,
        ),
    ],
}
GRAMMAR: Schema = {
    "type": "string",
    "maxLength": MAX_GRAMMAR_BYTES,
    # What a grammar needs before it parses at all: a `root` rule, and no NUL.
    "pattern": "^(?:[^\\u0000]*[^A-Za-z0-9\\u0000-])?root[ \\t]*::=[^\\u0000]*$",
    "description": (
        f"a GBNF grammar the reply is held to (llama.cpp models only), at most "
        f"{MAX_GRAMMAR_BYTES} bytes of UTF-8, as llama-server takes it; it is parsed as "
        "llama.cpp parses it and refused when it does not parse, has no `root` rule, refers "
        "to a rule it does not define or defines one twice or never uses, refers to a token "
        "(`<...>`), has a point where no character is allowed (NUL, an empty or reversed "
        f"class), a repetition bound above {MAX_REPEAT}, or references that fan out (more "
        f"than {MAX_PATHS} paths before a character). Not with a `response_format` of "
        "json_object or json_schema"
    ),
}

# --- tools -----------------------------------------------------------------------------------

TOOL_NAME_SCHEMA: Schema = {"type": "string", "pattern": f"^{TOOL_NAME.pattern}$"}
FUNCTION_PARAMETERS: Schema = {
    "type": "object",
    "properties": {"type": {"const": "object"}},
    "description": (
        "the function's arguments as a JSON Schema of type object (the default: no "
        "arguments). For each tool the model may call, the same keywords and rules as "
        "response_format's schema (see JsonSchema): the call is generated under its grammar"
    ),
}
TOOL = obj(
    {
        "type": {"const": "function"},
        "function": obj(
            {
                "name": TOOL_NAME_SCHEMA,
                "description": STR,
                "parameters": ref("FunctionParameters"),
            },
            required=["name"],
            closed=False,
        ),
    },
    closed=False,
)
TOOLS: Schema = {
    "type": "array",
    "maxItems": MAX_TOOLS,
    "items": ref("Tool"),
    "description": "functions the model may call; each name once",
}
TOOL_CHOICE: Schema = {
    "description": (
        "with tools: auto (the model decides), none, required (a call), or one function by "
        "name, which must be one of the tools; without tools only auto or none"
    ),
    "anyOf": [
        {"enum": list(TOOL_CHOICES)},
        obj(
            {
                "type": {"const": "function"},
                "function": obj({"name": TOOL_NAME_SCHEMA}, closed=False),
            },
            closed=False,
        ),
    ],
}
#: A call an assistant message made, as the client sends it back.
TOOL_CALL = obj(
    {
        "id": STR,
        "type": {"const": "function"},
        "function": obj(
            {
                "name": NON_EMPTY,
                "arguments": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": "JSON text, as the model wrote it (absent: '{}')",
                },
            },
            required=["name"],
            closed=False,
        ),
    },
    required=["function"],
    closed=False,
)

#: A chat or a completion: ``response_format`` or ``grammar``, not both.
ONE_CONSTRAINT: Schema = {
    "description": "response_format (json_object or json_schema) or grammar, not both",
    "not": {"allOf": [present("response_format", HELD_TO_JSON), present("grammar", STR)]},
}

#: The rules of a chat request that relate its fields (its ``allOf``), with the exception the
#: parser makes: a request that names a preset and no tools may set ``tool_choice`` for the
#: preset's tools, which only the model knows.
CHAT_RULES: list[Schema] = [
    ONE_CONSTRAINT,
    {
        "description": "tool_choice asks for a call only when there are tools",
        "anyOf": [
            {
                "required": ["tools"],
                "properties": {
                    "tools": {"type": "array", "minItems": 1},
                    "tool_choice": nullable(ref("ToolChoice")),
                },
            },
            {"properties": {"tool_choice": {"enum": [None, "none", "auto"]}}},
            {"required": ["preset"], "properties": {"preset": STR, "tools": NULL}},
        ],
    },
    {
        "description": "a reply held to a grammar or JSON cannot also call tools",
        "not": {
            "allOf": [
                {"anyOf": [present("response_format", HELD_TO_JSON), present("grammar", STR)]},
                {
                    "required": ["tools"],
                    "properties": {
                        "tools": {"type": "array", "minItems": 1},
                        "tool_choice": {"not": {"const": "none"}},
                    },
                },
            ]
        },
    },
]
# --- prompt presets, as an import signs them -------------------------------------------------

#: JSON that signed metadata can carry: canonical JSON has no fractional numbers.
SIGNED_JSON: Schema = {
    "description": "JSON without fractional numbers (canonical JSON cannot carry them)",
    "anyOf": [
        STR,
        INT,
        BOOL,
        NULL,
        {"type": "array", "items": ref("SignedJson")},
        {"type": "object", "additionalProperties": ref("SignedJson")},
    ],
}


def _signed_object(properties: dict[str, Schema]) -> Schema:
    """An object whose other members are kept (and signed) as they are."""
    return {**obj(properties), "additionalProperties": ref("SignedJson")}


_BOUND: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_BOUND}
_SUBSCHEMAS: Schema = {"type": "object", "additionalProperties": ref("PresetSchema")}
_KEYWORD_VALUES: dict[str, Schema] = {
    "type": {
        "anyOf": [
            {"enum": list(TYPES)},
            {"type": "array", "minItems": 1, "items": {"enum": list(TYPES)}},
        ]
    },
    "properties": _SUBSCHEMAS,
    "required": {"type": "array", "items": STR},
    "additionalProperties": ref("PresetSchema"),
    "items": ref("PresetSchema"),
    "minItems": _BOUND,
    "maxItems": _BOUND,
    "minLength": _BOUND,
    "maxLength": _BOUND,
    "enum": {"type": "array", "minItems": 1, "items": ref("SignedJson")},
    "const": ref("SignedJson"),
    "anyOf": {"type": "array", "minItems": 1, "items": ref("PresetSchema")},
    "$ref": {"type": "string", "pattern": "^#(/.*)?$"},
    "minimum": INT,
    "maximum": INT,
    "exclusiveMinimum": INT,
    "exclusiveMaximum": INT,
}
_ANNOTATION_VALUES: dict[str, Schema] = {
    "title": STR,
    "description": STR,
    "$comment": STR,
    "$schema": STR,
    "$id": STR,
    "default": ref("SignedJson"),
    "examples": {"type": "array", "items": ref("SignedJson")},
    "deprecated": BOOL,
    "readOnly": BOOL,
    "writeOnly": BOOL,
    "$defs": _SUBSCHEMAS,
    "definitions": _SUBSCHEMAS,
}
assert set(_KEYWORD_VALUES) == KEYWORDS, "a keyword the grammar builder enforces is missing"
assert set(_ANNOTATION_VALUES) == ANNOTATIONS, "an annotation the builder ignores is missing"
PRESET_SCHEMA: Schema = {
    "description": (
        "A JSON Schema signed with a preset: the keywords and rules of JsonSchema, at every "
        "level of it, without fractional numbers"
    ),
    "anyOf": [
        BOOL,
        obj({**_KEYWORD_VALUES, **_ANNOTATION_VALUES}, required=[]),
    ],
}
#: A decimal the way signed metadata writes one: an integer, or a decimal string.
_ONE_OR_LESS = "^(?:0(?:\\.[0-9]+)?|1(?:\\.0+)?)$"
_TWO_OR_LESS = "^(?:[01](?:\\.[0-9]+)?|2(?:\\.0+)?)$"


def _decimal(high: int, pattern: str) -> Schema:
    return {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": high},
            {"type": "string", "pattern": pattern},
        ],
        "description": f'from 0 to {high}; a decimal as a string ("0.7")',
    }


_STOP_TEXT: Schema = {"type": "string", "minLength": 1}
PRESET_SAMPLING = obj(
    {
        "temperature": _decimal(2, _TWO_OR_LESS),
        "top_p": _decimal(1, _ONE_OR_LESS),
        "top_k": {"type": "integer", "minimum": 0, "maximum": TOP_K_MAX},
        "max_tokens": {
            "type": "integer",
            "minimum": 1,
            "description": "at most the import's context_length",
        },
        "seed": {"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
        "stop": {
            "anyOf": [
                _STOP_TEXT,
                {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": _STOP_TEXT},
            ]
        },
    },
    required=[],
)
_SETS_SAMPLING: Schema = {
    "anyOf": [
        {"required": [name]} for name in ("temperature", "top_p", "top_k", "max_tokens", "seed")
    ]
    + [present("stop", {"anyOf": [STR, {"type": "array", "minItems": 1}]})]
}
PRESET_TOOL = obj(
    {
        "type": {"const": "function"},
        "function": obj(
            {
                "name": TOOL_NAME_SCHEMA,
                "description": STR,
                "parameters": {
                    "allOf": [ref("PresetSchema")],
                    "type": "object",
                    "properties": {"type": {"const": "object"}},
                },
                "strict": BOOL,
            },
            required=["name"],
        ),
    }
)
# Python's str.strip() whitespace, spelled out (ECMA-262's \s is not the same set).
_PY_SPACE = char_class(
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_PY_NOT_BLANK = f"[^{_PY_SPACE}]"
PRESET: Schema = {
    **obj(
        {
            "description": STR,
            "system": {
                "type": "string",
                "pattern": _PY_NOT_BLANK,
                "description": "the system prompt; a chat's own system message wins",
            },
            "response_format": {
                "anyOf": [
                    obj({"type": {"const": "json_object"}}),
                    obj(
                        {
                            "type": {"const": "json_schema"},
                            "json_schema": obj(
                                {
                                    "name": STR,
                                    "description": STR,
                                    "schema": ref("PresetSchema"),
                                    "strict": BOOL,
                                },
                                required=["schema"],
                            ),
                        }
                    ),
                ]
            },
            "tools": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_TOOLS,
                "items": PRESET_TOOL,
                "description": "each function name once",
            },
            "tool_choice": {
                "anyOf": [
                    {"enum": list(TOOL_CHOICES)},
                    _signed_object(
                        {
                            "type": {"const": "function"},
                            "function": _signed_object({"name": TOOL_NAME_SCHEMA}),
                        }
                    ),
                ],
                "description": "a function it names is one of the preset's tools",
            },
            "sampling": PRESET_SAMPLING,
        },
        required=[],
    ),
    "allOf": [
        {
            "description": "a preset sets something",
            "anyOf": [
                {"required": ["system"]},
                {"required": ["response_format"]},
                {"required": ["tools"]},
                present("sampling", _SETS_SAMPLING),
            ],
        },
        {
            "description": "tool_choice required needs tools",
            "not": {
                "allOf": [
                    present("tool_choice", {"const": "required"}),
                    {"not": {"required": ["tools"]}},
                ]
            },
        },
        {
            "description": "a reply held to a format cannot also call tools",
            "not": {
                "required": ["response_format", "tools"],
                "properties": {"tool_choice": {"not": {"const": "none"}}},
            },
        },
    ],
}
PRESETS: Schema = {
    "type": "object",
    "maxProperties": MAX_PRESETS,
    "propertyNames": {"pattern": f"^{PRESET_NAME_RE.pattern}$"},
    "additionalProperties": ref("Preset"),
    "description": (
        "prompt presets to sign with the model, by name (what a request's `preset` says); "
        f"at most {MAX_PRESETS_BYTES} bytes as compact JSON"
    ),
}

COMPONENTS: dict[str, Schema] = {
    "ResponseFormat": RESPONSE_FORMAT,
    "JsonSchema": JSON_SCHEMA,
    "Tools": TOOLS,
    "Tool": TOOL,
    "FunctionParameters": FUNCTION_PARAMETERS,
    "ToolChoice": TOOL_CHOICE,
    "ToolCall": TOOL_CALL,
    "Presets": PRESETS,
    "Preset": PRESET,
    "PresetSchema": PRESET_SCHEMA,
    "SignedJson": SIGNED_JSON,
}
