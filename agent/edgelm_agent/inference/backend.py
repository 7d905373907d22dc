"""The port every inference runtime implements, and the loop that drives one generation.

A backend is synchronous and single-threaded by contract: the scheduler calls it from one worker
thread at a time. That keeps the runtimes' own threading (llama.cpp's and onnxruntime's thread
pools) out of the event loop, and lets the loop hand tokens to clients as soon as they exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from edgelm_agent.inference.stop_sequences import StopMatcher
from edgelm_agent.inference.types import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    OutputConstraint,
    SamplingParams,
    TextDelta,
)


class Backend(Protocol):
    """One loaded model."""

    @property
    def info(self) -> ModelInfo: ...

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Tokenize text; with ``add_bos``, a leading BOS where the model expects one.

        ``special`` reads the text of special tokens (``<|im_start|>``) as those tokens, as a
        prompt or a chat template needs; without it, such text stays plain text, as a client's
        message needs.
        """
        ...

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Raise :class:`~edgelm_agent.errors.InvalidRequest` if this runtime cannot hold its
        output to ``constraint`` (``params.constraint`` of a later :meth:`generate`), so the
        client hears so before anything runs rather than get output that breaks it."""
        ...

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        """Yield the text of each new token, in order, until end of sequence.

        A token that ends inside a multi-byte UTF-8 character yields ``""`` and its bytes are
        carried into the next token's text, so every yielded string is valid UTF-8. The caller
        stops early by closing the iterator; a backend also stops when ``cancel`` is set.
        """
        ...

    def close(self) -> None:
        """Free the model. The backend is unusable afterwards."""
        ...


def run_generation(
    backend: Backend,
    request: GenerationRequest,
    cancel: threading.Event,
    emit: Callable[[GenerationEvent], None],
    clock: Callable[[], float] = time.perf_counter,
) -> Finished:
    """Drive one generation to its end, emitting a :class:`TextDelta` per token that has text.

    Runs in the worker thread. Applies ``max_tokens`` and stop strings, which are the same for
    every runtime, so backends only produce tokens.
    """
    params = request.params
    matcher = StopMatcher(params.stop)
    started = clock()
    first_token_at: float | None = None
    produced = 0
    reason: FinishReason = "stop"
    if cancel.is_set():  # the client left while the run was being handed to this thread
        finished = Finished(reason="cancelled", completion_tokens=0, prefill_s=0.0, decode_s=0.0)
        emit(finished)
        return finished
    tokens = backend.generate(request.prompt_tokens, params, cancel)
    try:
        for fragment in tokens:
            produced += 1
            if first_token_at is None:
                first_token_at = clock()
            text = matcher.feed(fragment)
            if text:
                emit(TextDelta(text, 1))
            if matcher.stopped:
                break
            if cancel.is_set():
                reason = "cancelled"
                break
            if produced >= params.max_tokens:
                reason = "length"
                break
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    if reason == "stop" and not matcher.stopped and cancel.is_set():
        reason = "cancelled"  # the backend saw the flag and ended its iterator early
    tail = matcher.flush()
    if tail:
        emit(TextDelta(tail, 0))
    ended = clock()
    finished = Finished(
        reason=reason,
        completion_tokens=produced,
        prefill_s=(first_token_at or ended) - started,
        decode_s=ended - first_token_at if first_token_at is not None else 0.0,
    )
    emit(finished)
    return finished
