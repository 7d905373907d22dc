"""An in-memory backend implementing the Backend port, for scheduler and runner unit tests.

It yields scripted pieces, optionally waiting on a gate between tokens so a test can hold a
generation "running" for as long as it needs, without timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.inference.types import ModelInfo, OutputConstraint, SamplingParams


class FakeBackend:
    def __init__(
        self,
        pieces: Sequence[str] = ("a", "b", "c"),
        *,
        gated: bool = False,
        fail_after: int | None = None,
    ) -> None:
        self.pieces = list(pieces)
        self.gate = threading.Semaphore(0) if gated else None
        self.fail_after = fail_after
        self.started = threading.Event()
        self.running = 0
        self.max_running = 0
        self.runs: list[tuple[int, ...]] = []
        self._lock = threading.Lock()
        self._info = ModelInfo(
            model_id="fake",
            path="/dev/null",
            format="gguf",
            backend="fake",
            context_length=64,
            chat_template=None,
            bos_token="",
            eos_token="",
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def check_constraint(self, constraint: OutputConstraint) -> None:
        raise InvalidRequest(f"the fake backend cannot hold a reply to {constraint.description}")

    def release(self, tokens: int = 1) -> None:
        assert self.gate is not None
        for _ in range(tokens):
            self.gate.release()

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.runs.append(tuple(prompt))
        self.started.set()
        try:
            for i, piece in enumerate(self.pieces):
                if self.gate is not None:
                    while not self.gate.acquire(timeout=0.01):
                        if cancel.is_set():
                            return
                if cancel.is_set():
                    return
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("runtime exploded")
                yield piece
        finally:
            with self._lock:
                self.running -= 1

    def close(self) -> None:
        pass
