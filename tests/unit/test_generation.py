"""run_generation: max_tokens, stop strings and cancellation, for every backend alike."""

from __future__ import annotations

import threading

from edgelm_agent.inference.backend import run_generation
from edgelm_agent.inference.types import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from tests.fake_backend import FakeBackend


def collect(
    backend: FakeBackend, params: SamplingParams, cancel: threading.Event | None = None
) -> tuple[str, Finished]:
    events: list[GenerationEvent] = []
    finished = run_generation(
        backend, GenerationRequest((1,), params), cancel or threading.Event(), events.append
    )
    assert events[-1] == finished
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    return text, finished


class TestRunGeneration:
    def test_end_of_sequence_is_stop(self):
        """A backend that runs out of tokens finishes with reason 'stop'."""
        text, finished = collect(
            FakeBackend(["a", "b"]), SamplingParams(max_tokens=10, temperature=0)
        )
        assert (text, finished.reason, finished.completion_tokens) == ("ab", "stop", 2)

    def test_max_tokens_is_length(self):
        """Reaching max_tokens finishes with reason 'length' and exactly that many tokens."""
        text, finished = collect(
            FakeBackend(list("abcdef")), SamplingParams(max_tokens=3, temperature=0)
        )
        assert (text, finished.reason, finished.completion_tokens) == ("abc", "length", 3)

    def test_stop_string_cuts_and_is_stop(self):
        """A stop string across tokens cuts the text before it; the reason is 'stop'."""
        text, finished = collect(
            FakeBackend(["he", "llo wo", "rld"]),
            SamplingParams(max_tokens=10, temperature=0, stop=("o w",)),
        )
        assert (text, finished.reason) == ("hell", "stop")

    def test_empty_pieces_count_as_tokens(self):
        """A token that completes no character yet still counts toward max_tokens."""
        text, finished = collect(
            FakeBackend(["", "é", ""]), SamplingParams(max_tokens=2, temperature=0)
        )
        assert (text, finished.completion_tokens, finished.reason) == ("é", 2, "length")

    def test_cancel_is_reported_as_cancelled(self):
        """A run whose cancel flag is set ends with reason 'cancelled'."""
        cancel = threading.Event()
        cancel.set()
        _, finished = collect(
            FakeBackend(list("abc")), SamplingParams(max_tokens=10, temperature=0), cancel
        )
        assert finished.reason == "cancelled"
        assert finished.completion_tokens < 3

    def test_tokens_per_second_needs_two_tokens(self):
        """Decode speed is undefined for fewer than two tokens."""
        assert Finished("stop", 1, 0.1, 0.0).tokens_per_s is None
        assert Finished("stop", 11, 0.1, 2.0).tokens_per_s == 5.0
