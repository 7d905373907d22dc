"""Fuzzing the agent's HTTP API with schemathesis, from the OpenAPI document it serves.

One real agent (a subprocess serving the tiny GGUF model on TCP, with an api_token and an
admin_token, and its per-client limits off so the run is not a test of 429s) answers every
operation of ``/openapi.json``: schemathesis generates valid and invalid requests from the
document and runs every check (see ``http_fuzz.py``). The registry changes run last, with the
admin token; none of them can take the served model away (gc keeps the active model, there is
no previous one to roll back to, and no generated path is a model to import). Afterwards the
same agent still answers a chat, and its log holds no ``request_failed`` line.

Valid requests come from the document narrowed twice: to the rules it states in words
(``agent_valid_bodies.py``: a tool_choice names one of the tools, a grammar parses…), and where
its truth depends on the agent's state, which a static document cannot say: the request names
the served model half of the time (otherwise almost every generation is a 404), prompts fit
the served context, a deadline is in the future, and no request names a prompt preset (the
served model has none). Invalid requests come from the document as the agent serves it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from schemathesis import Case, HookContext
from schemathesis.openapi import from_dict

from edgelm_agent import __version__
from edgelm_agent.api.openapi import build_openapi
from tests.agent_process import TINY_GGUF, AgentProcess
from tests.integration.agent_valid_bodies import valid_bodies_document
from tests.integration.http_fuzz import (
    count_case,
    fuzz_config,
    http_call,
    integral_floats_as_ints,
    narrowed,
)

USER = "fuzz-user-token-0123456789"
ADMIN = "fuzz-admin-token-9876543210"
MODEL = "tiny-llama"
CONTEXT_TOKENS = 16384  # the fixture's trained length: byte tokens, so a few KB of prompt fit


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    process = AgentProcess(
        workdir,
        model=TINY_GGUF,
        env={
            "EDGELM_API_TOKEN": USER,
            "EDGELM_ADMIN_TOKEN": ADMIN,
            "EDGELM_HTTP_CLIENT_RATE_PER_S": "0",
            "EDGELM_HTTP_CLIENT_MAX_CONCURRENT": "0",
            "EDGELM_CONTEXT_LENGTH": str(CONTEXT_TOKENS),
            "EDGELM_DEFAULT_MAX_TOKENS": "16",
        },
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def get(agent: AgentProcess, path: str, token: str | None = None) -> tuple[int, Any]:
    status, _, body = http_call(agent.base_url, "GET", path, token=token)
    return status, body


def post(agent: AgentProcess, path: str, body: Any, token: str) -> tuple[int, Any]:
    status, _, answer = http_call(
        agent.base_url, "POST", path, token=token, body=json.dumps(body).encode()
    )
    return status, answer


def served_model_or(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"const": MODEL}, schema]}


DOCUMENT = build_openapi(version=__version__)


def valid_requests_document() -> dict[str, Any]:
    """The document the agent serves (a test checks they are equal), narrowed to requests
    that are valid: by the rules it states in words, and for this agent's state."""
    document = valid_bodies_document(DOCUMENT)
    schemas = document["components"]["schemas"]
    text_part = schemas["ChatMessage"]["properties"]["content"]["anyOf"][1]["items"]
    fits = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 32}, {"type": "null"}]}
    prompt = {"type": "string", "minLength": 1, "maxLength": 1024}
    changes: dict[str, dict[str, Any]] = {
        "ChatMessage.content": {
            "anyOf": [
                {"type": "string", "maxLength": 256},
                {"type": "array", "maxItems": 4, "items": text_part},
                {"type": "null"},
            ]
        },
        "JobRequest.deadline": {
            "anyOf": [
                {"type": "number", "minimum": time.time() + 86400, "maximum": 2e9},
                {"type": "null"},
            ]
        },
    }
    for name in ("ChatRequest", "CompletionRequest"):
        fields = schemas[name]["properties"]
        changes |= {
            f"{name}.model": served_model_or(fields["model"]),
            f"{name}.max_tokens": fits,
            f"{name}.max_completion_tokens": fits,
            # The served model has no prompt presets: naming one is its 400.
            f"{name}.preset": {"type": "null"},
        }
        if "messages" in fields:
            changes[f"{name}.messages"] = {**fields["messages"], "maxItems": 4}
        else:
            changes[f"{name}.prompt"] = {
                "anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": 1}]
            }
    return narrowed(document, changes)


AUTH = {"apiToken": USER, "adminToken": ADMIN}
valid = from_dict(valid_requests_document(), config=fuzz_config(AUTH, mode="positive"))
invalid = from_dict(DOCUMENT, config=fuzz_config(AUTH, mode="negative"))


@valid.hook("map_body")
def map_valid_body(context: HookContext, body: Any) -> Any:
    return integral_floats_as_ints(body)


@invalid.hook("map_body")
def map_invalid_body(context: HookContext, body: Any) -> Any:
    return integral_floats_as_ints(body)


def test_the_agent_serves_its_document_without_a_token(agent: AgentProcess) -> None:
    """GET /openapi.json needs no token, and is the document these tests fuzz from."""
    status, document = get(agent, "/openapi.json")
    assert status == 200
    assert document == build_openapi(version=__version__)


@valid.exclude(tag="registry", method="POST").parametrize()
def test_valid_requests_but_registry_changes_answer_as_documented(
    case: Case[Any], agent: AgentProcess
) -> None:
    """Generation, jobs, models, sync, health and metrics: no 5xx, every answer documented,
    and no valid request refused with a 400."""
    count_case("agent", case)
    case.call_and_validate(base_url=agent.base_url)


@invalid.exclude(tag="registry", method="POST").parametrize()
def test_invalid_requests_but_registry_changes_are_refused(
    case: Case[Any], agent: AgentProcess
) -> None:
    """The same operations with requests the document forbids: each refused, none a 5xx."""
    count_case("agent", case)
    case.call_and_validate(base_url=agent.base_url)


@valid.include(tag="registry", method="POST").parametrize()
def test_valid_registry_changes_answer_as_documented(case: Case[Any], agent: AgentProcess) -> None:
    """Import, install, activate, rollback, verify, gc and pin with the admin token, last."""
    count_case("agent", case)
    case.call_and_validate(base_url=agent.base_url)


@invalid.include(tag="registry", method="POST").parametrize()
def test_invalid_registry_changes_are_refused(case: Case[Any], agent: AgentProcess) -> None:
    """The registry changes with requests the document forbids: each refused."""
    count_case("agent", case)
    case.call_and_validate(base_url=agent.base_url)


class TestWhatTheFuzzingFound:
    def test_an_import_path_holding_a_nul_is_the_clients_400(self, agent: AgentProcess) -> None:
        """A NUL in ``path`` made os.open raise ValueError: a 500 and a traceback."""
        status, body = post(agent, "/v1/registry/import", {"path": "/tmp/a\x00b"}, ADMIN)
        assert status == 400, body
        assert body["error"]["param"] == "path"
        assert "NUL" in body["error"]["message"]

    def test_a_wrong_method_on_the_public_document_is_a_405_not_a_401(
        self, agent: AgentProcess
    ) -> None:
        """The document needs no token whatever the method: a TRACE gets 405 with Allow,
        where it got 401 "missing or invalid bearer token"."""
        status, headers, _ = http_call(agent.base_url, "TRACE", "/openapi.json")
        assert status == 405
        assert "GET" in headers["Allow"]


def test_the_agent_still_serves_after_the_fuzzing(agent: AgentProcess) -> None:
    """After every case: ready, the same model active, a chat answered, no request_failed."""
    status, ready = get(agent, "/readyz", USER)
    assert status == 200
    assert ready["model"] == MODEL
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = post(agent, "/v1/chat/completions", chat, USER)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1
    assert agent.log_events("request_failed") == []
