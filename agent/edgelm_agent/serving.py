"""The model being served: a backend, its scheduler and its chat template, looked up by id.

Handlers take a reference to a :class:`ServingModel` when a request arrives and keep it for the
whole request, so a later switch of the active model never pulls a model out from under a
running generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgelm_agent.embedding_model import EmbeddingSlot
from edgelm_agent.errors import (
    ContextOverflow,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    WrongModelRole,
)
from edgelm_agent.inference.backend import Backend
from edgelm_agent.inference.chat_template import ChatMessage, ChatTemplate
from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.inference.special_text import special_pattern, touches_special
from edgelm_agent.inference.types import (
    ModelInfo,
    SamplingDefaults,
    SamplingFields,
    SamplingParams,
)
from edgelm_protocol.presets import Preset


@dataclass
class FailureStreak:
    """Consecutive runtime failures; a model that keeps failing is not ready."""

    limit: int = 3
    count: int = 0

    def failed(self) -> None:
        self.count += 1

    def succeeded(self) -> None:
        self.count = 0

    @property
    def degraded(self) -> bool:
        return self.count >= self.limit


class ServingModel:
    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler,
        *,
        context_length: int,
        defaults: SamplingDefaults | None = None,
        health: FailureStreak | None = None,
        version: str = "",
        chat_template: str | None = None,
        default_max_tokens: int = 512,
        digest: str = "",
        signers: tuple[str, ...] = (),
        presets: tuple[Preset, ...] = (),
    ) -> None:
        self.backend = backend
        #: The prompt presets signed with the model, which requests select by name.
        self.presets = presets
        #: Provenance, sent with every generation: the sha256 of the signed target that was
        #: verified and loaded, and the keyids of the TUF targets keys that signed it. Empty
        #: for a model served outside the registry (tests).
        self.digest = digest
        self.signers = signers
        self.default_max_tokens = default_max_tokens
        self.scheduler = scheduler
        self.context_length = context_length
        self.defaults = defaults or SamplingDefaults()
        self.health = health or FailureStreak()
        self.version = version
        info = backend.info
        # A template in the signed metadata overrides the model file's own (which may be
        # missing or wrong); either way it is the model publisher's, never the client's.
        source = chat_template or info.chat_template
        self._template = (
            ChatTemplate(source, bos_token=info.bos_token, eos_token=info.eos_token)
            if source
            else None
        )
        self._specials = special_pattern(info.special_texts)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def model_id(self) -> str:
        return self.backend.info.model_id

    @property
    def names(self) -> tuple[str, ...]:
        """What a request may call this model: its name, or ``name@version`` to insist on
        the version (a fleet job for ``tiny@2.0`` waits until 2.0 is the one serving)."""
        if not self.version:
            return (self.model_id,)
        return (self.model_id, f"{self.model_id}@{self.version}")

    @property
    def template_speaks_tools(self) -> bool:
        """Whether the chat template renders tools and tool calls itself."""
        return self._template is not None and self._template.speaks_tools

    def chat_prompt(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """The chat's prompt tokens; ``tools`` (OpenAI's form) go to a template that
        :attr:`template_speaks_tools`."""
        if self._template is None:
            raise InvalidRequest(
                f"model {self.model_id!r} has no chat template; use /v1/completions with a "
                "plain prompt",
                param="messages",
            )
        if tools or any(m.tool_calls for m in messages):
            # The template writes tools and calls as its own text, where control-token text
            # would act as control tokens: such a request is refused, not run.
            calls = [c.as_template() for m in messages for c in m.tool_calls]
            written = json.dumps([tools, calls], ensure_ascii=False)
            if self._specials is not None and self._specials.search(written):
                raise InvalidRequest(
                    "the tools or tool calls hold text this model reads as control tokens",
                    param="tools",
                )
        prompt = self._template.render(messages, tools=tools)
        segments = self._template.render_segments(messages, tools=tools)
        if segments is None or "".join(s.text for s in segments) != prompt:
            # The template reshapes contents (trims or escapes them, say), so they cannot be
            # told apart from its own text. Safe only if no content carries special text.
            specials = self._specials
            if specials is not None and any(specials.search(m.content) for m in messages):
                raise InvalidRequest(
                    "the messages hold text this model reads as control tokens, and its chat "
                    "template reshapes message contents, so they cannot be kept plain text",
                    param="messages",
                )
            return self.backend.tokenize(prompt)
        spans, position = [], 0
        for segment in segments:
            if segment.is_content:
                spans.append((position, position + len(segment.text)))
            position += len(segment.text)
        if not touches_special(prompt, spans, self._specials):
            return self.backend.tokenize(prompt)  # exactly the tokens a plain chat always got
        # Control-token text reaches into a message: the template's text is tokenized as
        # usual, the contents as plain text, so no client can open a turn of its own.
        tokens: list[int] = []
        for n, segment in enumerate(segments):
            tokens += self.backend.tokenize(
                segment.text, add_bos=n == 0, special=not segment.is_content
            )
        return tokens

    def text_prompt(self, prompt: str) -> list[int]:
        return self.backend.tokenize(prompt)

    def sampling(self, fields: SamplingFields, prompt_tokens: int) -> SamplingParams:
        """Fill defaults and check the context. A reply without ``max_tokens`` gets
        ``default_max_tokens``, or what is left of the context if that is less."""
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty", param="prompt")
        room = self.context_length - prompt_tokens
        if fields.max_tokens is not None:
            max_tokens = fields.max_tokens
        else:
            max_tokens = min(self.default_max_tokens, room)
        if max_tokens > room or room <= 0:
            raise ContextOverflow(
                prompt_tokens=prompt_tokens,
                max_tokens=fields.max_tokens,  # None: the prompt alone fills the context
                context_length=self.context_length,
            )
        d = self.defaults
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=d.temperature if fields.temperature is None else fields.temperature,
            top_p=d.top_p if fields.top_p is None else fields.top_p,
            top_k=d.top_k if fields.top_k is None else fields.top_k,
            seed=fields.seed,
            stop=fields.stop,
        )


class ModelHost:
    """Holds the active model, and the models loaded beside it on demand (see
    :mod:`edgelm_agent.model_cache`). Empty until the daemon has loaded one."""

    def __init__(self) -> None:
        self._active: ServingModel | None = None
        #: Installed models loaded on demand within the RAM budget, oldest load first.
        self._extras: list[ServingModel] = []
        #: The daemon is still bringing its model up: /readyz says "loading", not "no_model".
        self.starting = False
        self.draining = False
        #: The embedding model, served beside the active one (see embedding_loader.py).
        self.embeddings = EmbeddingSlot()

    @property
    def active(self) -> ServingModel | None:
        return self._active

    def set_active(self, model: ServingModel | None) -> None:
        self._active = model

    def models(self) -> list[ServingModel]:
        """The active model first (a bare name finds it before any other version), then
        those loaded on demand."""
        active = [self._active] if self._active is not None else []
        return active + self._extras

    def add_extra(self, model: ServingModel) -> None:
        self._extras.append(model)

    def remove_extra(self, model: ServingModel) -> None:
        self._extras = [m for m in self._extras if m is not model]

    def find(self, model_id: str) -> ServingModel:
        """The model with this id, or ModelNotFound naming the ones there are."""
        for model in self.models():
            if model_id in model.names:
                return model
        embedding = self.embeddings.model
        if embedding is not None and model_id in embedding.names:
            raise WrongModelRole(model_id, "embedding")
        raise ModelNotFound(model_id, [m.model_id for m in self.models()])

    def resolve(self, model_id: str) -> ServingModel:
        """The model to run a new request on: refuses while loading or shutting down."""
        if self.draining:
            raise NotReady("the agent is shutting down", retry_after_s=5)
        if self._active is None:
            raise NotReady("no model is loaded yet", retry_after_s=5)
        return self.find(model_id)
