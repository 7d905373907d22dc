"""The agent's OpenAPI document against the code it describes: the router, the access rules and
the request validators, both ways. In-process and without I/O; the HTTP fuzzing of the same
document against a running agent is ``tests/integration/test_fuzz_http_agent.py``."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi import from_dict

from edgelm_agent.api.access import needs_admin, needs_token
from edgelm_agent.api.app import create_app
from edgelm_agent.api.context import ApiContext
from edgelm_agent.api.openai_routes import take_keep_alive
from edgelm_agent.api.openapi import ROUTES, build_openapi
from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.embeddings import check_tokens, parse_embeddings
from edgelm_agent.generation.openai_format import (
    ChatFormatter,
    CompletionFormatter,
    OutputShape,
    Usage,
)
from edgelm_agent.generation.openai_schema import (
    UNSUPPORTED,
    decode_json_object,
    parse_chat,
    parse_completion,
)
from edgelm_agent.generation.presets import apply_preset
from edgelm_agent.inference.types import OutputConstraint
from edgelm_agent.jobs.submission import parse_job
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.residency import KEEP_ALIVE_PATTERN
from edgelm_agent.serving import ModelHost
from edgelm_control.api.schemas import COMPONENTS as CONTROL_COMPONENTS
from edgelm_protocol.presets import Preset
from tests.integration.agent_valid_bodies import valid_bodies_document
from tests.integration.http_fuzz import (
    CAMPAIGN_EXAMPLES,
    impossible_all_ofs,
    integral_floats_as_ints,
)

DOCUMENT = build_openapi(version="test")
KEEP_ALIVE_STRING = DOCUMENT["components"]["schemas"]["ChatRequest"]["properties"]["keep_alive"][
    "anyOf"
][1]
SCHEMA = from_dict(DOCUMENT)
#: Valid bodies come from the document narrowed to the rules it states in words.
VALID_SCHEMA = from_dict(valid_bodies_document(DOCUMENT))
FUZZ = settings(
    max_examples=CAMPAIGN_EXAMPLES or 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def route(parse: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], object]:
    """A generation route's checks: keep_alive taken out of the body, then the parser."""

    def check(body: dict[str, Any]) -> object:
        take_keep_alive(body)
        return parse(body)

    return check


def embeddings(body: dict[str, Any]) -> object:
    """The embeddings route's checks, for a model with no limit on its inputs' length or on
    its vocabulary (those are the served model's, which the document cannot know)."""
    parsed = parse_embeddings(body)
    check_tokens(parsed.token_inputs, limit_tokens=2**62, vocab_size=10**1000, model="m")
    return parsed


VALIDATORS: dict[str, Callable[[dict[str, Any]], object]] = {
    "/v1/chat/completions": route(parse_chat),
    "/v1/completions": route(parse_completion),
    "/v1/embeddings": embeddings,
    # At the epoch every deadline is in the future: "not in the past" depends on the clock,
    # which the document cannot say; the HTTP fuzzing narrows the document for it instead.
    "/v1/jobs": lambda body: parse_job(body, 0.0),
}


@functools.cache
def bodies(path: str, mode: GenerationMode) -> st.SearchStrategy[Any]:
    """Request bodies for ``POST path`` that the document allows (positive) or forbids."""
    schema = VALID_SCHEMA if mode == GenerationMode.POSITIVE else SCHEMA
    operation = schema[path]["POST"]
    cases: st.SearchStrategy[Case[Any]] = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.NEGATIVE:  # not a case whose only fault is its Content-Type
        cases = cases.filter(
            lambda case: case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
        )
    return cases.map(lambda case: integral_floats_as_ints(case.body))


def validate(path: str, body: Any) -> None:
    """What the route does with a body before any model or queue sees it: the bytes
    schemathesis would send (a negative case may be bytes that are not JSON at all)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    VALIDATORS[path](decode_json_object(raw))


def normalized(schema: Any) -> Any:
    """``schema`` with its ``required`` lists sorted: their order means nothing."""
    if isinstance(schema, dict):
        return {k: sorted(v) if k == "required" else normalized(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [normalized(v) for v in schema]
    return schema


class TestDocumentAndRouter:
    def test_every_route_of_the_app_is_documented_and_nothing_else(self) -> None:
        """The router's (method, path) pairs are exactly the document's operations."""
        app = create_app(ApiContext(ModelHost(), AgentMetrics(), 1 << 20, None))
        served = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
        documented = {
            (method.upper(), path)
            for path, operations in DOCUMENT["paths"].items()
            for method in operations
        }
        assert served == documented

    def test_each_operation_is_documented_once_with_its_security(self) -> None:
        """Registry changes need the admin token, the document none, the rest the api token;
        the same rules the access policy applies."""
        for route in ROUTES:
            entry = DOCUMENT["paths"][route.path][route.method.lower()]
            admin = needs_admin(route.method, route.path)
            public = not needs_token(route.path)
            assert (route.access == "admin") == admin, route.path
            assert (route.access == "public") == public, route.path
            expected: list[dict[str, list[str]]] | None = (
                [] if public else [{"adminToken": []}] if admin else None
            )
            if expected is not None:
                assert entry["security"] == expected
            else:
                assert {"apiToken": []} in entry["security"]
            assert ("401" in entry["responses"]) != public
        assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)

    def test_every_reference_resolves_and_the_document_is_json(self) -> None:
        """Each $ref names a component, and the document survives a JSON round trip."""
        text = json.dumps(DOCUMENT)
        assert json.loads(text) == DOCUMENT
        components = DOCUMENT["components"]["schemas"]
        prefix = "#/components/schemas/"
        refs = {part.split('"')[0] for part in text.split('"$ref": "' + prefix)[1:]}
        assert "ChatRequest" in refs
        assert refs <= set(components)

    def test_the_error_body_is_the_control_planes(self) -> None:
        """Both APIs answer errors in the same shape, and their documents say the same."""
        mine = DOCUMENT["components"]["schemas"]["Error"]
        assert normalized(mine) == normalized(CONTROL_COMPONENTS["Error"])


class TestDocumentAndValidators:
    @pytest.mark.parametrize("path", sorted(VALIDATORS))
    @FUZZ
    @given(data=st.data())
    def test_a_body_the_document_allows_passes_the_validator(
        self, path: str, data: st.DataObject
    ) -> None:
        """No body the document allows is refused by the route's own checks."""
        body = data.draw(bodies(path, GenerationMode.POSITIVE))
        try:
            validate(path, body)
        except InvalidRequest as exc:
            pytest.fail(f"{path} refuses a body its document allows: {body!r}: {exc}")

    @pytest.mark.parametrize("path", sorted(VALIDATORS))
    @FUZZ
    @given(data=st.data())
    def test_a_body_the_document_forbids_is_refused_naming_the_field(
        self, path: str, data: st.DataObject
    ) -> None:
        """Every body the document forbids is a 400 from the validator, never accepted."""
        body = data.draw(bodies(path, GenerationMode.NEGATIVE))
        try:
            validate(path, body)
        except InvalidRequest:
            return
        pytest.fail(
            f"{path} accepts a body its document forbids: {body!r}; describe the field in "
            "agent/edgelm_agent/api/openapi_schemas.py (GENERATION_FIELDS for a generation one)"
        )

    def test_each_unsupported_feature_is_documented_with_what_it_accepts(self) -> None:
        """tools, logprobs… accept only the values that ask for nothing, as the validator."""
        properties = DOCUMENT["components"]["schemas"]["ChatRequest"]["properties"]
        for name, (_, neutral) in UNSUPPORTED.items():
            assert properties[name]["enum"] == list(neutral)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class TestWhatTheFuzzingFound:
    @pytest.mark.parametrize("value", [False, 0, "", []])
    def test_stream_options_that_is_not_an_object_is_refused(self, value: Any) -> None:
        """``stream_options: false`` (or 0, "", []) passed as "no options"; only null does."""
        with pytest.raises(InvalidRequest) as refused:
            parse_chat({**CHAT, "stream_options": value})
        assert refused.value.param == "stream_options"

    @pytest.mark.parametrize(("path", "allowed"), [("/m.gguf", True), ("/a\x00b", False)])
    def test_the_document_forbids_an_import_path_holding_a_nul(
        self, path: str, allowed: bool
    ) -> None:
        """The route refuses a NUL in ``path`` (a 400), which the document allowed: a valid
        request refused, found by the campaign."""
        schema = DOCUMENT["components"]["schemas"]["ImportRequest"]["properties"]["path"]
        assert jsonschema_rs.validator_for(schema).is_valid(path) == allowed

    def test_a_bad_max_tokens_is_refused_beside_max_completion_tokens(self) -> None:
        """max_completion_tokens wins, but a max_tokens of the wrong type was ignored."""
        with pytest.raises(InvalidRequest) as refused:
            parse_completion(
                {"model": "m", "prompt": "p", "max_completion_tokens": 4, "max_tokens": []}
            )
        assert refused.value.param == "max_tokens"


class TestWhatDescribingTheValidatorsFound:
    def test_a_keep_alive_no_float_holds_is_the_clients_400(self) -> None:
        """An integer of 400 digits made float() raise OverflowError: a 500."""
        with pytest.raises(InvalidRequest) as refused:
            take_keep_alive({**CHAT, "keep_alive": 10**400})
        assert refused.value.param == "keep_alive"

    @pytest.mark.parametrize("value", ["\u0663m", "\uff15s", "5\u2003m", "1" * 16])
    def test_a_keep_alive_is_ascii_digits_and_spaces(self, value: str) -> None:
        """Python's ``\\d`` took other scripts' digits (and ``\\s`` other spaces), which the
        document's pattern (ECMA-262) does not; sixteen whole digits are more than any wait."""
        with pytest.raises(InvalidRequest):
            take_keep_alive({**CHAT, "keep_alive": value})

    @settings(max_examples=300, deadline=None)
    @given(value=st.from_regex(KEEP_ALIVE_PATTERN) | st.text(max_size=12))
    def test_the_keep_alive_pattern_is_the_parsers(self, value: str) -> None:
        """A string keep_alive is accepted exactly when the document's pattern matches it."""
        allowed = jsonschema_rs.validator_for(KEEP_ALIVE_STRING).is_valid(value)
        try:
            take_keep_alive({"keep_alive": value})
        except InvalidRequest:
            assert not allowed, value
        else:
            assert allowed, value

    def test_parallel_tool_calls_is_checked_without_tools(self) -> None:
        """``parallel_tool_calls: "yes"`` was ignored unless the request had tools."""
        with pytest.raises(InvalidRequest) as refused:
            parse_chat({**CHAT, "parallel_tool_calls": "yes"})
        assert refused.value.param == "parallel_tool_calls"

    def test_a_job_whose_tool_schema_cannot_be_enforced_is_refused_at_submission(self) -> None:
        """The calls' grammar was built only when the job ran: a 202, then a failed job."""
        email = {"type": "object", "properties": {"x": {"type": "string", "format": "email"}}}
        tool = {"type": "function", "function": {"name": "f", "parameters": email}}
        with pytest.raises(InvalidRequest) as refused:
            parse_job({"request": {**CHAT, "tools": [tool]}}, 0.0)
        assert refused.value.code == "unsupported_schema"

    def test_tool_choice_is_checked_against_the_tools_a_preset_brings(self) -> None:
        """With a preset that has no tools, ``tool_choice: "required"`` was dropped again
        after the preset was applied: a request for a call got free text."""
        preset = Preset(name="brief", system="Answer in one line.")
        body = {**CHAT, "preset": "brief", "tool_choice": "required"}
        parse_chat(body)  # at the door the preset's tools are not known yet
        with pytest.raises(InvalidRequest) as refused:
            parse_chat(apply_preset(body, preset, "chat"))
        assert refused.value.param == "tool_choice"

    def test_no_schema_is_an_all_of_that_no_value_matches(self) -> None:
        """No allOf joins a closed object with members it does not list."""
        assert impossible_all_ofs(DOCUMENT, DOCUMENT["components"]["schemas"]) == []


def conforms(component: str, value: Any) -> None:
    """``value`` is valid under the document's ``component``."""
    schema = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


CALL_TEXT = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


class TestAnswersAndTheDocument:
    def test_a_reply_of_tool_calls_is_documented(self) -> None:
        """message.tool_calls, content null, finish_reason tool_calls."""
        body = ChatFormatter("m", OutputShape(tools_auto=True)).full(CALL_TEXT, "stop", Usage(3, 9))
        assert body["choices"][0]["finish_reason"] == "tool_calls"
        conforms("ChatCompletion", body)

    def test_a_reply_cut_off_under_a_format_is_documented(self) -> None:
        """choices[].incomplete_details, on chats and on completions."""
        json_object = OutputConstraint(kind="json_object", gbnf="", description="a JSON object")
        chat = ChatFormatter("m", OutputShape(json_object)).full('{"a": ', "length", Usage(1, 4))
        text = CompletionFormatter("m", OutputShape(json_object)).full("{", "stop", Usage(1, 1))
        assert chat["choices"][0]["incomplete_details"]["reason"] == "max_tokens"
        assert text["choices"][0]["incomplete_details"]["reason"] == "stop_sequence"
        conforms("ChatCompletion", chat)
        conforms("TextCompletion", text)

    def test_every_chunk_of_a_stream_of_tool_calls_is_documented(self) -> None:
        """The role chunk, delta.tool_calls pieces, the last chunk and the usage chunk."""
        formatter = ChatFormatter("m", OutputShape(tools_auto=False))
        chunks = [formatter.first_chunk()]
        chunks += [
            c for piece in (CALL_TEXT[:20], CALL_TEXT[20:]) for c in formatter.text_chunks(piece)
        ]
        chunks += [formatter.final_chunk("stop"), formatter.usage_chunk(Usage(3, 9))]
        assert any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c and c["choices"])
        for chunk in chunks:
            conforms("ChatCompletionChunk", chunk)

    def test_every_chunk_of_a_text_stream_is_documented(self) -> None:
        """A completion's text chunks, the last one cut off under a format, and usage."""
        json_object = OutputConstraint(kind="json_object", gbnf="", description="a JSON object")
        formatter = CompletionFormatter("m", OutputShape(json_object))
        chunks = [*formatter.text_chunks("{"), formatter.final_chunk("length", "{")]
        for chunk in [*chunks, formatter.usage_chunk(Usage(1, 1))]:
            conforms("TextCompletionChunk", chunk)
