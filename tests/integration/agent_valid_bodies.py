"""The agent's OpenAPI document, narrowed so that every body generated from it is valid.

The document states every rule of the validators that JSON Schema can state, and states the
rest in words (``edgelm_agent.api.openapi_tools``): a ``tool_choice`` names one of the
``tools``, tool names are unique, a tool call's ``arguments`` are JSON text, a ``required``
property is one of the ``properties``, a grammar is one llama.cpp parses, a preset's
``max_tokens`` fits the import's ``context_length``. Where it cannot be exact it is the looser
one, so a body it forbids is always refused: negative cases come from the document itself.
Positive cases come from this narrowing, which replaces each of those places with a family of
values that keeps the rules (each family is a subset of what the document allows, so the
bodies are still valid under it):

* JSON Schemas (``JsonSchema``, ``PresetSchema``, ``FunctionParameters``): strings, integers,
  numbers, booleans, nulls, enums, consts, arrays, objects and ``anyOf``, nested, with bounds
  that some value meets and ``required`` naming a listed property;
* tools: ``f``, then optionally ``g``; a ``tool_choice`` naming a function names ``f``;
* tool call arguments, and grammars: a few of each that parse.
"""

from __future__ import annotations

import copy
from typing import Any

from edgelm_agent.inference.types import MIN_CONTEXT_LENGTH

Schema = dict[str, Any]

GRAMMARS = [
    'root ::= "yes" | "no"',
    "root ::= [a-z]{1,8}",
    'root ::= item ("," item)*\nitem ::= [0-9]{1,3}',
    '# a "<" in a comment, a literal and a class is text\nroot ::= "<" [^<>]{0,6} ">"',
]
ARGUMENTS = ["{}", '{"city": "Oslo"}', "[1, 2]", '"text"', "null", "1.5"]


def _closed(properties: dict[str, Schema], required: list[str]) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _int(low: int, high: int) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high}


SCHEMA_REF: Schema = {"$ref": "#/components/schemas/JsonSchema"}
#: Values a generated schema's enum or const holds: no fractional numbers, which presets
#: cannot sign.
SCALAR: Schema = {
    "anyOf": [{"type": "string", "maxLength": 12}, _int(-1000, 1000), {"type": "boolean"}]
}
OBJECT_SCHEMA = _closed(
    {
        "type": {"const": "object"},
        "properties": _closed({"a": SCHEMA_REF, "b": SCHEMA_REF}, ["a"]),
        "required": {"type": "array", "maxItems": 1, "items": {"const": "a"}},
    },
    ["type", "properties"],
)
#: Schemas of one value: their alternatives in an anyOf never fan out (the grammar check
#: refuses references that branch before a character more than a set number of ways).
LEAF_SCHEMAS: list[Schema] = [
    _closed(
        {"type": {"const": "string"}, "minLength": _int(0, 4), "maxLength": _int(4, 32)},
        ["type"],
    ),
    _closed(
        {"type": {"const": "integer"}, "minimum": _int(-1000, 0), "maximum": _int(0, 1000)},
        ["type"],
    ),
    _closed({"type": {"enum": ["number", "boolean", "null"]}}, ["type"]),
    _closed(
        {
            "type": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "uniqueItems": True,
                "items": {"enum": ["string", "integer", "boolean", "null"]},
            },
            "title": {"type": "string", "maxLength": 12},
        },
        ["type"],
    ),
    _closed({"enum": {"type": "array", "minItems": 1, "maxItems": 4, "items": SCALAR}}, ["enum"]),
    _closed({"const": SCALAR}, ["const"]),
]
VALID_SCHEMA: Schema = {
    "anyOf": [
        {"const": True},
        *LEAF_SCHEMAS,
        _closed(
            {
                "type": {"const": "array"},
                "items": SCHEMA_REF,
                "minItems": _int(0, 2),
                "maxItems": _int(2, 4),
            },
            ["type"],
        ),
        OBJECT_SCHEMA,
        _closed(
            {
                "anyOf": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": {"anyOf": LEAF_SCHEMAS},
                }
            },
            ["anyOf"],
        ),
    ]
}


def _named_tool(tool: Schema, name: str) -> Schema:
    named = copy.deepcopy(tool)
    named["properties"]["function"]["properties"]["name"] = {"const": name}
    return named


def _two_tools(tool: Schema, *, min_items: int) -> Schema:
    """``f``, then optionally ``g``: never one name twice."""
    return {
        "type": "array",
        "minItems": min_items,
        "prefixItems": [_named_tool(tool, "f"), _named_tool(tool, "g")],
        "items": False,
    }


def _choose_f(choice: Schema) -> Schema:
    """A tool_choice whose function form names ``f``, the first tool."""
    narrowed = copy.deepcopy(choice)
    for branch in narrowed["anyOf"]:
        if "properties" in branch:
            branch["properties"]["function"]["properties"]["name"] = {"const": "f"}
    return narrowed


GENERATION_REQUESTS = ("ChatRequest", "CompletionRequest")


def valid_bodies_document(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of the agent's ``document`` whose request bodies keep the rules it states in
    words (see the module docstring)."""
    narrowed = copy.deepcopy(document)
    schemas = narrowed["components"]["schemas"]
    schemas["JsonSchema"] = VALID_SCHEMA
    schemas["PresetSchema"] = VALID_SCHEMA
    schemas["FunctionParameters"] = OBJECT_SCHEMA
    schemas["ToolCall"]["properties"]["function"]["properties"]["arguments"] = {"enum": ARGUMENTS}
    schemas["Tools"] = _two_tools(schemas["Tool"], min_items=0)
    schemas["ToolChoice"] = _choose_f(schemas["ToolChoice"])
    for name in GENERATION_REQUESTS:
        schemas[name]["properties"]["grammar"] = {"anyOf": [{"enum": GRAMMARS}, {"type": "null"}]}
    preset = schemas["Preset"]
    fields = preset["properties"]
    fields["tools"] = _two_tools(fields["tools"]["items"], min_items=1)
    fields["tool_choice"] = _choose_f(fields["tool_choice"])
    fields["sampling"]["properties"]["max_tokens"]["maximum"] = MIN_CONTEXT_LENGTH
    preset["allOf"].append(
        {
            "description": "a function it names is one of its tools",
            "not": {
                "required": ["tool_choice"],
                "properties": {"tool_choice": {"type": "object"}},
                "not": {"required": ["tools"]},
            },
        }
    )
    return narrowed
