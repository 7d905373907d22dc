"""``POST /v1/embeddings``, OpenAI-compatible, served by the agent's embedding model.

The checks and the response shape are in :mod:`edgelm_agent.generation.embeddings`; the model,
its thread and its queue in :mod:`edgelm_agent.embedding_model`. This module picks the model
a request names and says precisely why when it cannot: a chat model named here is a 400 that
says so, as is the embedding model named on a chat route (see ``ModelHost.find``).
"""

from __future__ import annotations

from aiohttp import web

from edgelm_agent.api.context import API_CONTEXT, LOG_FACTS
from edgelm_agent.api.openai_routes import DIGEST_HEADER, MODEL_HEADER, SIGNER_HEADER, read_json
from edgelm_agent.embedding_model import EmbeddingModel
from edgelm_agent.errors import ModelLoadError, ModelNotFound, NotReady, WrongModelRole, shown
from edgelm_agent.generation.embeddings import (
    check_dimensions,
    embeddings_response,
    parse_embeddings,
)
from edgelm_agent.serving import ModelHost


def resolve_embedding_model(host: ModelHost, requested: str) -> EmbeddingModel:
    """The embedding model ``requested`` names, or the error that says why there is none."""
    if host.draining:
        raise NotReady("the agent is shutting down", retry_after_s=5)
    slot = host.embeddings
    model = slot.model
    if model is not None and requested in model.names:
        return model
    if any(requested in m.names for m in host.models()):
        if model is not None:
            hint = f"; the embedding model here is {model.model_id!r}"
        elif slot.configured is None:
            hint = "; this agent serves no embedding model (set embedding_model)"
        else:
            hint = f"; the embedding model {slot.configured!r} is not loaded"
        raise WrongModelRole(requested, "generation", hint=hint)
    if slot.loading or (host.starting and slot.configured is not None and model is None):
        raise NotReady("the embedding model is still loading", retry_after_s=5)
    if slot.problem is not None:
        raise ModelLoadError(
            f"embedding_model {shown(slot.configured)} failed to load: {slot.problem}; fix the "
            "setting and restart the agent"
        )
    raise ModelNotFound(
        requested, list(model.names[:1]) if model else [], what="serving embeddings"
    )


def provenance(model: EmbeddingModel) -> dict[str, str]:
    """The same provenance headers a generation carries: which model, which signed bytes."""
    headers = {
        MODEL_HEADER: f"{model.model_id}@{model.version}" if model.version else model.model_id
    }
    if model.digest:
        headers[DIGEST_HEADER] = "sha256:" + model.digest
    if model.signers:
        headers[SIGNER_HEADER] = ",".join(model.signers)
    return headers


async def create_embeddings(request: web.Request) -> web.Response:
    ctx = request.app[API_CONTEXT]
    body = parse_embeddings(await read_json(request))
    model = resolve_embedding_model(ctx.host, body.model)
    check_dimensions(body.dimensions, model.model_id, model.info.dimensions)
    facts = request[LOG_FACTS]
    facts.update(model=model.model_id, model_digest=model.digest or None, inputs=body.count)
    embedded = await model.embed(body.texts, body.token_inputs)
    facts["prompt_tokens"] = embedded.prompt_tokens
    ctx.metrics.prompt_tokens.labels(model.model_id).inc(embedded.prompt_tokens)
    response = embeddings_response(
        model.model_id, embedded.vectors, body.encoding_format, embedded.prompt_tokens
    )
    return web.json_response(response, headers=provenance(model))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", create_embeddings)
