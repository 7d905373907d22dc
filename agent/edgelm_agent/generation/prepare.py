"""From an OpenAI-style request body to a generation ready to run: one path for every caller.

The chat route, the completion route, the job worker, and remote jobs from the fleet all take
this path, so a request means the same wherever it comes from: the same checks, the same
template and tokenization, the same defaults and context limits, the same response shape. No
aiohttp here: the HTTP layer reads bytes and writes responses around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from edgelm_agent.generation.openai_format import (
    ChatFormatter,
    CompletionFormatter,
    Formatter,
    OutputShape,
)
from edgelm_agent.generation.openai_schema import (
    ChatBody,
    model_field,
    parse_chat,
    parse_completion,
)
from edgelm_agent.generation.presets import apply_preset, find_preset, preset_name
from edgelm_agent.generation.tool_calls import plain_history
from edgelm_agent.inference.chat_template import ChatMessage
from edgelm_agent.inference.types import GenerationRequest, OutputConstraint, SamplingParams
from edgelm_agent.serving import ModelHost, ServingModel

RequestKind = Literal["chat", "completion"]
T = TypeVar("T")
U = TypeVar("U")

INLINE_PROMPT_CHARS = 2048  # below this, tokenizing costs less than the hop to a thread
TEMPLATE_CHARS_PER_MESSAGE = 64  # about what a chat template wraps around each message
#: Request fields that make the reply follow a grammar built (and checked) for the request.
CONSTRAINT_FIELDS = ("response_format", "grammar", "tools")


@dataclass(frozen=True)
class PreparedGeneration:
    """A request checked, tokenized and fitted to its model's context."""

    model: ServingModel
    tokens: list[int]
    params: SamplingParams
    formatter: Formatter
    stream: bool
    include_usage: bool
    #: The model's prompt preset the request selected, if any.
    preset: str | None = None

    def request(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(tuple(self.tokens), self.params, request_id=request_id)


def kind_of(body: dict[str, Any]) -> RequestKind:
    """A chat request has ``messages``; anything else is read as a completion."""
    return "chat" if "messages" in body else "completion"


async def prepare(body: dict[str, Any], host: ModelHost, kind: RequestKind) -> PreparedGeneration:
    """Check ``body``, pick its model, tokenize it and fill its sampling parameters.

    Raises the request's error (400, 404, 503…) before anything is sent or run.
    """
    body, preset = _with_preset(body, host, kind)
    if kind == "chat":
        chat, constraint, shape = await _off_loop_if_constrained(body, _parse_chat_output, body)
        model = host.resolve(chat.model)
        _check_constraint(model, constraint)
        messages, tools = _chat_input(chat, model)
        # Each message also costs a pass of the template, however short its content.
        size = sum(len(m.content) + TEMPLATE_CHARS_PER_MESSAGE for m in messages)
        tokens = await _off_loop_if_long(size, lambda m: model.chat_prompt(m, tools), messages)
        fields, stream, usage = chat.sampling, chat.stream, chat.include_usage
        formatter: Formatter = ChatFormatter(model.model_id, shape)
    else:
        completion = await _off_loop_if_constrained(body, parse_completion, body)
        model = host.resolve(completion.model)
        constraint = completion.constraint
        _check_constraint(model, constraint)
        tokens = await _off_loop_if_long(
            len(completion.prompt), model.text_prompt, completion.prompt
        )
        fields, stream, usage = completion.sampling, completion.stream, completion.include_usage
        formatter = CompletionFormatter(model.model_id, OutputShape(constraint))
    params = model.sampling(fields, len(tokens))
    if constraint is not None:
        params = dataclasses.replace(params, constraint=constraint)
    return PreparedGeneration(model, tokens, params, formatter, stream, usage, preset)


def _with_preset(
    body: dict[str, Any], host: ModelHost, kind: RequestKind
) -> tuple[dict[str, Any], str | None]:
    """The body with its preset's fields written in, and the preset's name; the body as it
    is when it names none. The preset is the model's, so the model is looked up first."""
    name = preset_name(body)
    if name is None:
        return body, None
    model = host.resolve(model_field(body))
    return apply_preset(body, find_preset(model.presets, name, model.model_id), kind), name


def _parse_chat_output(
    body: dict[str, Any],
) -> tuple[ChatBody, OutputConstraint | None, OutputShape]:
    chat = parse_chat(body)
    return (chat, *_chat_output(chat))


def _chat_output(chat: ChatBody) -> tuple[OutputConstraint | None, OutputShape]:
    """The constraint of a chat reply, and how its text is read back."""
    if chat.tools is not None and chat.tools.offered:  # parse_chat built the calls' grammar
        auto = chat.tools.mode == "auto"
        return chat.constraint, OutputShape(chat.constraint, tools_auto=auto)
    return chat.constraint, OutputShape(chat.constraint)


def _chat_input(
    chat: ChatBody, model: ServingModel
) -> tuple[Sequence[ChatMessage], list[dict[str, Any]] | None]:
    """The messages and tools as the model's template takes them: a template that speaks
    tools gets them as they are; any other gets them written into the messages."""
    offered = chat.tools.offered if chat.tools is not None else ()
    if model.template_speaks_tools:
        return chat.messages, [t.as_openai() for t in offered] or None
    if offered or any(m.tool_calls or m.role == "tool" for m in chat.messages):
        return plain_history(chat.messages, offered), None
    return chat.messages, None


def _check_constraint(model: ServingModel, constraint: OutputConstraint | None) -> None:
    if constraint is not None:
        model.backend.check_constraint(constraint)


async def _off_loop_if_constrained(body: dict[str, Any], fn: Callable[[T], U], arg: T) -> U:
    """Parse a request that asks for a grammar, a schema or tools in a thread: building its
    grammar and checking it (see gbnf_check.py) takes tens of milliseconds for a large one,
    more on a Pi, and running streams must keep flowing meanwhile. Others parse inline."""
    if any(body.get(key) is not None for key in CONSTRAINT_FIELDS):
        return await asyncio.to_thread(fn, arg)
    return fn(arg)


async def _off_loop_if_long(size: int, fn: Callable[[T], list[int]], arg: T) -> list[int]:
    """Tokenize a long prompt in a thread (a second on a Pi for 1 MB), so streams that are
    already running keep flowing; a short one inline, where the thread hop would cost more
    time to first token than the work itself."""
    if size < INLINE_PROMPT_CHARS:
        return fn(arg)
    return await asyncio.to_thread(fn, arg)
