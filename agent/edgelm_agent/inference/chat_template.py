"""Render a chat with the model's own Jinja template, as Hugging Face's tokenizers do.

The template comes from the model (GGUF ``tokenizer.chat_template`` metadata, or the ONNX
folder's ``tokenizer_config.json``), so it is untrusted input: it runs in Jinja's immutable
sandbox and any template error becomes a :class:`~edgelm_agent.errors.InvalidRequest` or
:class:`~edgelm_agent.errors.ModelError`, never a crash.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgelm_agent.errors import InvalidRequest, ModelError


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered chat: a message's content, or the template's own text."""

    text: str
    is_content: bool


class _TemplateRaised(Exception):
    """The template called ``raise_exception``: it rejects this conversation."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    """transformers' tojson: plain JSON, not Jinja's HTML-escaped variant."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template. Build once per model; :meth:`render` is cheap."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        # The environment matches transformers' apply_chat_template, which these templates are
        # written and tested against: trim/lstrip blocks, loop controls, and its tojson.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}") from exc
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        context: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        return self._render(context)

    def render_segments(self, messages: Sequence[ChatMessage]) -> list[Segment] | None:
        """The rendered chat, cut into the template's own text and the messages' contents;
        None if this template does not insert contents as they are.

        Each content is rendered as a marker no client can write (it holds a fresh random
        nonce), then the output is cut at the markers. A template that changes a content
        (slices, trims or escapes it, say) breaks its marker or inserts it changed: the caller
        finds that out by comparing the joined segments with :meth:`render`.
        """
        nonce = secrets.token_hex(8)
        marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        marked = [
            {"role": m.role, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)
        ]
        rendered = self._render(
            {
                "messages": marked,
                "add_generation_prompt": True,
                "bos_token": self._bos,
                "eos_token": self._eos,
            }
        )
        parts = marker.split(rendered)
        segments = []
        for n, part in enumerate(parts):
            if n % 2 == 1:
                segments.append(Segment(messages[int(part)].content, is_content=True))
            elif "\ue000" in part or "\ue001" in part:  # a marker the template broke
                return None
            elif part:
                segments.append(Segment(part, is_content=False))
        return segments

    def _render(self, context: dict[str, Any]) -> str:
        try:
            return self._template.render(**context)
        except _TemplateRaised as exc:
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        except Exception as exc:  # a template is code from the model file; any failure is its own
            raise ModelError(f"the model's chat template failed: {exc!r}") from exc
