"""Parsing OpenAI request bodies: what is accepted, and the 400s for what is not."""

from __future__ import annotations

import pytest

from edgelm_agent.api.jobs_routes import _query_int
from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.openai_schema import decode_json_object, parse_chat, parse_completion
from edgelm_agent.jobs.submission import parse_job

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class TestDecode:
    @pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"nul"])
    def test_malformed_json_is_invalid_request(self, raw):
        """Bodies that are not JSON give InvalidRequest."""
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_json_object(raw)

    @pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
    def test_non_object_is_invalid_request(self, raw):
        """JSON that is not an object gives InvalidRequest."""
        with pytest.raises(InvalidRequest, match="must be a JSON object"):
            decode_json_object(raw)


class TestHostileJson:
    def test_deep_nesting_is_a_400(self):
        """JSON nested deeper than the parser's recursion limit is refused, not a crash."""
        with pytest.raises(InvalidRequest, match="nested too deeply"):
            decode_json_object(b"[" * 100_000 + b"]" * 100_000)

    def test_huge_integer_is_a_400(self):
        """An integer beyond Python's digit limit is refused as invalid JSON."""
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_json_object(b'{"max_tokens": ' + b"9" * 5000 + b"}")


class TestParseChat:
    def test_minimal_body(self):
        """model + messages is enough; sampling fields default to None."""
        body = parse_chat(CHAT)
        assert body.model == "m"
        assert body.messages[0].content == "hi"
        assert body.sampling.max_tokens is None
        assert body.stream is False

    def test_all_sampling_fields(self):
        """Every supported sampling field is parsed."""
        body = parse_chat(
            {
                **CHAT,
                "max_tokens": 5,
                "temperature": 0,
                "top_p": 0.5,
                "top_k": 3,
                "seed": 42,
                "stop": ["a", "b"],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        s = body.sampling
        assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (
            5,
            0.0,
            0.5,
            3,
            42,
            ("a", "b"),
        )
        assert body.stream
        assert body.include_usage

    def test_max_completion_tokens_wins(self):
        """The newer max_completion_tokens field takes precedence over max_tokens."""
        assert (
            parse_chat({**CHAT, "max_tokens": 5, "max_completion_tokens": 9}).sampling.max_tokens
            == 9
        )

    def test_text_parts_are_joined(self):
        """Content given as a list of text parts becomes one string."""
        body = parse_chat(
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
            }
        )
        assert body.messages[0].content == "ab"

    @pytest.mark.parametrize(
        ("patch", "param"),
        [
            ({"model": None}, "model"),
            ({"model": ""}, "model"),
            ({"messages": []}, "messages"),
            ({"messages": "hi"}, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            (
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                "messages[0].content",
            ),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": "5"}, "max_tokens"),
            ({"max_tokens": True}, "max_tokens"),
            ({"temperature": 3}, "temperature"),
            ({"temperature": float("nan")}, "temperature"),
            ({"top_p": -0.1}, "top_p"),
            ({"top_k": -1}, "top_k"),
            ({"stop": [1]}, "stop"),
            ({"stop": ["a"] * 5}, "stop"),
            ({"n": 2}, "n"),
            ({"stream": "yes"}, "stream"),
        ],
    )
    def test_bad_fields_name_the_param(self, patch, param):
        """Each invalid field gives InvalidRequest whose param names that field."""
        body = {**CHAT, **patch}
        if patch.get("model", "") is None:
            del body["model"]
        with pytest.raises(InvalidRequest) as info:
            parse_chat(body)
        assert info.value.param == param

    @pytest.mark.parametrize(
        "patch",
        [
            {"functions": [{"name": "f"}]},
            {"logprobs": True},
            {"top_logprobs": 3},
            {"echo": True},
            {"suffix": "x"},
            {"best_of": 2},
        ],
    )
    def test_features_we_cannot_honour_are_refused(self, patch):
        """Legacy function calling, logprobs and the like get a 400 naming the field."""
        with pytest.raises(InvalidRequest, match="not supported") as info:
            parse_chat({**CHAT, **patch})
        assert info.value.param == next(iter(patch))

    @pytest.mark.parametrize(
        "patch",
        [
            {"tools": []},
            {"tool_choice": "none"},
            {"logprobs": False},
            {"top_logprobs": 0},
            {"response_format": {"type": "text"}},
            {"echo": False},
            {"best_of": 1},
        ],
    )
    def test_neutral_values_of_those_fields_pass(self, patch):
        """Clients that send the 'off' value of those fields are not refused."""
        parse_chat({**CHAT, **patch})

    def test_top_k_is_bounded(self):
        """top_k beyond a 32-bit integer is refused before it can reach a runtime."""
        with pytest.raises(InvalidRequest) as info:
            parse_chat({**CHAT, "top_k": 2**31})
        assert info.value.param == "top_k"

    def test_developer_role_is_the_system_role(self):
        """OpenAI's 'developer' role reaches the chat template as 'system'."""
        body = parse_chat(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                ],
            }
        )
        assert [m.role for m in body.messages] == ["system", "user"]

    def test_missing_messages(self):
        """A chat body without messages is refused."""
        with pytest.raises(InvalidRequest, match="missing required field 'messages'"):
            parse_chat({"model": "m"})


class TestParseCompletion:
    def test_prompt_string(self):
        """A string prompt is taken as is."""
        assert parse_completion({"model": "m", "prompt": "Once"}).prompt == "Once"

    def test_single_prompt_in_a_list(self):
        """A one-element list prompt, as the openai client may send, is unwrapped."""
        assert parse_completion({"model": "m", "prompt": ["Once"]}).prompt == "Once"

    @pytest.mark.parametrize("prompt", [["a", "b"], [1, 2], 5, None])
    def test_unsupported_prompts(self, prompt):
        """Batches and token-id prompts are refused with a clear error."""
        with pytest.raises(InvalidRequest, match="'prompt' must be a string"):
            parse_completion({"model": "m", "prompt": prompt})


HUGE = 10**400


class TestHugeNumbers:
    @pytest.mark.parametrize(
        "field", ["temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "top_k"]
    )
    def test_a_huge_integer_names_its_field(self, field):
        """An integer too large for a float is a 400 naming the field, never a 500."""
        with pytest.raises(InvalidRequest) as info:
            parse_chat({**CHAT, field: HUGE})
        assert info.value.param == field

    @pytest.mark.parametrize("field", ["temperature", "max_tokens", "seed"])
    def test_the_echoed_value_is_cut_short(self, field):
        """The message quotes the start of a huge value, not all of its 400 digits."""
        with pytest.raises(InvalidRequest) as info:
            parse_chat({**CHAT, field: HUGE})
        assert len(str(info.value)) < 200

    def test_a_huge_role_is_cut_short(self):
        """A megabyte-long role is named, not echoed whole."""
        with pytest.raises(InvalidRequest) as info:
            parse_chat({**CHAT, "messages": [{"role": "x" * 1_000_000, "content": "hi"}]})
        assert info.value.param == "messages[0].role"
        assert len(str(info.value)) < 300


JOB_REQUEST = {"model": "m", "prompt": "hi", "max_tokens": 2}


class TestJobSubmission:
    @pytest.mark.parametrize("field", ["ttl_s", "deadline", "priority", "max_attempts"])
    def test_a_huge_integer_names_its_field(self, field):
        """A job's numbers of 400 digits are a 400 naming the field, never a 500."""
        with pytest.raises(InvalidRequest) as info:
            parse_job({"request": JOB_REQUEST, field: HUGE}, now=1_000.0)
        assert info.value.param == field

    @pytest.mark.parametrize("field", ["ttl_s", "deadline"])
    def test_a_float_too_far_away_is_refused(self, field):
        """A TTL or deadline so far away that it cannot be a time is refused."""
        with pytest.raises(InvalidRequest) as info:
            parse_job({"request": JOB_REQUEST, field: 1e300}, now=1_000.0)
        assert info.value.param == field

    def test_a_huge_sampling_field_inside_the_request_names_it(self):
        """The request inside a job is checked like the endpoint's: 400, not 500."""
        with pytest.raises(InvalidRequest) as info:
            parse_job({"request": {**JOB_REQUEST, "temperature": HUGE}}, now=1_000.0)
        assert info.value.param == "temperature"


class TestQueryIntegers:
    @pytest.mark.parametrize("raw", ["9" * 5000, "99999999999999999999999", "1e3", "-1"])
    def test_out_of_range_query_numbers_are_a_400(self, raw):
        """A number past the integer digit limit (a ValueError in int()) is a 400 naming
        the parameter, with the value cut short."""
        with pytest.raises(InvalidRequest) as info:
            _query_int({"cursor": raw}, "cursor", None, 0, 2**63 - 1)
        assert info.value.param == "cursor"
        assert len(str(info.value)) < 200
