"""Tool calls as in OpenAI's chat API: the request's tools, the grammar a call is generated
under, and reading calls back out of the generated text, whole or as stream deltas. Pure.

One wire format for every model, the one Hermes and Qwen models are trained on and their chat
templates describe::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

A template that speaks it gets the tools and the tool messages itself; for any other model the
tools are described in a system message and tool results go back as user messages (see
:func:`plain_history`). The call is generated under a grammar made from the functions'
parameter schemas, so its name is one of the tools and its arguments parse and validate. With
``tool_choice`` ``auto`` the model decides with its first character: a reply that opens with
``<`` is a tool call, anything else is text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from edgelm_agent.errors import InvalidRequest, shown
from edgelm_agent.generation.gbnf import RuleSet, literal
from edgelm_agent.generation.json_schema_grammar import (
    GUIDANCE_LAYOUT,
    checked_grammar,
    guidance_schema,
    schema_rule,
)
from edgelm_agent.inference.chat_template import ChatMessage, ToolCall
from edgelm_agent.inference.types import OutputConstraint

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128
OPEN = "<tool_call>\n"
CLOSE = "\n</tool_call>"
SEPARATOR = "\n"
NAME_PREFIX = '{"name": "'
ARGUMENTS_PREFIX = '", "arguments": '
CALL_END = "}"

ChoiceMode = Literal["auto", "required", "none"]


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI clients send it, which is also what chat templates expect."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """The tools a chat request offers and how the model may use them."""

    tools: tuple[FunctionTool, ...]
    mode: ChoiceMode = "auto"
    #: ``tool_choice`` naming one function: the model calls exactly that one.
    function: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> tuple[FunctionTool, ...]:
        """The tools the model may call."""
        if self.mode == "none":
            return ()
        if self.function is not None:
            return tuple(t for t in self.tools if t.name == self.function)
        return self.tools


# ------------------------------------------------------------------------------ request


def parse_tool_request(data: dict[str, Any]) -> ToolRequest | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat body; None without tools."""
    raw = data.get("tools")
    choice = data.get("tool_choice")
    # Checked with or without tools: a bad field is refused, never ignored.
    parallel = data.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest(
            "'parallel_tool_calls' must be true or false", param="parallel_tool_calls"
        )
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(
                "'tool_choice' asks for a tool call but the request has no 'tools'",
                param="tool_choice",
            )
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of function tools", param="tools")
    if len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"'tools' holds {len(raw)} tools; at most {MAX_TOOLS}", param="tools")
    tools = tuple(_tool(item, i) for i, item in enumerate(raw))
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequest(f"'tools' names the function {duplicate!r} twice", param="tools")
    mode, function = _choice(choice, names)
    return ToolRequest(tools, mode, function, parallel)


def _tool(item: Any, index: int) -> FunctionTool:
    param = f"tools[{index}]"
    if not isinstance(item, dict) or item.get("type") != "function":
        raise InvalidRequest(
            f"{param} must be an object with type 'function', got {shown(item)}", param=param
        )
    function = item.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{param}.function must be an object", param=f"{param}.function")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{param}.function.name must be 1-64 letters, digits, '_' or '-', got {shown(name)}",
            param=f"{param}.function.name",
        )
    description = function.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequest(
            f"{param}.function.description must be a string",
            param=f"{param}.function.description",
        )
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequest(
            f"{param}.function.parameters must be a JSON schema of type 'object'",
            param=f"{param}.function.parameters",
        )
    return FunctionTool(name, description, parameters)


def _choice(choice: Any, names: list[str]) -> tuple[ChoiceMode, str | None]:
    if choice is None or choice == "auto":
        return "auto", None
    if choice in ("none", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidRequest(
                f"'tool_choice' names the function {shown(name)}, which 'tools' does not "
                f"offer; it offers {', '.join(names)}",
                param="tool_choice",
            )
        return "required", name
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        f'{{"type": "function", "function": {{"name": ...}}}}, got {shown(choice)}',
        param="tool_choice",
    )


def parse_tool_call(item: Any, param: str) -> ToolCall:
    """One entry of an assistant message's ``tool_calls``, as a client sends it back."""
    if not isinstance(item, dict) or item.get("type", "function") != "function":
        raise InvalidRequest(f"{param} must be a function tool call", param=param)
    function = item.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{param}.function must be an object", param=f"{param}.function")
    name, arguments = function.get("name"), function.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            f"{param}.function.name must be a non-empty string", param=f"{param}.function.name"
        )
    if not isinstance(arguments, str):
        raise InvalidRequest(
            f"{param}.function.arguments must be a string of JSON",
            param=f"{param}.function.arguments",
        )
    try:
        json.loads(arguments)
    except ValueError as exc:
        raise InvalidRequest(
            f"{param}.function.arguments is not valid JSON: {exc}",
            param=f"{param}.function.arguments",
        ) from exc
    call_id = item.get("id", "")
    if not isinstance(call_id, str):
        raise InvalidRequest(f"{param}.id must be a string", param=f"{param}.id")
    return ToolCall(id=call_id, name=name, arguments=arguments)


# ------------------------------------------------------------------------------- prompt

_SYSTEM_PROMPT = """\
You may call these functions (JSON Schema):
<tools>
{tools}
</tools>
To call one, answer with:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>"""


def tool_system_prompt(tools: Sequence[FunctionTool]) -> str:
    """How a model whose template knows nothing of tools learns about them."""
    return _SYSTEM_PROMPT.format(
        tools="\n".join(
            json.dumps(t.as_openai(), ensure_ascii=False, separators=(",", ":")) for t in tools
        )
    )


def format_call(call: ToolCall) -> str:
    """A call as the model writes it (and as the grammar holds it to)."""
    return f"{OPEN}{NAME_PREFIX}{call.name}{ARGUMENTS_PREFIX}{call.arguments}{CALL_END}{CLOSE}"


def plain_history(
    messages: Sequence[ChatMessage], tools: Sequence[FunctionTool]
) -> tuple[ChatMessage, ...]:
    """The chat for a template without tool support: the tools in a system message, calls
    written into the assistant's text, and tool results as user messages, consecutive ones
    together (many templates insist that user and assistant take turns)."""
    out: list[ChatMessage] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = SEPARATOR.join(format_call(c) for c in message.tool_calls)
            text = f"{message.content}\n{calls}" if message.content else calls
            out.append(ChatMessage("assistant", text))
        elif message.role == "tool":
            response = f"<tool_response>\n{message.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = replace(out[-1], content=f"{out[-1].content}\n{response}")
            else:
                out.append(ChatMessage("user", response))
        else:
            out.append(message)
    if tools:
        prompt = tool_system_prompt(tools)
        if out and out[0].role == "system":
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, ChatMessage("system", prompt))
    return tuple(out)


# ------------------------------------------------------------------------------ grammar


def tool_constraint(request: ToolRequest) -> OutputConstraint | None:
    """The grammar the reply is generated under; None when the model may not call a tool."""
    offered = request.offered
    if not offered:
        return None
    rules = RuleSet()
    alternatives = []
    for i, tool in enumerate(offered):
        arguments = schema_rule(
            rules, tool.parameters, param=f"tools[{i}].function.parameters", hint=tool.name
        )
        alternatives.append(f"{literal(tool.name + ARGUMENTS_PREFIX)} {arguments}")
    function = rules.add("call-function", " | ".join(alternatives))
    call = rules.add(
        "tool-call", f"{literal(OPEN + NAME_PREFIX)} ({function}) {literal(CALL_END + CLOSE)}"
    )
    calls = (
        rules.add("tool-calls", f"{call} ({literal(SEPARATOR)} {call})*")
        if (request.parallel)
        else call
    )
    lark_calls = 'call ("\\n" call)*' if request.parallel else "call"
    if request.mode == "auto":
        # Text that does not open with "<": the model's first character says which it is.
        text = rules.add("free-text", "[^<] .*")
        root, lark_start = f"{calls} | {text}", "calls | TEXT"
    else:
        root, lark_start = calls, "calls"
    names = ", ".join(t.name for t in offered)
    return OutputConstraint(
        kind="tool_calls",
        gbnf=checked_grammar(rules.text(root), param="tools"),
        guidance=("lark_grammar", _lark(offered, lark_start, lark_calls)),
        description=f"tool calls to {names}",
    )


def _lark(tools: Sequence[FunctionTool], start: str, calls: str) -> str:
    """The same calls for llguidance: the call object as one inline JSON schema."""
    alternatives = []
    for i, tool in enumerate(tools):
        arguments = guidance_schema(tool.parameters, layout=False)
        _rebase_refs(arguments, f"#/anyOf/{i}/properties/arguments")
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = {"anyOf": alternatives, "x-guidance": GUIDANCE_LAYOUT}
    return (
        "%llguidance {}\n"
        f"start: {start}\n"
        f"calls: {calls}\n"
        f'call: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n'
        "TEXT: /[^<](.|\\n)*/\n"
    )


def _rebase_refs(node: Any, base: str) -> None:
    """A schema moved under ``base``: its own ``#/...`` references must follow it."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            node["$ref"] = base + ref[1:]
        for value in node.values():
            _rebase_refs(value, base)
    elif isinstance(node, list):
        for value in node:
            _rebase_refs(value, base)


# ------------------------------------------------------------------------------ reading


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class CallDelta:
    """A piece of a tool call as it streams: the first has its id and name, the rest carry
    pieces of its arguments (OpenAI's ``delta.tool_calls`` entries)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ToolCallReader:
    """Reads a reply generated under :func:`tool_constraint`: text, or tool calls.

    Feed it text as it comes; it returns the text that is a plain answer and the call deltas.
    The grammar holds the reply to the format, so the reader only follows it; a reply cut
    short (``max_tokens``, a stop string) leaves its last call unfinished, and
    :attr:`complete` says so.
    """

    auto: bool
    make_id: Callable[[], str] = new_call_id
    calls: list[ToolCall] = field(default_factory=list)
    mode: Literal["undecided", "text", "calls"] = "undecided"
    _state: Literal["open", "name", "arguments", "close", "between", "broken"] = "open"
    _buffer: str = ""
    _current: ToolCall | None = None
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False

    def __post_init__(self) -> None:
        if not self.auto:
            self.mode = "calls"

    @property
    def complete(self) -> bool:
        """Whether the reply so far is whole: text, or calls that are all closed."""
        return self.mode == "text" or (self.mode == "calls" and self._state == "between")

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        if not text:
            return "", []
        if self.mode == "undecided":
            self.mode = "calls" if text.startswith("<") else "text"
        if self.mode == "text":
            return text, []
        self._buffer += text
        deltas: list[CallDelta] = []
        while self._step(deltas):
            pass
        return "", deltas

    def _step(self, deltas: list[CallDelta]) -> bool:
        """Move on by one part of the format; False when more text is needed."""
        if self._state == "broken":
            self._buffer = ""
            return False
        if self._state == "between":
            return self._expect(SEPARATOR, "open")
        if self._state == "open":
            return self._expect(OPEN + NAME_PREFIX, "name")
        if self._state == "name":
            end = self._buffer.find(ARGUMENTS_PREFIX)
            if end < 0:
                return False
            self._current = ToolCall(self.make_id(), self._buffer[:end], "")
            self._buffer = self._buffer[end + len(ARGUMENTS_PREFIX) :]
            deltas.append(
                CallDelta(len(self.calls), "", id=self._current.id, name=self._current.name)
            )
            self._state = "arguments"
            self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
            return True
        if self._state == "arguments":
            return self._arguments(deltas)
        return self._expect(CALL_END + CLOSE, "between")

    def _expect(self, text: str, then: Literal["open", "name", "between"]) -> bool:
        if len(self._buffer) < len(text):
            return False
        if not self._buffer.startswith(text):
            # Only a reply that did not come from the grammar gets here: what it holds is no
            # call, so nothing more is read and the reply counts as incomplete.
            self._state = "broken"
            return True
        self._buffer = self._buffer[len(text) :]
        self._state = then
        return True

    def _arguments(self, deltas: list[CallDelta]) -> bool:
        assert self._current is not None
        end = None
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
                self._started = True
            elif ch in "}]":
                self._depth -= 1
            if self._started and self._depth == 0:
                end = i + 1
                break
        piece = self._buffer if end is None else self._buffer[:end]
        self._buffer = "" if end is None else self._buffer[end:]
        if piece:
            self._current = replace(self._current, arguments=self._current.arguments + piece)
            deltas.append(CallDelta(len(self.calls), piece))
        if end is None:
            return False
        self.calls.append(self._current)
        self._current = None
        self._state = "close"
        return True


def read_reply(text: str, *, auto: bool) -> tuple[str | None, list[ToolCall], bool]:
    """A whole reply: its text (None when it is tool calls), the calls that were finished,
    and whether the reply is complete."""
    reader = ToolCallReader(auto=auto)
    content, _ = reader.feed(text)
    if reader.mode == "calls":
        return None, reader.calls, reader.complete
    return content, [], reader.complete or not text
