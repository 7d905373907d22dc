"""The agent's OpenAPI 3.1 document: every route, its bodies, its answers and who may call it.

The routes modules register the handlers; :data:`ROUTES` describes them, one row per method and
path, with the schemas of :mod:`.openapi_schemas`. A test compares the rows with the
application's router both ways, so a route cannot be added or removed without its description,
and the access rows with :mod:`.access`'s rules.

The document holds no secrets, and is served without a token at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from edgelm_agent.api.access import OPENAPI_PATH
from edgelm_agent.api.openapi_schemas import (
    COMPONENTS,
    FREE,
    JSON,
    STR,
    Schema,
    event_stream,
    ref,
)
from edgelm_agent.jobs.lifecycle import JobState


@dataclass(frozen=True)
class Reply:
    description: str
    schema: Schema | None = None
    content_type: str = JSON
    #: Another media type the same status may answer with (a stream), and its schema.
    alternative: tuple[str, Schema] | None = None


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" or "query"
    schema: Schema
    description: str

    def to_openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.where,
            "required": self.where == "path",
            "description": self.description,
            "schema": self.schema,
        }


@dataclass(frozen=True)
class Route:
    """What a client needs to know about one method and path."""

    method: str
    path: str
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    request: str | None = None  # a component's name
    request_required: bool = True
    params: tuple[Param, ...] = ()
    tags: tuple[str, ...] = ()
    #: Who may call it over HTTP: "api" (the api_token, or the admin_token), "admin" (only the
    #: admin_token), or "public" (anyone who passes the Host and Origin checks).
    access: str = "api"


def _error(description: str) -> Reply:
    return Reply(description, ref("Error"))


BAD_REQUEST = _error("A field, a query parameter or the URL is not valid; `param` names it.")
NOT_FOUND_MODEL = _error("No such model (`model_not_found`), named in the message.")
BUSY = _error("The model's wait queue is full (`queue_full`); see Retry-After.")
NOT_READY = _error("No model is loaded yet, or the agent is stopping; see Retry-After.")
REGISTRY_404 = _error("No such model installed or offered (`model_not_installed`).")
REGISTRY_409 = _error("Another registry operation, or the model is in use (`registry_busy`…).")
REGISTRY_422 = _error("The data or the model failed verification or activation.")
GENERATION_REPLIES: dict[int, Reply] = {
    400: BAD_REQUEST,
    404: NOT_FOUND_MODEL,
    429: BUSY,
    503: NOT_READY,
}
ADMIN_REPLIES: dict[int, Reply] = {404: REGISTRY_404, 409: REGISTRY_409, 422: REGISTRY_422}
JOB_ID = Param("job_id", "path", STR, "The job's id, as POST /v1/jobs answered it.")


def _generation(
    path: str, operation_id: str, summary: str, request: str, answer: str, chunk: str
) -> Route:
    return Route(
        "POST",
        path,
        operation_id,
        summary,
        {
            200: Reply(
                "The answer; with stream, server-sent events.",
                ref(answer),
                alternative=("text/event-stream", event_stream(chunk)),
            ),
            **GENERATION_REPLIES,
        },
        request=request,
        tags=("openai",),
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        "healthz",
        "Liveness.",
        {200: Reply("Alive.", ref("Status"))},
        tags=("health",),
    ),
    Route(
        "GET",
        "/readyz",
        "readyz",
        "Readiness: a model is loaded and healthy.",
        {
            200: Reply("Ready.", ref("Readiness")),
            503: Reply("Not ready: loading, no_model, degraded or draining.", ref("Readiness")),
        },
        tags=("health",),
    ),
    Route(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics.",
        {200: Reply("The text exposition format.", STR, "text/plain")},
        tags=("health",),
    ),
    Route(
        "GET",
        OPENAPI_PATH,
        "openapi",
        "This document.",
        {200: Reply("The OpenAPI 3.1 document.", FREE)},
        tags=("meta",),
        access="public",
    ),
    _generation(
        "/v1/chat/completions",
        "createChatCompletion",
        "Chat with the model, through its own chat template.",
        "ChatRequest",
        "ChatCompletion",
        "ChatCompletionChunk",
    ),
    _generation(
        "/v1/completions",
        "createCompletion",
        "Continue a plain text prompt.",
        "CompletionRequest",
        "TextCompletion",
        "TextCompletionChunk",
    ),
    Route(
        "POST",
        "/v1/embeddings",
        "createEmbedding",
        "Embedding vectors for texts or token arrays, from the embedding model.",
        {
            200: Reply("One unit-length vector per input, in input order.", ref("EmbeddingList")),
            **GENERATION_REPLIES,
            500: _error("The configured embedding model failed to load (`model_load_failed`)."),
        },
        request="EmbeddingRequest",
        tags=("openai",),
    ),
    Route(
        "GET",
        "/v1/models",
        "listModels",
        "The model being served.",
        {200: Reply("The served models; empty while none is loaded.", ref("ModelList"))},
        tags=("openai",),
    ),
    Route(
        "GET",
        "/v1/models/{model_id}",
        "getModel",
        "One served model.",
        {200: Reply("The model.", ref("Model")), 404: NOT_FOUND_MODEL},
        params=(Param("model_id", "path", STR, "The model's id."),),
        tags=("openai",),
    ),
    Route(
        "POST",
        "/v1/jobs",
        "submitJob",
        "Submit a durable job; answered once it is on disk.",
        {
            200: Reply("The job this idempotency_key submitted before.", ref("Job")),
            202: Reply("The new job, queued.", ref("Job")),
            400: BAD_REQUEST,
            404: NOT_FOUND_MODEL,
            422: _error("The idempotency_key was used for another submission."),
            503: _error("This agent has no job queue."),
            507: _error("The job queue, the outbox or the disk is full; the message says which."),
        },
        request="JobRequest",
        tags=("jobs",),
    ),
    Route(
        "GET",
        "/v1/jobs",
        "listJobs",
        "Jobs, oldest first, a page at a time.",
        {200: Reply("A page of job summaries.", ref("JobList")), 400: BAD_REQUEST},
        params=(
            Param("state", "query", {"enum": [str(s) for s in JobState]}, "Only jobs in it."),
            Param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 500},
                "Page size (50).",
            ),
            Param(
                "cursor",
                "query",
                {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                "next_cursor of the previous page.",
            ),
        ),
        tags=("jobs",),
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}",
        "getJob",
        "One job: its state, result or error.",
        {200: Reply("The job.", ref("Job")), 404: _error("No such job (`job_not_found`).")},
        params=(JOB_ID,),
        tags=("jobs",),
    ),
    Route(
        "DELETE",
        "/v1/jobs/{job_id}",
        "cancelJob",
        "Cancel a queued job, or stop a running one.",
        {
            200: Reply("The job, cancelled.", ref("Job")),
            404: _error("No such job (`job_not_found`)."),
            409: _error("The job has already finished (`job_conflict`)."),
        },
        params=(JOB_ID,),
        tags=("jobs",),
    ),
    Route(
        "GET",
        "/v1/registry/models",
        "registryModels",
        "Installed models, the active and previous one, pins and history.",
        {200: Reply("The registry's state.", ref("RegistryState"))},
        tags=("registry",),
    ),
    Route(
        "GET",
        "/v1/registry/available",
        "registryAvailable",
        "Models the trusted repository offers (refreshes its metadata).",
        {200: Reply("The offered targets.", ref("Available")), **ADMIN_REPLIES},
        tags=("registry",),
    ),
    Route(
        "POST",
        "/v1/registry/import",
        "registryImport",
        "Sign a local GGUF file or ONNX folder into the device's repository and install it.",
        {
            201: Reply("The model's signed target.", ref("Target")),
            400: BAD_REQUEST,
            **ADMIN_REPLIES,
            507: _error("Not enough disk (`insufficient_space`)."),
        },
        request="ImportRequest",
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/install",
        "registryInstall",
        "Download and verify a model from the fleet repository.",
        {
            201: Reply("The installed target.", ref("Target")),
            400: BAD_REQUEST,
            **ADMIN_REPLIES,
            502: _error("No mirror could deliver the data (`download_failed`)."),
            507: _error("Not enough disk (`insufficient_space`)."),
        },
        request="InstallRequest",
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/activate",
        "registryActivate",
        "Verify, load, health-check and switch to a model.",
        {200: Reply("The target now active.", ref("Target")), 400: BAD_REQUEST, **ADMIN_REPLIES},
        request="ActivateRequest",
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/rollback",
        "registryRollback",
        "Switch back to the previous model.",
        {200: Reply("The target now active.", ref("Target")), **ADMIN_REPLIES},
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/verify",
        "registryVerify",
        "Re-hash installed models against their signed metadata.",
        {
            200: Reply("What each model's check found.", ref("Verified")),
            400: BAD_REQUEST,
            **ADMIN_REPLIES,
        },
        request="VerifyRequest",
        request_required=False,
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/gc",
        "registryGc",
        "Remove models that are not active, previous or pinned.",
        {200: Reply("What was removed.", ref("Collected")), **ADMIN_REPLIES},
        tags=("registry",),
        access="admin",
    ),
    Route(
        "POST",
        "/v1/registry/pin",
        "registryPin",
        "Keep a model through gc, or stop keeping it.",
        {200: Reply("The target and its pin.", ref("Pinned")), 400: BAD_REQUEST, **ADMIN_REPLIES},
        request="PinRequest",
        tags=("registry",),
        access="admin",
    ),
    Route(
        "GET",
        "/v1/sync",
        "syncStatus",
        "The device's link to its fleet: broker, desired state, outbox.",
        {200: Reply("The link's state.", ref("Sync"))},
        tags=("sync",),
    ),
)

#: What any route may answer over HTTP, before its handler runs.
COMMON_REPLIES: dict[int, Reply] = {
    400: _error("The URL's path or query is not valid text (`invalid_request`)."),
    403: _error("The Host or Origin header is not allowed (`host_not_allowed`)."),
    417: _error("An Expect header other than 100-continue (`expectation_failed`)."),
    429: _error("This client is over its rate or in-flight limit; see Retry-After."),
    503: _error("Too many open connections (`too_many_connections`); see Retry-After."),
}
BODY_REPLIES: dict[int, Reply] = {
    408: _error("The body did not arrive in time (`request_timeout`)."),
    413: _error("The body is over max_body_bytes (`payload_too_large`)."),
}
ACCESS_REPLIES: dict[str, dict[int, Reply]] = {
    "api": {401: _error("api_token is set, and the bearer token is missing or wrong.")},
    "admin": {
        401: _error("No bearer token, or neither the api_token nor the admin_token."),
        403: _error(
            "The api_token, which is not enough (`admin_required`); admin_token is unset; "
            "or the Host or Origin header is not allowed."
        ),
    },
    "public": {},
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "api": [{"apiToken": []}, {"adminToken": []}],
    "admin": [{"adminToken": []}],
    "public": [],
}
DESCRIPTION = (
    "The edgelm agent's local API, the same on its Unix socket and its loopback HTTP listener. "
    "Over the socket no token is needed. Over HTTP, every route but this document needs "
    "`Authorization: Bearer <api_token>` when api_token is set, and registry changes need "
    "the admin_token, which is accepted wherever the api_token is. Errors answer "
    '{"error": {"message", "type", "param", "code"}}.'
)


def build_openapi(routes: Iterable[Route] = ROUTES, *, version: str) -> dict[str, Any]:
    """The document for ``routes``: plain JSON, built once per application."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        replies = {**COMMON_REPLIES, **ACCESS_REPLIES[route.access]}
        if route.request is not None:
            replies |= BODY_REPLIES
        replies |= route.replies
        entry: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": list(route.tags),
            "security": SECURITY[route.access],
            "responses": {str(status): _reply(r) for status, r in sorted(replies.items())},
        }
        if route.params:
            entry["parameters"] = [p.to_openapi() for p in route.params]
        if route.request is not None:
            entry["requestBody"] = {
                "required": route.request_required,
                "content": {JSON: {"schema": ref(route.request)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgelm agent", "version": version, "description": DESCRIPTION},
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "api_token: generation, jobs and reads over HTTP",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "admin_token: registry changes over HTTP, and all the rest",
                },
            },
        },
    }


def _reply(reply: Reply) -> dict[str, Any]:
    if reply.schema is None:
        return {"description": reply.description}
    content = {reply.content_type: {"schema": reply.schema}}
    if reply.alternative is not None:
        media_type, schema = reply.alternative
        content[media_type] = {"schema": schema}
    return {"description": reply.description, "content": content}


#: The document, serialized once when the application is built.
OPENAPI_BYTES = web.AppKey("openapi_bytes", bytes)


def register(app: web.Application, version: str) -> None:
    """Serve the document at ``GET /openapi.json``."""
    app[OPENAPI_BYTES] = json.dumps(build_openapi(version=version)).encode()
    app.router.add_get("/openapi.json", serve)  # a literal: tests/unit/test_docs.py reads it


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_BYTES], content_type=JSON)
