"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiohttp import web

from edgelm_agent.api.context import (
    API_CONTEXT,
    LOG_FACTS,
    PREPARED_RESPONSE,
    REQUEST_ID,
    STARTED,
    ApiContext,
)
from edgelm_agent.api.errors import http_status
from edgelm_agent.api.sse import SseStream, sse_event
from edgelm_agent.embedding_model import EmbeddingModel
from edgelm_agent.errors import (
    BackendError,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
)
from edgelm_agent.generation.openai_format import DeltaEncoder, Formatter, Usage
from edgelm_agent.generation.openai_schema import decode_json_object
from edgelm_agent.generation.prepare import PreparedGeneration, RequestKind, prepare
from edgelm_agent.inference.types import Finished, TextDelta
from edgelm_agent.model_cache import DEFAULT_KEEP_ALIVE, KeepAlive
from edgelm_agent.registry.model_target import EMBEDDING, GENERATION, ModelTarget
from edgelm_agent.registry.registry import version_key
from edgelm_agent.residency import parse_keep_alive
from edgelm_agent.serving import ModelHost, ServingModel

log = structlog.get_logger(__name__)
T = TypeVar("T")


async def read_json(request: web.Request) -> dict[str, Any]:
    ctx = request.app[API_CONTEXT]
    try:
        async with asyncio.timeout(ctx.body_timeout_s):  # a trickled body cannot hold a slot
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(limit_bytes=ctx.max_body_bytes) from exc
    except TimeoutError as exc:
        raise RequestTimeout(
            f"the request body did not arrive within {ctx.body_timeout_s:g} s"
        ) from exc
    return decode_json_object(raw)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, kind: RequestKind) -> web.StreamResponse:
    ctx = request.app[API_CONTEXT]
    body = await read_json(request)
    keep_alive = take_keep_alive(body)
    async with _lease(ctx, body, keep_alive):
        # Under the lease, the model cannot be unloaded until the last byte is sent; a model
        # that is installed but not loaded was loaded (or refused) on the way in.
        prepared = await prepare(body, ctx.host, kind)
        return await Generation(request, ctx, prepared).respond()


def take_keep_alive(body: dict[str, Any]) -> KeepAlive:
    """The request's ``keep_alive`` (Ollama's field), taken out of the body: how long its
    model stays loaded once the request ends."""
    if "keep_alive" not in body:
        return DEFAULT_KEEP_ALIVE
    return parse_keep_alive(body.pop("keep_alive"))


def _lease(
    ctx: ApiContext, body: dict[str, Any], keep_alive: KeepAlive
) -> AbstractAsyncContextManager[None]:
    name = body.get("model")
    if ctx.models is None or not isinstance(name, str) or not name:
        return nullcontext()  # a missing or bad model field: prepare() says what is wrong
    return ctx.models.cache.lease(name, keep_alive)


#: Provenance headers on every generation response: which model answered, the sha256 of its
#: signed target, and the keyids of the TUF targets keys that signed it.
MODEL_HEADER = "X-Edgelm-Model"
DIGEST_HEADER = "X-Edgelm-Model-Digest"
SIGNER_HEADER = "X-Edgelm-Model-Signer"


def provenance(model: ServingModel) -> dict[str, str]:
    """The provenance headers of ``model``'s answers; the same facts go into the log line."""
    headers = {
        MODEL_HEADER: f"{model.model_id}@{model.version}" if model.version else model.model_id
    }
    if model.digest:
        headers[DIGEST_HEADER] = "sha256:" + model.digest
    if model.signers:
        headers[SIGNER_HEADER] = ",".join(model.signers)
    return headers


def _model_card(m: ServingModel, host: ModelHost) -> dict[str, Any]:
    return {
        "id": m.model_id,
        "object": "model",
        "created": m.info.created,
        "owned_by": "edgelm",
        "format": m.info.format,
        "backend": m.info.backend,
        "context_length": m.context_length,
        "accelerator": m.info.accelerator.as_dict(),
        # Prompt presets signed with the model, which a request selects with "preset".
        "presets": [p.summary() for p in m.presets],
        # Extensions to OpenAI's list: what the model is for, and whether it is in memory.
        "version": m.version,
        "role": GENERATION,
        "loaded": True,
        "active": m is host.active,
    }


def _embedding_card(m: EmbeddingModel) -> dict[str, Any]:
    return {
        "id": m.model_id,
        "object": "model",
        "created": m.info.created,
        "owned_by": "edgelm",
        "version": m.version,
        "role": EMBEDDING,
        "dimensions": m.info.dimensions,
        "loaded": True,
        "active": False,
    }


def _installed_card(t: ModelTarget, model_id: str) -> dict[str, Any]:
    """An installed model that is not in memory: a request naming it loads it."""
    return {
        "id": model_id,
        "object": "model",
        "created": 0,  # OpenAI's field is a load time; a model not loaded has none
        "owned_by": "edgelm",
        "format": t.format,
        "context_length": t.context_length,
        "presets": [p.summary() for p in t.presets],
        "version": t.version,
        "role": t.role,
        "loaded": False,
        "active": False,
    }


async def _cards(ctx: ApiContext) -> list[dict[str, Any]]:
    """What this agent can serve: the models in memory, then (with a RAM budget) the other
    installed chat models, which a request loads. An installed model whose name a loaded
    one already answers to is listed as ``name@version``."""
    host = ctx.host
    cards = [_model_card(m, host) for m in host.models()]
    if host.embeddings.model is not None:
        cards.append(_embedding_card(host.embeddings.model))
    if ctx.models is None or not ctx.models.cache.enabled:
        return cards
    loaded = {f"{m.model_id}@{m.version}" for m in host.models()}
    taken = {c["id"] for c in cards}
    state = await asyncio.to_thread(ctx.models.registry.state)
    newest_first = sorted(state.models.values(), key=lambda t: version_key(t.version), reverse=True)
    for target in newest_first:
        if target.role != GENERATION or target.ref in loaded:
            continue
        model_id = target.name if target.name not in taken else target.ref
        taken.add(model_id)
        cards.append(_installed_card(target, model_id))
    return cards


async def list_models(request: web.Request) -> web.Response:
    cards = await _cards(request.app[API_CONTEXT])
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    ctx = request.app[API_CONTEXT]
    wanted = request.match_info["model_id"]
    try:
        return web.json_response(_model_card(ctx.host.find(wanted), ctx.host))
    except ModelNotFound:
        for card in await _cards(ctx):
            if wanted in (card["id"], f"{card['id']}@{card.get('version')}"):
                return web.json_response(card)
        raise


@dataclass
class Generation:
    """One generation request from admission to the last byte on the wire."""

    request: web.Request
    ctx: ApiContext
    prepared: PreparedGeneration
    first_token_at: float | None = None
    pieces: list[str] = field(default_factory=list)
    _encoder: DeltaEncoder = field(init=False)
    _pending: bytes = b""

    @property
    def model(self) -> ServingModel:
        return self.prepared.model

    @property
    def tokens(self) -> list[int]:
        return self.prepared.tokens

    @property
    def formatter(self) -> Formatter:
        return self.prepared.formatter

    @property
    def stream(self) -> bool:
        return self.prepared.stream

    @property
    def include_usage(self) -> bool:
        return self.prepared.include_usage

    async def respond(self) -> web.StreamResponse:
        generation = self.prepared.request(self.request[REQUEST_ID])
        facts = self.request[LOG_FACTS]
        facts.update(
            model=self.model.model_id,
            model_digest=self.model.digest or None,
            model_signer=",".join(self.model.signers) or None,
            prompt_tokens=len(self.tokens),
            max_tokens=generation.params.max_tokens,
            stream=self.stream,
            preset=self.prepared.preset,
        )
        self.ctx.metrics.prompt_tokens.labels(self.model.model_id).inc(len(self.tokens))
        sse = SseStream(self.request) if self.stream else None
        finished: Finished | None = None
        try:
            async with aclosing(self.model.scheduler.generate(generation)) as batches:
                async for batch in batches:
                    if sse is not None and not sse.opened:
                        # Headers go out once the model has taken the request, so a full
                        # queue or a failed runtime still gets a proper JSON error status.
                        await self._open(sse)
                    texts = [e.text for e in batch if isinstance(e, TextDelta)]
                    if texts:
                        await self._on_text(texts, sse)
                    if isinstance(batch[-1], Finished):
                        finished = batch[-1]
        except ConnectionResetError:
            facts["client_disconnected"] = True
            return self._prepared_or_closed()
        except BackendError as exc:
            if sse is None or not sse.opened:
                raise
            facts["error"] = exc.code
            return await sse.fail(str(exc), http_status(exc)[1], exc.code)
        assert finished is not None  # the scheduler always ends a stream with Finished
        if finished.reason == "cancelled":
            # Only the end of the shutdown grace stops a generation whose client is still
            # here; a partial answer must not pass for a whole one.
            stopped = NotReady(
                "the agent is shutting down; the answer was stopped before its end",
                retry_after_s=5,
            )
            if sse is None or not sse.opened:
                raise stopped
            facts["error"] = stopped.code
            return await sse.fail(str(stopped), http_status(stopped)[1], stopped.code)
        usage = Usage(len(self.tokens), finished.completion_tokens)
        self._observe(finished, usage)
        if sse is None:
            body = self.formatter.full("".join(self.pieces), finished.reason, usage)
            incomplete = body["choices"][0].get("incomplete_details")
            if incomplete is not None:
                facts["incomplete"] = incomplete["reason"]
            return web.json_response(body, headers=provenance(self.model))
        final = self.formatter.final_chunk(finished.reason, "".join(self.pieces))
        incomplete = final["choices"][0].get("incomplete_details")
        if incomplete is not None:
            facts["incomplete"] = incomplete["reason"]
        tail = self._pending + sse_event(final)
        if self.include_usage:
            tail += sse_event(self.formatter.usage_chunk(usage))
        await sse.send_encoded(tail)
        return await sse.finish()

    async def _open(self, sse: SseStream) -> None:
        await sse.open(provenance(self.model))
        self._encoder = self.formatter.delta_encoder()
        first = self.formatter.first_chunk()
        # Sent together with the first text: headers, role chunk and token in one write.
        self._pending = sse_event(first) if first is not None else b""

    async def _on_text(self, texts: list[str], sse: SseStream | None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if sse is None:
            self.pieces.extend(texts)
            return
        pending, self._pending = self._pending, b""
        if self.formatter.shape.constraint is not None:
            self.pieces.extend(texts)  # the last chunk says whether the whole of it parses
        if self.formatter.shape.reads_tools:
            # Tool calls go out as call deltas, not text: each piece is read first.
            chunks = [c for t in texts for c in self.formatter.text_chunks(t)]
            await sse.send_encoded(pending + b"".join(sse_event(c) for c in chunks))
        else:
            encode = self._encoder.encode
            await sse.send_encoded(pending + b"".join(encode(t) for t in texts))

    def _prepared_or_closed(self) -> web.StreamResponse:
        response = self.request.get(PREPARED_RESPONSE)
        return response if response is not None else web.Response(status=204)

    def _observe(self, finished: Finished, usage: Usage) -> None:
        facts = self.request[LOG_FACTS]
        model_id = self.model.model_id
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.request[STARTED]
            self.ctx.metrics.time_to_first_token.labels(model_id).observe(ttft)
            facts["ttft_ms"] = round(ttft * 1000, 2)
        if finished.tokens_per_s is not None:
            facts["tokens_per_s"] = round(finished.tokens_per_s, 1)
        facts.update(completion_tokens=usage.completion_tokens, finish_reason=finished.reason)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
