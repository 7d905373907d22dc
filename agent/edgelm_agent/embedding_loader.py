"""Bring up the model named by ``embedding_model``, beside the chat model, at start-up.

Until an agent keeps several models in memory under one RAM budget, this is how it serves
embeddings: one model of role ``embedding``, loaded once at start (a changed setting takes a
restart). The steps are the chat model's: the setting names an installed model
(``name[@version]``) or a GGUF file, which is signed into the local repository as an embedding
model first; the model is pinned (so ``gc`` never removes the blob under it), re-hashed
against its signed target, loaded, and checked with one embedding of its health-check prompt.

A failure never stops the agent: the chat model keeps serving, the failure is logged
(``embedding_model_failed``), and ``/v1/embeddings`` answers 503 with the reason until the
operator fixes the setting and restarts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from edgelm_agent.config import AgentConfig
from edgelm_agent.embedding_model import EmbeddingModel
from edgelm_agent.errors import EdgelmError, ModelLoadError
from edgelm_agent.inference.embedding_backend import load_embedding_backend
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.model_target import EMBEDDING, ModelTarget
from edgelm_agent.serving import ModelHost

log = structlog.get_logger(__name__)

#: At shutdown, how long an embedding batch still running gets to finish.
EMBEDDING_STOP_WAIT_S = 10.0


def names_a_file(spec: str) -> bool:
    """A path has a slash or ends in ``.gguf``; a model reference has neither (names are
    ``[a-z0-9._-]``, so ``tiny.gguf`` could only be a file)."""
    return "/" in spec or spec.endswith(".gguf")


class EmbeddingLoader:
    def __init__(self, config: AgentConfig, manager: ModelManager, host: ModelHost) -> None:
        self.config = config
        self.manager = manager
        self.slot = host.embeddings
        self.slot.configured = config.embedding_model
        # Loading from the start, not from start(): /readyz must not say ready in between,
        # once the chat model is up but before this one has begun.
        self.slot.loading = config.embedding_model is not None

    async def start(self) -> None:
        """Load the configured model, or record why it could not be (never raises for a
        model that fails: the agent serves its chat model all the same)."""
        spec = self.config.embedding_model
        if spec is None:
            return
        try:
            model = await self._load(spec)
        except EdgelmError as exc:
            self.slot.problem = str(exc)
            log.error("embedding_model_failed", setting=spec, error=str(exc))
            return
        finally:
            self.slot.loading = False
        self.slot.model = model
        info = model.info
        log.info(
            "embedding_model_loaded",
            model=f"{model.model_id}@{model.version}",
            dimensions=info.dimensions,
            max_input_tokens=info.max_input_tokens,
            pooling=info.pooling,
        )

    async def _target(self, spec: str) -> ModelTarget:
        registry = self.manager.registry
        if names_a_file(spec):
            log.info("model_importing", path=spec)
            return await self.manager.exclusive_work(
                lambda cancel: registry.import_model(
                    Path(spec).expanduser(),
                    context_length=self.config.context_length,
                    cancel=cancel,
                    role=EMBEDDING,
                ),
                what="import",
            )
        return await self.manager.exclusive(registry.find, spec)

    async def _load(self, spec: str) -> EmbeddingModel:
        registry = self.manager.registry
        target = await self._target(spec)
        if target.role != EMBEDDING:
            raise ModelLoadError(
                f"embedding_model {spec!r} is {target.ref}, a {target.role} model; name one "
                "imported with `edgelm models import FILE --role embedding` (or pushed with "
                "--role embedding)"
            )
        await self.manager.exclusive(registry.pin, target.ref)  # gc keeps what is loaded
        path, signers = await self.manager.exclusive_work(
            lambda cancel: (
                registry.verified_path(target, cancel=cancel),
                registry.targets_signers(),
            ),
            what="verify",
        )
        log.info("model_loading", model=target.ref, format=target.format)
        backend = await asyncio.to_thread(
            load_embedding_backend,
            path,
            threads=self.config.effective_threads(),
            context_length=min(self.config.context_length, target.context_length),
            model_id=target.name,
            gpu_layers=self.config.gpu_layers,
        )
        model = EmbeddingModel(
            backend,
            max_queue=self.config.max_queue,
            retry_after_s=self.config.retry_after_s,
            version=target.version,
            digest=target.sha256,
            signers=signers,
        )
        try:
            await model.check(target.health_check.prompt)
        except BaseException:
            await model.close(EMBEDDING_STOP_WAIT_S)
            raise
        return model

    async def close(self, wait_s: float = EMBEDDING_STOP_WAIT_S) -> None:
        model, self.slot.model = self.slot.model, None
        if model is not None and not await model.close(wait_s):
            log.error("embedding_thread_stuck", timeout_s=wait_s)
