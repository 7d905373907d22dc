"""Render a chat with the model's own Jinja template, as Hugging Face's tokenizers do.

The template comes from the model (GGUF ``tokenizer.chat_template`` metadata, or the ONNX
folder's ``tokenizer_config.json``), so it is untrusted input: it runs in Jinja's immutable
sandbox and any template error becomes a :class:`~edgelm_agent.errors.InvalidRequest` or
:class:`~edgelm_agent.errors.ModelError`, never a crash.
"""

from __future__ import annotations

import dataclasses
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
class ToolCall:
    """A function call the assistant made: ``arguments`` is its JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def as_template(self) -> dict[str, Any]:
        # Templates write the arguments with tojson, so they take an object, not its text.
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.loads(self.arguments)},
        }


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    #: An assistant message's calls, and the id of the call a ``tool`` message answers.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def as_template(self, content: str | None = None) -> dict[str, Any]:
        """The message as chat templates read it, with ``content`` in place of its own."""
        message: dict[str, Any] = {
            "role": self.role,
            "content": self.content if content is None else content,
        }
        if self.tool_calls:
            message["tool_calls"] = [c.as_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


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
        self.source = source
        # Some templates have no system role: Phi-3-mini's first one drops system messages,
        # Gemma's refuses them. Their text then goes to the next user turn, as llama.cpp does
        # (minja's system-role polyfill), so an app's instructions are neither lost nor a 400.
        self._folds_system = not self._writes_system_messages()

    @property
    def speaks_tools(self) -> bool:
        """Whether the template describes tools and calls itself, in the ``<tool_call>`` format
        (Hermes, Qwen): then it gets the tools and tool messages as they are."""
        return "tools" in self.source and "<tool_call>" in self.source

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        messages = self._fold_system(messages)
        context: dict[str, Any] = {
            "messages": [m.as_template() for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        if tools:
            context["tools"] = list(tools)
        return self._render(context)

    def render_segments(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[dict[str, Any]] | None = None
    ) -> list[Segment] | None:
        """The rendered chat, cut into the template's own text and the messages' contents;
        None if this template does not insert contents as they are.

        Each content is rendered as a marker no client can write (it holds a fresh random
        nonce), then the output is cut at the markers. A template that changes a content
        (slices, trims or escapes it, say) breaks its marker or inserts it changed: the caller
        finds that out by comparing the joined segments with :meth:`render`.
        """
        messages = self._fold_system(messages)
        nonce = secrets.token_hex(8)
        marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        marked = [m.as_template(f"\ue000{nonce}:{i}\ue001") for i, m in enumerate(messages)]
        context: dict[str, Any] = {
            "messages": marked,
            "add_generation_prompt": True,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        if tools:
            context["tools"] = list(tools)
        rendered = self._render(context)
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

    def _writes_system_messages(self) -> bool:
        """Whether a system message's text changes what the template writes (not whether it
        appears as it is: a template may trim or cut it); probed once, at load."""
        context = {"add_generation_prompt": True, "bos_token": self._bos, "eos_token": self._eos}

        def chat(system: str) -> list[dict[str, str]]:
            return [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]

        try:
            first, second = (self._template.render(messages=chat(p), **context) for p in "AB")
            return first != second
        except _TemplateRaised:
            pass
        except Exception:  # broken on any chat: real requests report it
            return True
        try:  # it refused the system message; does it take the user's alone?
            self._template.render(messages=chat("A")[1:], **context)
        except Exception:
            return True  # it refuses more than system messages: leave those to it
        return False

    def _fold_system(self, messages: Sequence[ChatMessage]) -> Sequence[ChatMessage]:
        """For a template without a system role: each system message's text opens the next
        user message (a newline between), or becomes a user message where none follows."""
        if not self._folds_system or all(m.role != "system" for m in messages):
            return messages
        folded: list[ChatMessage] = []
        pending: list[str] = []
        for message in messages:
            if message.role == "system":
                pending.append(message.content)
                continue
            if pending and message.role == "user":
                text = "\n".join([*pending, message.content] if message.content else pending)
                message = dataclasses.replace(message, content=text)
            elif pending:  # keep the order: the system text goes before this turn
                folded.append(ChatMessage("user", "\n".join(pending)))
            pending = []
            folded.append(message)
        if pending:
            folded.append(ChatMessage("user", "\n".join(pending)))
        return folded

    def _render(self, context: dict[str, Any]) -> str:
        try:
            return self._template.render(**context)
        except _TemplateRaised as exc:
            raise InvalidRequest(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from exc
        except Exception as exc:  # a template is code from the model file; any failure is its own
            raise ModelError(f"the model's chat template failed: {exc!r}") from exc
