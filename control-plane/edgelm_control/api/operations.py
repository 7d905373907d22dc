"""A route as data: its method, path, handler and the OpenAPI facts about it, in one value.

Each routes module lists its :class:`Operation` values next to its handlers; the application
registers exactly those (:func:`register`), and the OpenAPI document is built from exactly
those (:mod:`.openapi`). A route therefore cannot exist without being documented, and a test
checks the document against the router anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = Mapping[str, Any]

JSON = "application/json"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" or "query"
    schema: Schema
    description: str
    required: bool = False

    def to_openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "description": self.description,
            "schema": dict(self.schema),
        }


@dataclass(frozen=True)
class Reply:
    description: str
    schema: Schema | None = None
    content_type: str = JSON


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    request: Schema | None = None
    request_type: str = JSON
    params: tuple[Param, ...] = ()
    public: bool = False  # no bearer token (health, metrics, the repository)
    tags: tuple[str, ...] = field(default_factory=tuple)
    router_path: str | None = None  # aiohttp's form, when it needs a regex ({path:.+})


def register(app: web.Application, operations: Iterable[Operation]) -> None:
    for op in operations:
        app.router.add_route(op.method, op.router_path or op.path, op.handler, name=op.operation_id)


LIMIT = Param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size (100)."
)
CURSOR = Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page.")
