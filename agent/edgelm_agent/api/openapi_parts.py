"""The building blocks of the agent's OpenAPI schemas (JSON Schema 2020-12, as OpenAPI 3.1
uses): a few constant schemas and the helpers that compose them."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]
JSON = "application/json"

STR: Schema = {"type": "string"}
NON_EMPTY: Schema = {"type": "string", "minLength": 1}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
NULL: Schema = {"type": "null"}
FREE: Schema = {"type": "object"}
UNIX_TIME: Schema = {"type": "number", "description": "seconds since the Unix epoch"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, NULL]}


def obj(
    properties: dict[str, Schema], *, required: list[str] | None = None, closed: bool = True
) -> Schema:
    """An object schema; every property is required unless ``required`` says otherwise."""
    schema: Schema = {"type": "object", "properties": properties}
    schema["required"] = sorted(properties) if required is None else sorted(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def present(name: str, schema: Schema) -> Schema:
    """A rule's condition: the body has ``name``, and its value matches ``schema``."""
    return {"required": [name], "properties": {name: schema}}


def char_class(chars: str) -> str:
    """``chars`` as a regular-expression character class body that Python's ``re``, ECMA-262
    (JSON Schema's dialect) and the Rust ``regex`` crate all read the same: ``\\uXXXX``."""
    return "".join(f"\\u{ord(c):04x}" for c in chars)
