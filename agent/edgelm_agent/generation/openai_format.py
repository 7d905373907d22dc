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

from edgelm_agent.inference.types import FinishReason


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
    def first_chunk(self) -> dict[str, Any] | None: ...
    def delta_chunk(self, text: str) -> dict[str, Any]: ...
    def delta_encoder(self) -> DeltaEncoder: ...
    def final_chunk(self, reason: FinishReason) -> dict[str, Any]: ...
    def usage_chunk(self, usage: Usage) -> dict[str, Any]: ...
    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]: ...


@dataclass
class _Common:
    model: str
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
    def __post_init__(self) -> None:
        self.id = self.id or "chatcmpl-" + secrets.token_hex(12)

    def first_chunk(self) -> dict[str, Any] | None:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def delta_encoder(self) -> DeltaEncoder:
        return DeltaEncoder(self.delta_chunk(_MARK))

    def final_chunk(self, reason: FinishReason) -> dict[str, Any]:
        return self._chunk({}, _public_reason(reason))

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk", [])
        chunk["usage"] = usage.as_dict()
        return chunk

    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]:
        body = self._envelope(
            "chat.completion",
            [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _public_reason(reason),
                }
            ],
        )
        body["usage"] = usage.as_dict()
        return body

    def _chunk(self, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
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

    def final_chunk(self, reason: FinishReason) -> dict[str, Any]:
        return self._chunk("", _public_reason(reason))

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._envelope("text_completion", [])
        chunk["usage"] = usage.as_dict()
        return chunk

    def full(self, text: str, reason: FinishReason, usage: Usage) -> dict[str, Any]:
        body = self._chunk(text, _public_reason(reason))
        body["usage"] = usage.as_dict()
        return body

    def _chunk(self, text: str, reason: str | None) -> dict[str, Any]:
        return self._envelope(
            "text_completion",
            [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        )
