"""Structured output and tool calls through the official openai client, on both runtimes.

The tiny models have random weights: without the constraint they never write JSON, so every
reply that parses and validates here does so because the constraint held each token.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.agent_process import AgentProcess

# Nested objects, enums, bounded arrays, bounded integers, required and optional fields;
# strings are bounded so that a random model ends them within the tiny ONNX context.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "operator", "viewer"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 4},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "integer", "minimum": 1000, "maximum": 99999},
                "verified": {"type": "boolean"},
            },
            "required": ["verified"],
        },
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
PERSON_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
# Rules that each refer twice to the one below: 2**31 paths for llama.cpp in 0.6 KB.
DOUBLING = [f"a{i} ::= a{i - 1} | a{i - 1}" for i in range(1, 32)]
SEEDS = range(4)


@pytest.fixture(scope="module")
def client(served: tuple[AgentProcess, str]) -> openai.OpenAI:
    agent, _ = served
    return openai.OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(served: tuple[AgentProcess, str]) -> str:
    return served[1]


def body_of(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict)
    return exc.body


class TestJsonSchema:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_every_reply_parses_and_validates(self, client, model_id, seed):
        """Sampled replies under a nested schema all end by themselves and validate."""
        reply = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "A person, please."}],
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            response_format=PERSON_FORMAT,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.content is not None
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert "incomplete_details" not in (choice.model_extra or {})

    def test_streamed_reply_is_the_same_document(self, client, model_id):
        """Streaming under a schema sends the same text as the whole reply, and it validates."""
        request: Any = {
            "model": model_id,
            "messages": [{"role": "user", "content": "A person, please."}],
            "max_tokens": 300,
            "temperature": 1.0,
            "seed": 11,
            "response_format": PERSON_FORMAT,
        }
        whole = client.chat.completions.create(**request).choices[0].message.content
        chunks = list(client.chat.completions.create(**request, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole
        jsonschema.validate(json.loads(text), PERSON)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    def test_completions_take_a_schema_too(self, client, model_id):
        """/v1/completions holds its text to response_format as chat does."""
        reply = client.completions.create(
            model=model_id,
            prompt="hello",
            max_tokens=300,
            seed=3,
            extra_body={"response_format": PERSON_FORMAT},
        )
        jsonschema.validate(json.loads(reply.choices[0].text), PERSON)

    def test_json_object_mode_gives_an_object(self, client, model_id):
        """json_object mode: a reply that ends by itself is a JSON object."""
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        reply = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "JSON please"}],
            max_tokens=200,
            temperature=0,
            response_format={"type": "json_object"},
        )
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:  # a random model may write a long string: then it says so
            assert choice.model_extra is not None
            assert choice.model_extra["incomplete_details"]["reason"] == "max_tokens"
        # and a schema that ends quickly always ends within the budget
        bounded = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "JSON please"}],
            max_tokens=50,
            response_format={"type": "json_schema", "json_schema": {"schema": schema}},
        )
        assert json.loads(bounded.choices[0].message.content or "") in ({"ok": True}, {"ok": False})

    @pytest.mark.parametrize("stream", [False, True])
    def test_a_schema_too_long_for_max_tokens_ends_with_length_and_says_so(
        self, client, model_id, stream
    ):
        """Thirty required items cannot fit in ten tokens: finish_reason 'length', and the
        choice says the reply is cut off."""
        schema = {"type": "array", "items": {"type": "integer"}, "minItems": 30}
        request: Any = {
            "model": model_id,
            "messages": [{"role": "user", "content": "numbers"}],
            "max_tokens": 10,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        }
        if stream:
            chunks = list(client.chat.completions.create(**request, stream=True))
            final = next(c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason)
        else:
            final = client.chat.completions.create(**request).choices[0]
        assert final.finish_reason == "length"
        assert final.model_extra is not None
        details = final.model_extra["incomplete_details"]
        assert details["reason"] == "max_tokens"
        assert "does not parse" in details["message"]

    def test_unsupported_features_are_named(self, client, model_id):
        """A schema using keywords the grammar cannot enforce is a 400 naming each, with
        where it is; the agent still serves afterwards."""
        schema = {
            "type": "object",
            "properties": {
                "email": {"type": "string", "format": "email"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
        }
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model_id,
                messages=ASK,
                response_format={"type": "json_schema", "json_schema": {"schema": schema}},
            )
        body = body_of(info.value)
        assert body["code"] == "unsupported_schema"
        assert body["param"] == "response_format.json_schema.schema"
        assert "'format' at /properties/email" in body["message"]
        assert "'pattern' at /properties/zip" in body["message"]
        assert client.completions.create(model=model_id, prompt="hi", max_tokens=2).choices


class TestGrammarWork:
    def test_a_schema_whose_grammar_fans_out_is_a_400_and_health_stays(self, served, client):
        """$defs whose anyOfs over $refs double per level (a 3 KB schema, 2**31 paths) are
        refused naming the bound on both runtimes, and /healthz answers right after."""
        agent, model_id = served
        defs: dict[str, Any] = {"a0": {"type": "integer"}, "b0": {"type": "boolean"}}
        for k in range(1, 32):
            pair = [{"$ref": f"#/$defs/a{k - 1}"}, {"$ref": f"#/$defs/b{k - 1}"}]
            defs[f"a{k}"], defs[f"b{k}"] = {"anyOf": pair}, {"anyOf": pair[::-1]}
        schema = {"$defs": defs, "$ref": "#/$defs/a31"}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model_id,
                messages=ASK,
                max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {"schema": schema}},
            )
        body = body_of(info.value)
        assert body["code"] == "unsupported_schema"
        assert "more than 1024 paths" in body["message"]
        status, _ = agent.request("GET", "/healthz")
        assert status == 200


class TestGrammar:
    def test_gbnf_grammar_holds_the_reply_or_is_refused_by_onnx(self, client, model_id):
        """llama.cpp takes a GBNF grammar; onnxruntime-genai says it cannot, with a 400."""
        grammar = 'root ::= ("yes" | "no") " " [0-9]{2}'
        request: Any = {
            "model": model_id,
            "messages": ASK,
            "max_tokens": 20,
            "extra_body": {"grammar": grammar},
        }
        if model_id == "tiny-onnx":
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**request)
            assert body_of(info.value)["param"] == "grammar"
            assert "llama.cpp" in body_of(info.value)["message"]
            return
        for seed in SEEDS:
            text = client.chat.completions.create(**request, seed=seed).choices[0].message.content
            assert text is not None
            word, number = text.split(" ")
            assert word in ("yes", "no")
            assert len(number) == 2
            assert number.isdigit()

    @pytest.mark.parametrize(
        ("grammar", "says"),
        [
            ('root ::= "a" [\\x00]', "NUL"),
            ('root ::= "a" <[2]>', "token"),
            ('root ::= "a" undefined-rule', "does not define"),
            ('start ::= "a"', "root"),
            # each of these aborted the agent (SIGABRT) or stalled it before they were refused
            ('root ::= "a" [^\\x01-\\U7FFFFFFF]', "excludes every character"),
            ('root ::= "a" [\\U00300000]', "beyond U+10FFFF"),
            ('root ::= "a" [z-a]', "start is above its end"),
            ('root ::= "a"{3,1}', "minimum is above its maximum"),
            ("\n".join(["root ::= a31", 'a0 ::= "x"', *DOUBLING]), "more than 1024 paths"),
        ],
    )
    def test_a_grammar_that_would_break_the_runtime_is_refused(
        self, client, model_id, grammar, says
    ):
        """Grammars llama.cpp cannot run, would abort on or would stall on are a 400, and
        the agent lives and still answers."""
        if model_id == "tiny-onnx":
            pytest.skip("onnxruntime-genai refuses every GBNF grammar (tested above)")
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model_id, messages=ASK, max_tokens=5, extra_body={"grammar": grammar}
            )
        assert says in body_of(info.value)["message"]
        assert client.completions.create(model=model_id, prompt="hi", max_tokens=2).choices


def validate_call(name: str, arguments: str) -> None:
    parameters = {t["function"]["name"]: t["function"].get("parameters") or {} for t in TOOLS}
    jsonschema.validate(json.loads(arguments), parameters[name])


class TestToolCalls:
    def test_two_turn_round_trip(self, client, model_id):
        """Turn one calls the named tool with arguments that validate; turn two sends the
        call and its result back and gets a text answer."""
        first = client.chat.completions.create(
            model=model_id,
            messages=ASK,
            max_tokens=120,
            seed=5,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls is not None
        assert len(calls) == 1
        call = calls[0]
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert call.id.startswith("call_")
        validate_call(call.function.name, call.function.arguments)
        second = client.chat.completions.create(
            model=model_id,
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {
                                "name": call.function.name,
                                "arguments": call.function.arguments,
                            },
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'},
            ],
            max_tokens=8,
            tools=TOOLS,
            tool_choice="none",
        )
        answer = second.choices[0]
        assert answer.message.tool_calls is None
        assert answer.message.content
        assert answer.finish_reason == "length"

    @pytest.mark.parametrize("seed", SEEDS)
    def test_required_calls_any_tool_with_valid_arguments(self, client, model_id, seed):
        """tool_choice 'required': one or more calls, each to an offered tool, each valid."""
        reply = client.chat.completions.create(
            model=model_id, messages=ASK, max_tokens=100, seed=seed, tools=TOOLS,
            tool_choice="required",
        )  # fmt: skip
        choice = reply.choices[0]
        calls = choice.message.tool_calls or []
        assert calls
        for call in calls:
            validate_call(call.function.name, call.function.arguments)
        assert choice.finish_reason in ("tool_calls", "length")

    @pytest.mark.parametrize("seed", SEEDS)
    def test_auto_gives_text_or_valid_calls(self, client, model_id, seed):
        """tool_choice 'auto': the reply is text, or calls whose arguments validate."""
        reply = client.chat.completions.create(
            model=model_id, messages=ASK, max_tokens=60, seed=seed, tools=TOOLS
        )
        message = reply.choices[0].message
        if message.tool_calls:
            assert message.content is None
            for call in message.tool_calls:
                validate_call(call.function.name, call.function.arguments)
        else:
            assert message.content

    def test_streamed_call_arrives_as_deltas_the_client_assembles(self, client, model_id):
        """The openai client's stream helper puts the deltas back together into the same call
        the non-streamed request returns."""
        request: Any = {
            "model": model_id,
            "messages": ASK,
            "max_tokens": 120,
            "seed": 9,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        }
        whole = client.chat.completions.create(**request).choices[0].message.tool_calls
        assert whole is not None
        raw = list(client.chat.completions.create(**request, stream=True))
        deltas = [d for c in raw if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert deltas[0].id
        assert deltas[0].function
        assert deltas[0].function.name == "get_weather"
        assert all(d.index == 0 for d in deltas)
        assert len(deltas) > 2  # the arguments came in pieces, not at the end
        with client.chat.completions.stream(**request) as stream:
            done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
            final = stream.get_final_completion()
        streamed = final.choices[0].message.tool_calls
        assert streamed is not None
        assert [(c.function.name, c.function.arguments) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in whole
        ]
        assert len(done) == 1
        validate_call(done[0].name, done[0].arguments)
        assert final.choices[0].finish_reason == "tool_calls"

    def test_bad_tool_choice_is_a_400(self, client, model_id):
        """tool_choice naming a function that tools lacks is refused, naming what there is."""
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model_id,
                messages=ASK,
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "launch"}},
            )
        body = body_of(info.value)
        assert body["param"] == "tool_choice"
        assert "get_weather, get_time" in body["message"]


class TestDurableJob:
    def test_a_job_with_a_schema_stores_a_valid_document(self, served):
        """A durable job carries response_format through the queue, and its result validates."""
        agent, model_id = served
        request = {
            "model": model_id,
            "messages": [{"role": "user", "content": "A person, please."}],
            "max_tokens": 300,
            "seed": 2,
            "response_format": PERSON_FORMAT,
        }
        status, job = agent.request("POST", "/v1/jobs", {"request": request})
        assert status == 202, job
        deadline = time.monotonic() + 120
        while job["state"] not in ("succeeded", "failed", "dead"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
            _, job = agent.request("GET", f"/v1/jobs/{job['id']}")
        assert job["state"] == "succeeded", job
        content = job["result"]["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), PERSON)
