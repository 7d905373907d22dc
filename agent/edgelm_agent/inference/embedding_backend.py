"""The port an embedding runtime implements, and the loader that picks one.

Embeddings come from llama.cpp only: a GGUF model run in embedding mode with the pooling its
file declares (mean for BERT-style sentence encoders, last token for Qwen3-Embedding, CLS for
some others), so one vector comes back per input. Like a generation backend, an embedding
backend is synchronous and used by one thread at a time (see
:class:`~edgelm_agent.embedding_service.EmbeddingModel`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgelm_agent.errors import ModelLoadError
from edgelm_agent.inference.loader import detect_format, model_id_for


@dataclass(frozen=True)
class EmbeddingInfo:
    model_id: str
    path: str
    #: Length of every vector the model returns (its ``n_embd``).
    dimensions: int
    #: The most tokens one input may have: the context the model is served with, which
    #: holds one whole input (an encoder attends over all of it at once).
    max_input_tokens: int
    #: Token ids run from 0 to this, exclusive; a client's token array must stay below it.
    vocab_size: int
    #: How token vectors become one vector: ``mean``, ``cls`` or ``last``.
    pooling: str
    created: int


class EmbeddingBackend(Protocol):
    """One loaded embedding model."""

    @property
    def info(self) -> EmbeddingInfo: ...

    @property
    def max_batch_tokens(self) -> int:
        """Tokens one call of :meth:`embed` may take, all inputs together."""
        ...

    @property
    def max_batch_inputs(self) -> int:
        """Inputs one call of :meth:`embed` may take."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """The tokens the model embeds for ``text``, with the markers it wraps every input in
        (``[CLS]`` and ``[SEP]`` for BERT). Text that spells a special token stays text."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One pooled vector per input, in order, as the model returns it (not normalized)."""
        ...

    def close(self) -> None:
        """Free the model. The backend is unusable afterwards."""
        ...


def load_embedding_backend(
    path: Path,
    *,
    threads: int,
    context_length: int,
    model_id: str | None = None,
    gpu_layers: int | None = None,
) -> EmbeddingBackend:
    """Load the GGUF file at ``path`` for embeddings. Blocking: call it from a thread."""
    path = path.resolve()
    if detect_format(path) != "gguf":
        raise ModelLoadError(
            f"{path} is an ONNX folder; embeddings are served by llama.cpp from a GGUF file"
        )
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelLoadError(
            "serving embeddings needs llama-cpp-python: pip install 'edgelm[llama]'"
        )
    from edgelm_agent.inference.llama_embedding import LlamaEmbeddingBackend

    return LlamaEmbeddingBackend.load(
        path,
        model_id=model_id or model_id_for(path),
        threads=threads,
        context_length=context_length,
        gpu_layers=gpu_layers,
    )
