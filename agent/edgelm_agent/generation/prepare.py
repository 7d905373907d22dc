"""From an OpenAI-style request body to a generation ready to run: one path for every caller.

The chat route, the completion route, the job worker, and remote jobs from the fleet all take
this path, so a request means the same wherever it comes from: the same checks, the same
template and tokenization, the same defaults and context limits, the same response shape. No
aiohttp here: the HTTP layer reads bytes and writes responses around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from edgelm_agent.generation.openai_format import ChatFormatter, CompletionFormatter, Formatter
from edgelm_agent.generation.openai_schema import parse_chat, parse_completion
from edgelm_agent.inference.types import GenerationRequest, SamplingParams
from edgelm_agent.serving import ModelHost, ServingModel

RequestKind = Literal["chat", "completion"]
T = TypeVar("T")

INLINE_PROMPT_CHARS = 2048  # below this, tokenizing costs less than the hop to a thread
TEMPLATE_CHARS_PER_MESSAGE = 64  # about what a chat template wraps around each message


@dataclass(frozen=True)
class PreparedGeneration:
    """A request checked, tokenized and fitted to its model's context."""

    model: ServingModel
    tokens: list[int]
    params: SamplingParams
    formatter: Formatter
    stream: bool
    include_usage: bool

    def request(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(tuple(self.tokens), self.params, request_id=request_id)


def kind_of(body: dict[str, Any]) -> RequestKind:
    """A chat request has ``messages``; anything else is read as a completion."""
    return "chat" if "messages" in body else "completion"


async def prepare(body: dict[str, Any], host: ModelHost, kind: RequestKind) -> PreparedGeneration:
    """Check ``body``, pick its model, tokenize it and fill its sampling parameters.

    Raises the request's error (400, 404, 503…) before anything is sent or run.
    """
    if kind == "chat":
        chat = parse_chat(body)
        model = host.resolve(chat.model)
        # Each message also costs a pass of the template, however short its content.
        size = sum(len(m.content) + TEMPLATE_CHARS_PER_MESSAGE for m in chat.messages)
        tokens = await _off_loop_if_long(size, model.chat_prompt, chat.messages)
        fields, stream, usage = chat.sampling, chat.stream, chat.include_usage
        formatter: Formatter = ChatFormatter(model.model_id)
    else:
        completion = parse_completion(body)
        model = host.resolve(completion.model)
        tokens = await _off_loop_if_long(
            len(completion.prompt), model.text_prompt, completion.prompt
        )
        fields, stream, usage = completion.sampling, completion.stream, completion.include_usage
        formatter = CompletionFormatter(model.model_id)
    params = model.sampling(fields, len(tokens))
    return PreparedGeneration(model, tokens, params, formatter, stream, usage)


async def _off_loop_if_long(size: int, fn: Callable[[T], list[int]], arg: T) -> list[int]:
    """Tokenize a long prompt in a thread (a second on a Pi for 1 MB), so streams that are
    already running keep flowing; a short one inline, where the thread hop would cost more
    time to first token than the work itself."""
    if size < INLINE_PROMPT_CHARS:
        return fn(arg)
    return await asyncio.to_thread(fn, arg)
