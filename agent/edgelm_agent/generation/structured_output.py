"""``response_format`` and the ``grammar`` extension: what a reply must match. Pure.

* ``{"type": "text"}`` (or nothing): free text.
* ``{"type": "json_object"}``: any JSON object.
* ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``: a document the
  schema accepts (``strict`` is accepted and changes nothing: the agent always enforces).
* ``"grammar": "root ::= ..."``: a GBNF grammar, as llama-server takes it (llama.cpp only).

Each becomes an :class:`~edgelm_agent.inference.types.OutputConstraint`; whether the model's
runtime can apply it is the backend's to say (see ``Backend.check_constraint``).
"""

from __future__ import annotations

import json
from typing import Any

from edgelm_agent.errors import InvalidRequest, shown
from edgelm_agent.generation.gbnf import check_client_grammar
from edgelm_agent.generation.json_schema_grammar import (
    GUIDANCE_LAYOUT,
    guidance_schema,
    json_object_gbnf,
    schema_gbnf,
)
from edgelm_agent.inference.types import OutputConstraint

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
SCHEMA_PARAM = "response_format.json_schema.schema"


def parse_output_constraint(data: dict[str, Any]) -> OutputConstraint | None:
    """The constraint a request body asks for; None for free text."""
    response_format = _response_format(data.get("response_format"))
    grammar = data.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise InvalidRequest(
                f"'grammar' must be a GBNF grammar as a string, got {shown(grammar)}",
                param="grammar",
            )
        if response_format is not None:
            raise InvalidRequest("give 'response_format' or 'grammar', not both", param="grammar")
        check_client_grammar(grammar)
        return OutputConstraint(kind="grammar", gbnf=grammar, description="the request's grammar")
    return response_format


def _response_format(value: Any) -> OutputConstraint | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format must be an object whose type is one of "
            f"{', '.join(RESPONSE_FORMATS)}, got {shown(value)}",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(
            kind="json_object",
            gbnf=json_object_gbnf(),
            guidance=("json_schema", json.dumps({"type": "object", "x-guidance": GUIDANCE_LAYOUT})),
            description="a JSON object",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest(
            "response_format.json_schema must be an object with a 'schema'",
            param="response_format.json_schema",
        )
    name = spec.get("name", "")
    if not isinstance(name, str):
        raise InvalidRequest(
            "response_format.json_schema.name must be a string",
            param="response_format.json_schema.name",
        )
    if "schema" not in spec:
        raise InvalidRequest(
            "response_format.json_schema has no 'schema'", param="response_format.json_schema"
        )
    schema = spec["schema"]
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(
            f"{SCHEMA_PARAM} must be a JSON schema object, got {shown(schema)}",
            param=SCHEMA_PARAM,
        )
    return OutputConstraint(
        kind="json_schema",
        gbnf=schema_gbnf(schema, param=SCHEMA_PARAM),
        guidance=("json_schema", json.dumps(guidance_schema(schema))),
        description=f"the JSON schema {name!r}" if name else "the JSON schema",
    )
