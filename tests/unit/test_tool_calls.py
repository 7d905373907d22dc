"""Tool requests, the tool-call grammar and reading calls back, whole or streamed: pure."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.openai_format import ChatFormatter, OutputShape, Usage
from edgelm_agent.generation.tool_calls import (
    SEPARATOR,
    ToolCallReader,
    format_call,
    parse_tool_request,
    plain_history,
    read_reply,
    tool_constraint,
)
from edgelm_agent.inference.chat_template import ChatMessage, ToolCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
calls_strategy = st.lists(
    st.builds(
        lambda name, args: ToolCall("", name, json.dumps(args, ensure_ascii=False)),
        st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    ),
    min_size=1,
    max_size=3,
)


def cuts(text: str, data: st.DataObject) -> list[str]:
    points = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


class TestReader:
    @given(calls=calls_strategy, data=st.data(), auto=st.booleans())
    def test_calls_read_back_from_any_split(self, calls, data, auto):
        """However the text is cut into pieces, the reader returns the calls as written, and
        the argument deltas join up to each call's arguments."""
        text = SEPARATOR.join(format_call(c) for c in calls)
        reader = ToolCallReader(auto=auto)
        deltas = []
        for piece in cuts(text, data):
            content, more = reader.feed(piece)
            assert content == ""
            deltas += more
        assert reader.complete
        assert [(c.name, c.arguments) for c in reader.calls] == [
            (c.name, c.arguments) for c in calls
        ]
        for index, call in enumerate(calls):
            mine = [d for d in deltas if d.index == index]
            assert mine[0].name == call.name
            assert mine[0].id
            assert "".join(d.arguments for d in mine) == call.arguments

    @given(calls=calls_strategy, data=st.data())
    def test_a_cut_reply_is_incomplete_and_keeps_only_whole_calls(self, calls, data):
        """Stopped anywhere inside a call, the reply is incomplete; finished calls remain."""
        text = SEPARATOR.join(format_call(c) for c in calls)
        end = data.draw(st.integers(1, len(text) - 1))
        content, read, complete = read_reply(text[:end], auto=False)
        assert content is None
        ends, position = [], 0
        for call in calls:
            position += len(format_call(call))
            ends.append(position)
            position += len(SEPARATOR)
        whole = sum(1 for e in ends if e <= end)  # calls written to their closing tag
        # A call counts once its arguments are whole, a little before its closing tag.
        assert whole <= len(read) <= whole + 1
        assert [c.arguments for c in read] == [c.arguments for c in calls[: len(read)]]
        assert complete == (end in ends)

    def test_auto_text_is_content(self):
        """With tool_choice auto, a reply that does not open with '<' is plain text."""
        assert read_reply("It is sunny.", auto=True) == ("It is sunny.", [], True)

    def test_text_that_breaks_the_format_is_not_a_call(self):
        """A reply off the format (only possible without the grammar) yields no call."""
        content, calls, complete = read_reply("<tool_call>\n[oops", auto=False)
        assert (content, calls, complete) == (None, [], False)


class TestFormatter:
    def test_whole_reply_with_calls(self):
        """A tool reply has content null, tool_calls, and finish_reason tool_calls."""
        call = ToolCall("", "get_weather", '{"city": "Oslo"}')
        body = ChatFormatter("m", OutputShape(tools_auto=False)).full(
            format_call(call), "stop", Usage(3, 4)
        )
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (entry,) = choice["message"]["tool_calls"]
        assert entry["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
        assert entry["type"] == "function"
        assert entry["id"].startswith("call_")

    def test_stream_chunks_carry_index_id_and_name_first(self):
        """The first delta of a call has id, type and name; later ones only arguments."""
        formatter = ChatFormatter("m", OutputShape(tools_auto=False))
        text = format_call(ToolCall("", "get_weather", '{"city": "Oslo"}'))
        chunks = [c for ch in text for c in formatter.text_chunks(ch)]
        entries = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
        assert entries[0]["id"].startswith("call_")
        assert entries[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert all(set(e) == {"index", "function"} for e in entries[1:])
        assert "".join(e["function"]["arguments"] for e in entries) == '{"city": "Oslo"}'
        assert formatter.final_chunk("stop")["choices"][0]["finish_reason"] == "tool_calls"


class TestRequest:
    @pytest.mark.parametrize(
        ("patch", "param"),
        [
            ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
            (
                {"tools": [{"type": "function", "function": {"name": "a b"}}]},
                "tools[0].function.name",
            ),
            (
                {
                    "tools": [
                        {
                            "type": "function",
                            "function": {"name": "f", "parameters": {"type": "array"}},
                        }
                    ]
                },
                "tools[0].function.parameters",
            ),
            ({"tools": [WEATHER, WEATHER]}, "tools"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ],
    )
    def test_bad_tool_fields_name_the_param(self, patch: dict[str, Any], param: str):
        """Each malformed tool field is a 400 naming it."""
        with pytest.raises(InvalidRequest) as info:
            parse_tool_request(patch)
        assert info.value.param == param

    def test_named_choice_offers_only_that_function(self):
        """tool_choice naming a function: the grammar allows only that one, always a call."""
        other = {"type": "function", "function": {"name": "get_time"}}
        request = parse_tool_request(
            {
                "tools": [WEATHER, other],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            }
        )
        assert request is not None
        constraint = tool_constraint(request)
        assert constraint is not None
        assert "get_time" in constraint.gbnf
        assert "get_weather" not in constraint.gbnf
        assert "free-text" not in constraint.gbnf
        assert constraint.guidance is not None
        assert constraint.guidance[0] == "lark_grammar"

    def test_none_constrains_nothing(self):
        """tool_choice 'none' offers no tool and needs no grammar."""
        request = parse_tool_request({"tools": [WEATHER], "tool_choice": "none"})
        assert request is not None
        assert tool_constraint(request) is None

    def test_plain_history_for_templates_without_tools(self):
        """Calls become assistant text, results user turns, and the tools a system message."""
        request = parse_tool_request({"tools": [WEATHER]})
        assert request is not None
        call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
        messages = plain_history(
            [
                ChatMessage("user", "weather?"),
                ChatMessage("assistant", "", tool_calls=(call,)),
                ChatMessage("tool", "4C", tool_call_id="call_1"),
                ChatMessage("tool", "rain", tool_call_id="call_1"),
            ],
            request.offered,
        )
        assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
        assert '"name":"get_weather"' in messages[0].content
        assert messages[2].content == format_call(call)
        assert messages[3].content == (
            "<tool_response>\n4C\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        )
