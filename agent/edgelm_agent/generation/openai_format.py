"""Build OpenAI response objects for chat and text completions. Pure: no I/O.

Both endpoints share one generation loop (:mod:`edgelm_agent.api.openai_routes`); a formatter
says what each piece of it looks like for its endpoint.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgelm_agent.generation.tool_calls import CallDelta, ToolCallReader
from edgelm_agent.inference.types import FinishReason, OutputConstraint


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _public_reason(reason: FinishReason) -> str:
    # A cancelled run is only ever seen by a client that is still there when the agent shuts
    # down; OpenAI clients know just "stop" and "length".
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class OutputShape:
    """What the generated text is held to, so the reply can say when it is not whole."""

    constraint: OutputConstraint | None = None
    #: The reply is read for tool calls: True when the model may also answer in text.
    tools_auto: bool | None = None

    @property
    def reads_tools(self) -> bool:
        return self.tools_auto is not None

    def incomplete(self, text: str, reason: FinishReason) -> dict[str, str] | None:
        """Why a constrained reply is not whole (it ended at max_tokens or a stop string
        before the grammar did); None when it is whole or unconstrained."""
        constraint = self.constraint
        if constraint is None or constraint.kind == "tool_calls":
            return None
        # Only the runtime knows where a grammar ends; JSON is whole when it parses.
        whole = reason != "length" if constraint.kind == "grammar" else _parses(text)
        if whole:
            return None
        return _incomplete_details(reason, constraint.description)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _incomplete_details(reason: FinishReason, what: str) -> dict[str, str]:
    if reason == "length":
        return {
            "reason": "max_tokens",
            "message": f"the reply reached max_tokens before it was complete under {what}; "
            "it is cut off and does not parse",
        }
    return {
        "reason": "stop_sequence",
        "message": f"a stop sequence ended the reply before it was complete under {what}; "
        "it is cut off and does not parse",
    }


_MARK = "\x00edgelm-text\x00"
_MARK_JSON = json.dumps(_MARK)  # control characters are always escaped, so this is exact


class DeltaEncoder:
    """SSE bytes of a text delta. The envelope (id, model, created...) is serialized once per
    stream; per token only the text is, which is most of the serving path's CPU per token."""

    def __init__(self, chunk_with_marker: dict[str, Any]) -> None:
        before, after = json.dumps(chunk_with_marker, ensure_ascii=False).split(_MARK_JSON)
        self._prefix = b"data: " + before.encode()
        self._suffix = after.encode() + b"\n\n"

    def encode(self, text: str) -> bytes:
        return self._prefix + json.dumps(text, ensure_ascii=False).encode() + self._suffix


class Formatter(Protocol):
    shape: OutputShape

    def first_chunk(self) -> dict[str, Any] | None: ...
    def delta_chunk(self, text: str) -> dict[str, Any]: ...
    def delta_encoder(self) -> DeltaEncoder: ...
    def text_chunks(self, text: str) -> list[dict[str, Any]]: ...
    def final_chunk(self, reason: FinishReason, output: str = "") -> dict[str, Any]: ...
    def usage_chunk(self, usage: Usage) -> dict[str, Any]: ...
    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]: ...


@dataclass
class _Common:
    model: str
    shape: OutputShape = field(default_factory=OutputShape)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


@dataclass
class ChatFormatter(_Common):
    _reader: ToolCallReader | None = None

    def __post_init__(self) -> None:
        self.id = self.id or "chatcmpl-" + secrets.token_hex(12)
        if self.shape.tools_auto is not None:
            self._reader = ToolCallReader(auto=self.shape.tools_auto)

    def first_chunk(self) -> dict[str, Any] | None:
        if self.shape.tools_auto is False:  # the reply is tool calls, never text
            return self._chunk({"role": "assistant", "content": None}, None)
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def delta_encoder(self) -> DeltaEncoder:
        return DeltaEncoder(self.delta_chunk(_MARK))

    def text_chunks(self, text: str) -> list[dict[str, Any]]:
        """The chunks of generated text read for tool calls: content, or call deltas."""
        if self._reader is None:
            return [self.delta_chunk(text)]
        content, deltas = self._reader.feed(text)
        chunks = [self.delta_chunk(content)] if content else []
        if deltas:
            chunks.append(self._chunk({"tool_calls": [_call_delta(d) for d in deltas]}, None))
        return chunks

    def final_chunk(self, reason: FinishReason, output: str = "") -> dict[str, Any]:
        if self._reader is not None:
            chunk = self._chunk({}, _tools_reason(reason, self._reader))
            if not self._reader.complete:
                chunk["choices"][0]["incomplete_details"] = _incomplete_details(
                    reason, "the tool-call format"
                )
            return chunk
        chunk = self._chunk({}, _public_reason(reason))
        details = self.shape.incomplete(output, reason)
        if details is not None:
            chunk["choices"][0]["incomplete_details"] = details
        return chunk

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk", [])
        chunk["usage"] = usage.as_dict()
        return chunk

    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None}
        if self.shape.tools_auto is not None:
            reader = ToolCallReader(auto=self.shape.tools_auto)
            _content, _ = reader.feed(text)
            if reader.mode != "text":
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in reader.calls
                ]
            choice["finish_reason"] = _tools_reason(reason, reader)
            details = (
                None if reader.complete else _incomplete_details(reason, "the tool-call format")
            )
        else:
            choice["finish_reason"] = _public_reason(reason)
            details = self.shape.incomplete(text, reason)
        if details is not None:
            choice["incomplete_details"] = details
        body = self._envelope("chat.completion", [choice])
        body["usage"] = usage.as_dict()
        return body

    def _chunk(self, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return self._envelope(
            "chat.completion.chunk",
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        )


@dataclass
class CompletionFormatter(_Common):
    def __post_init__(self) -> None:
        self.id = self.id or "cmpl-" + secrets.token_hex(12)

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def delta_encoder(self) -> DeltaEncoder:
        return DeltaEncoder(self.delta_chunk(_MARK))

    def text_chunks(self, text: str) -> list[dict[str, Any]]:
        return [self.delta_chunk(text)]

    def final_chunk(self, reason: FinishReason, output: str = "") -> dict[str, Any]:
        chunk = self._chunk("", _public_reason(reason))
        details = self.shape.incomplete(output, reason)
        if details is not None:
            chunk["choices"][0]["incomplete_details"] = details
        return chunk

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._envelope("text_completion", [])
        chunk["usage"] = usage.as_dict()
        return chunk

    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]:
        body = self._chunk(text, _public_reason(reason))
        details = self.shape.incomplete(text, reason)
        if details is not None:
            body["choices"][0]["incomplete_details"] = details
        body["usage"] = usage.as_dict()
        return body

    def _chunk(self, text: str, reason: str | None) -> dict[str, Any]:
        return self._envelope(
            "text_completion",
            [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        )


def _tools_reason(reason: FinishReason, reader: ToolCallReader) -> str:
    """``tool_calls`` when the model ended its reply with whole calls."""
    if reader.mode == "calls" and reader.complete and reason != "length":
        return "tool_calls"
    return _public_reason(reason)


def _call_delta(delta: CallDelta) -> dict[str, Any]:
    """One ``delta.tool_calls`` entry, as the openai client puts calls together."""
    entry: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        entry["id"] = delta.id
        entry["type"] = "function"
        entry["function"] = {"name": delta.name, "arguments": delta.arguments}
    else:
        entry["function"] = {"arguments": delta.arguments}
    return entry
