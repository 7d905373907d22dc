"""llama.cpp (llama-cpp-python) behind the :class:`~edgelm_agent.inference.embedding_backend.
EmbeddingBackend` port.

We drive the batch ourselves rather than call ``Llama.embed``, which takes text and silently
truncates an input longer than its batch: here the caller has the tokens already (it checked
their count against the limit and answered 400 if over), and token arrays from a client need
no detokenizing round trip. The batching is the same as ``Llama.embed``'s: several inputs, each
its own sequence, in one decode, then one pooled vector read back per sequence.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import structlog

from edgelm_agent.errors import BackendError, ModelLoadError
from edgelm_agent.inference.embedding_backend import EmbeddingInfo
from edgelm_agent.inference.llama_backend import _forward_runtime_log, trained_context_length

log = structlog.get_logger(__name__)

#: llama.cpp's ``enum llama_pooling_type``: the ones that give one vector per input.
POOLING_NAMES = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}
#: And the ones that do not: a vector per token, or a reranker's score.
UNSUPPORTED_POOLING = {
    llama_cpp.LLAMA_POOLING_TYPE_NONE: "none (one vector per token, as a generation model has)",
    llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank (a reranker's score, not a vector)",
}


class LlamaEmbeddingBackend:
    def __init__(self, llm: Any, info: EmbeddingInfo) -> None:
        self._llm = llm
        self._info = info

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        model_id: str,
        threads: int,
        context_length: int,
        gpu_layers: int | None = None,
    ) -> LlamaEmbeddingBackend:
        llama_cpp.llama_log_set(_forward_runtime_log, ctypes.c_void_p(0))
        n_ctx = min(context_length, trained_context_length(path) or context_length)
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers is None:
            gpu_layers = -1 if offload else 0
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                embedding=True,
                n_ctx=n_ctx,
                # An encoder attends over a whole input in one micro-batch, so both batch
                # sizes are the context: any input that fits the context fits a batch.
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc}") from exc
        pooling = int(llm.pooling_type())
        if pooling not in POOLING_NAMES:
            llm.close()
            what = UNSUPPORTED_POOLING.get(pooling, str(pooling))
            raise ModelLoadError(
                f"{path} cannot serve embeddings: its pooling type is {what}; an embedding "
                "model's GGUF declares mean, cls or last pooling ({arch}.pooling_type)"
            )
        info = EmbeddingInfo(
            model_id=model_id,
            path=str(path),
            dimensions=int(llm.n_embd()),
            max_input_tokens=n_ctx,
            vocab_size=int(llm.n_vocab()),
            pooling=POOLING_NAMES[pooling],
            created=int(time.time()),
        )
        return cls(llm, info)

    @property
    def info(self) -> EmbeddingInfo:
        return self._info

    @property
    def max_batch_tokens(self) -> int:
        return int(self._llm.n_batch)

    @property
    def max_batch_inputs(self) -> int:
        return int(self._llm.context_params.n_seq_max)

    def tokenize(self, text: str) -> list[int]:
        # add_bos asks llama.cpp for the model's own markers ([CLS] ... [SEP] for BERT);
        # special=False keeps "[SEP]" written in the text as text.
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        llm = self._llm
        batch = llm._batch
        dimensions = self._info.dimensions
        batch.reset()
        try:
            for seq, tokens in enumerate(inputs):
                batch.add_sequence(list(tokens), seq, True)
            llm._ctx.kv_cache_clear()  # a causal model's cache must hold only this batch
            llm._ctx.decode(batch)
            vectors = []
            for seq in range(len(inputs)):
                pointer = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq)
                if not pointer:
                    raise BackendError(f"llama.cpp returned no vector for input {seq}")
                vectors.append([float(v) for v in pointer[:dimensions]])
            return vectors
        except RuntimeError as exc:  # llama_decode's failure
            raise BackendError(f"llama.cpp failed to embed: {exc}") from exc
        finally:
            batch.reset()
            llm._ctx.kv_cache_clear()

    def close(self) -> None:
        self._llm.close()
