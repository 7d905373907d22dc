"""The embedding model being served: a backend, its worker thread and its wait queue.

An agent serves embeddings from one model, named by the ``embedding_model`` setting and loaded
beside the chat model (see :mod:`edgelm_agent.embedding_loader`). It has a worker thread of its
own, so a batch of embeddings never waits behind a long generation, nor the other way round;
requests take turns on it first come, first served, and at most ``max_queue`` wait (one more
is a 429), as on the chat model.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from edgelm_agent.errors import ModelLoadError
from edgelm_agent.generation.embeddings import (
    NonFiniteVector,
    check_finite,
    check_tokens,
    is_finite,
    normalized,
    plan_batches,
)
from edgelm_agent.inference.embedding_backend import EmbeddingBackend, EmbeddingInfo
from edgelm_agent.inference.scheduler import FifoAdmission
from edgelm_agent.worker_thread import WorkerThread

T = TypeVar("T")


@dataclass(frozen=True)
class Embedded:
    """Unit-length vectors in input order, and the tokens they took."""

    vectors: list[list[float]]
    prompt_tokens: int


class EmbeddingModel:
    def __init__(
        self,
        backend: EmbeddingBackend,
        *,
        max_queue: int,
        retry_after_s: int,
        version: str = "",
        digest: str = "",
        signers: tuple[str, ...] = (),
    ) -> None:
        self.backend = backend
        self.version = version
        #: Provenance, as a chat model's: the signed target's sha256 and its signers' keyids.
        self.digest = digest
        self.signers = signers
        self._thread = WorkerThread("edgelm-embeddings")
        self._admission = FifoAdmission(max_queue, retry_after_s)

    @property
    def info(self) -> EmbeddingInfo:
        return self.backend.info

    @property
    def model_id(self) -> str:
        return self.backend.info.model_id

    @property
    def names(self) -> tuple[str, ...]:
        """Its name, or ``name@version`` to insist on the version."""
        if not self.version:
            return (self.model_id,)
        return (self.model_id, f"{self.model_id}@{self.version}")

    @property
    def waiting(self) -> int:
        return self._admission.waiting

    async def embed(
        self, texts: Sequence[str], token_inputs: Sequence[Sequence[int]] = ()
    ) -> Embedded:
        """Embed texts (tokenized here) or token arrays; raises the request's error (an input
        too long, a token id out of the vocabulary) before anything is embedded."""
        await self._admission.acquire()
        try:
            if texts:
                tokens = await self._in_thread(lambda: [self.backend.tokenize(t) for t in texts])
            else:
                tokens = [list(t) for t in token_inputs]
            info = self.info
            check_tokens(
                tokens,
                limit_tokens=info.max_input_tokens,
                vocab_size=info.vocab_size,
                model=self.model_id,
            )
            vectors: list[list[float]] = []
            for batch in plan_batches(
                [len(t) for t in tokens],
                max_tokens=self.backend.max_batch_tokens,
                max_inputs=self.backend.max_batch_inputs,
            ):
                chunk = [tokens[i] for i in batch]
                # A client that leaves stops its request here, between batches.
                embedded = await self._in_thread(functools.partial(self.backend.embed, chunk))
                if len(chunk) > 1 and not all(is_finite(v) for v in embedded):
                    # One input's NaN spreads to the others of its batch (attention weighs it
                    # by zero, which keeps a NaN): each is embedded alone, so that the error
                    # names only the inputs that are broken themselves.
                    embedded = [
                        (await self._in_thread(functools.partial(self.backend.embed, [one])))[0]
                        for one in chunk
                    ]
                vectors += embedded
        finally:
            self._admission.release()
        check_finite(vectors, model=self.model_id)
        return Embedded([normalized(v) for v in vectors], sum(len(t) for t in tokens))

    async def check(self, text: str) -> None:
        """The start-up check: one input gives one vector of the model's length, finite and
        not zero. A file that loads but cannot embed is refused before it serves anyone."""
        try:
            embedded = await self.embed([text])
        except NonFiniteVector as exc:
            raise ModelLoadError(f"{self.model_id} returned a non-finite vector") from exc
        vector = embedded.vectors[0] if len(embedded.vectors) == 1 else []
        if len(vector) != self.info.dimensions:
            raise ModelLoadError(
                f"{self.model_id} returned {len(embedded.vectors)} vectors of "
                f"{len(vector)} values for one input; expected one of {self.info.dimensions}"
            )
        if not any(vector):
            raise ModelLoadError(f"{self.model_id} returned a zero vector")

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._thread.submit(fn))

    async def close(self, wait_s: float) -> bool:
        """Let the work already running finish (for up to ``wait_s``), then free the model;
        whether it was freed. A runtime stuck for good is left to the process's exit rather
        than freed under its own feet."""
        stopped = await asyncio.to_thread(self._thread.shutdown, wait_s)
        if stopped:
            self.backend.close()
        return stopped


@dataclass
class EmbeddingSlot:
    """Where the embedding model is, or why there is none: what ``/v1/embeddings`` says."""

    #: The ``embedding_model`` setting; ``None`` when the agent serves no embeddings.
    configured: str | None = None
    model: EmbeddingModel | None = None
    #: Why the configured model is not served (it failed to load); ``None`` otherwise.
    problem: str | None = None
    loading: bool = False
