"""llama.cpp (llama-cpp-python) behind the :class:`~edgelm_agent.inference.backend.Backend` port.

We drive ``Llama.generate`` directly rather than ``create_completion``: the latter re-decodes
the whole completion after every token (quadratic in its length) and implements stop strings and
OpenAI shapes that we do once, for both runtimes, above the port.
"""

from __future__ import annotations

import codecs
import ctypes
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import structlog
from llama_cpp.llama_grammar import LlamaGrammar

from edgelm_agent.errors import InvalidRequest, ModelLoadError
from edgelm_agent.inference.grammar_text import GrammarTextDecoder
from edgelm_agent.inference.special_text import plain_tokens, special_pattern
from edgelm_agent.inference.types import Acceleration, ModelInfo, OutputConstraint, SamplingParams

log = structlog.get_logger(__name__)

# ggml's enum ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 vendors
# (NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5); llama-cpp-python's own table is older.
GGML_LOG_WARN, GGML_LOG_ERROR = 3, 4


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]  # ctypes callback factory
def _forward_runtime_log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp logs through this C callback; warnings and errors join the agent's own log
    as structured events instead of raw text on stderr, which would break JSON log lines."""
    if level in (GGML_LOG_WARN, GGML_LOG_ERROR):
        message = text.decode("utf-8", errors="replace").strip()
        if message:
            emit = log.error if level == GGML_LOG_ERROR else log.warning
            emit("llama_cpp_log", message=message)


# llama.cpp treats this seed as "pick a random one"; client seeds are folded below it.
LLAMA_RANDOM_SEED = 0xFFFFFFFF

# llama-cpp-python does not wrap llama_set_abort_callback; the library exports it.
_set_abort_callback = llama_cpp.llama_cpp._lib.llama_set_abort_callback
_set_abort_callback.argtypes = [
    llama_cpp.llama_context_p_ctypes,
    llama_cpp.ggml_abort_callback,
    ctypes.c_void_p,
]
_set_abort_callback.restype = None
_NO_ABORT = llama_cpp.ggml_abort_callback()  # a NULL function pointer


def _meta(model: Any, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer)) < 0:
        return None
    return buffer.value.decode("utf-8", errors="replace")


def trained_context_length(path: Path) -> int | None:
    """Read ``{arch}.context_length`` from a vocab-only load: no weights are read.

    (``llama_model_n_ctx_train`` answers 0 on a vocab-only model, so we ask the metadata.)
    """
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}: not a valid GGUF model")
    try:
        arch = _meta(model, "general.architecture")
        value = _meta(model, f"{arch}.context_length") if arch else None
        return int(value) if value and value.isdigit() else None
    finally:
        llama_cpp.llama_model_free(model)


# The request field a refused constraint came from.
_CONSTRAINT_PARAMS = {"grammar": "grammar", "tool_calls": "tools"}

# llama-cpp-python's own default, so sampling matches create_completion and llama_cpp.server.
DEFAULT_MIN_P = 0.05


class _PieceDecoder:
    """Token ids to bytes with one reusable buffer (the runtime's own helper allocates per call)."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._size = 64
        self._buffer = ctypes.create_string_buffer(self._size)

    def piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buffer, self._size, 0, special)
        if n < 0:  # buffer too small; -n is the size needed
            self._size = -n
            self._buffer = ctypes.create_string_buffer(self._size)
            n = llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buffer, self._size, 0, special
            )
        return self._buffer.raw[:n]


class LlamaCppBackend:
    def __init__(self, llm: Any, info: ModelInfo) -> None:
        self._llm = llm
        self._info = info
        self._vocab = llm._model.vocab
        self._pieces = _PieceDecoder(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._specials = special_pattern(info.special_texts)
        self._random = random.Random()
        self._cancel = threading.Event()
        # Called by ggml between graph nodes; kept referenced so ctypes does not free it.
        self._abort = llama_cpp.ggml_abort_callback(lambda _: self._cancel.is_set())

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        model_id: str,
        threads: int,
        context_length: int,
        gpu_layers: int | None = None,
    ) -> LlamaCppBackend:
        llama_cpp.llama_log_set(_forward_runtime_log, ctypes.c_void_p(0))
        # Size the KV cache for what the model was trained on, never more than configured.
        n_ctx = min(context_length, trained_context_length(path) or context_length)
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers is None:  # the default: the GPU when this build has one, else the CPU
            gpu_layers = -1 if offload else 0
        elif gpu_layers and not offload:
            log.warning("gpu_offload_unavailable", model=model_id, gpu_layers=gpu_layers)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {path}: {exc}") from exc
        metadata: dict[str, str] = dict(llm.metadata)
        bos, eos = llm.token_bos(), llm.token_eos()
        info = ModelInfo(
            model_id=model_id,
            path=str(path),
            format="gguf",
            backend="llama.cpp",
            context_length=n_ctx,
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=cls._special_text(llm, bos),
            eos_token=cls._special_text(llm, eos),
            created=int(time.time()),
            special_texts=cls._special_texts(llm),
            accelerator=Acceleration(gpu_offload=offload, gpu_layers=gpu_layers),
        )
        return cls(llm, info)

    @classmethod
    def _special_texts(cls, llm: Any) -> frozenset[str]:
        """The texts llama.cpp's tokenizer matches as whole tokens: its cache of special tokens
        holds control, user-defined and unknown tokens. (One pass over the vocabulary, at load.)"""
        vocab = llm._model.vocab
        matched = (
            llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        return frozenset(
            text
            for token in range(llama_cpp.llama_vocab_n_tokens(vocab))
            if llama_cpp.llama_vocab_get_attr(vocab, token) & matched
            and (text := cls._special_text(llm, token))
        )

    @staticmethod
    def _special_text(llm: Any, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llm.detokenize([token], special=True)).decode("utf-8", errors="replace")

    @property
    def info(self) -> ModelInfo:
        return self._info

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        bos_text = self._info.bos_token
        # A template that writes the BOS text itself must not get a second BOS.
        bos_written = special and bool(bos_text) and text.startswith(bos_text)
        add_bos = add_bos and self._add_bos and not bos_written
        if special:
            return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
        # special=False stops llama.cpp reading control tokens but not user-defined ones, so
        # the text is also cut inside every special text (see special_text.py).
        tokens = [self._llm.token_bos()] if add_bos else []
        return tokens + plain_tokens(text, self._specials, self._plain)

    def _plain(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def check_constraint(self, constraint: OutputConstraint) -> None:
        # llama-cpp-python hands a grammar that does not parse to the sampler chain as a NULL
        # sampler, which crashes; parsing it here first turns that into a 400.
        sampler = llama_cpp.llama_sampler_init_grammar(
            self._vocab, constraint.gbnf.encode("utf-8"), b"root"
        )
        if not sampler:
            raise InvalidRequest(
                f"{constraint.description} is not a grammar llama.cpp can use: it does not "
                "parse, refers to an undefined rule, or a rule recurses on its left",
                param=_CONSTRAINT_PARAMS.get(constraint.kind, "response_format"),
            )
        llama_cpp.llama_sampler_free(sampler)

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        llm = self._llm
        seed = params.seed if params.seed is not None else self._random.getrandbits(32)
        llm.set_seed(seed % LLAMA_RANDOM_SEED)
        # Under a grammar the text must be what the grammar matched: llama.cpp reads each
        # token as its special text (a control token such as <s> is the three characters
        # "<s>" to it) and decodes bytes its own lenient way (see grammar_text.py).
        constrained = params.constraint is not None
        decoder: GrammarTextDecoder | codecs.IncrementalDecoder = (
            GrammarTextDecoder()
            if constrained
            else codecs.getincrementaldecoder("utf-8")(errors="replace")
        )
        is_eog = llama_cpp.llama_vocab_is_eog
        vocab = self._vocab
        piece = self._pieces.piece
        tokens = llm.generate(
            list(prompt),
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=DEFAULT_MIN_P,
            temp=params.temperature,
            repeat_penalty=1.0,
            # The grammar masks every token that would leave it, before top-k and the rest
            # pick among what is left (llama-cpp-python puts it first in the chain).
            grammar=(
                LlamaGrammar.from_string(params.constraint.gbnf, verbose=False)
                if params.constraint is not None
                else None
            ),
        )
        # A long prompt is evaluated inside one call, so a cancel must reach into it: the abort
        # callback is on while the prompt is processed. It is a Python call per graph node, too
        # costly per generated token, so it is off again from the first token on, where the
        # loop below checks the flag between tokens.
        self._cancel = cancel
        self._set_abort(True)
        try:
            first = next(tokens, None)
        except RuntimeError:
            if cancel.is_set():  # llama_decode reports the abort as an error
                self._forget_context()
                return
            raise
        finally:
            self._set_abort(False)
        # Bytes of a character still incomplete when generation ends are dropped, as
        # llama-cpp-python itself does: they cannot become valid text.
        token = first
        while token is not None:
            if cancel.is_set() or is_eog(vocab, token):
                return
            yield decoder.decode(piece(token, constrained))
            token = next(tokens, None)

    def _forget_context(self) -> None:
        """An aborted decode leaves the KV cache half-written: start the next run clean."""
        self._llm._ctx.kv_cache_clear()
        self._llm.reset()

    def _set_abort(self, on: bool) -> None:
        _set_abort_callback(self._llm._ctx.ctx, self._abort if on else _NO_ABORT, None)

    def close(self) -> None:
        self._llm.close()
