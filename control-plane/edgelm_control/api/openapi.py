"""The OpenAPI 3.1 document, built from the operations the application registers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgelm_control.api.operations import JSON, Operation
from edgelm_control.api.schemas import COMPONENTS

ERROR_NOTE = (
    'Errors answer with the agent\'s body shape, {"error": {"message", "type", "param", '
    '"code"}}; every call under /api/v1 needs `Authorization: Bearer TOKEN` (an operator '
    "token of tokens.json) and answers 401 without one."
)


def build_openapi(operations: Iterable[Operation], *, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": list(op.tags),
            "responses": {
                str(status): _response(reply.description, reply.schema, reply.content_type)
                for status, reply in sorted(op.replies.items())
            },
        }
        if op.params:
            entry["parameters"] = [p.to_openapi() for p in op.params]
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {op.request_type: {"schema": dict(op.request)}},
            }
        # The middleware refuses a URL that is not valid UTF-8 before any route runs, and a
        # path parameter (a device id) is checked before it is looked up: any route may 400.
        entry["responses"].setdefault(
            "400",
            _response(
                "The URL or a parameter is not valid; `param` names it.",
                {"$ref": "#/components/schemas/Error"},
                JSON,
            ),
        )
        if op.public:
            entry["security"] = []
        else:
            entry["responses"].setdefault(
                "401",
                _response(
                    "No operator token, or an unknown one.",
                    {"$ref": "#/components/schemas/Error"},
                    JSON,
                ),
            )
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgelm control plane",
            "version": version,
            "description": ERROR_NOTE,
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"operatorToken": []}],
    }


def _response(description: str, schema: Any, content_type: str) -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {content_type: {"schema": dict(schema)}}}
