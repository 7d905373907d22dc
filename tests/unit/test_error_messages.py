"""Error messages say what was expected and what came, truthfully and briefly."""

from __future__ import annotations

import pytest

from edgelm_agent.errors import ContextOverflow, ModelNotFound, shown
from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.inference.types import SamplingFields
from edgelm_agent.serving import ServingModel
from tests.fake_backend import FakeBackend


@pytest.fixture
def model() -> ServingModel:
    """A served model with a context of 64 tokens (the fake backend's)."""
    backend = FakeBackend()
    return ServingModel(
        backend, Scheduler(backend, max_queue=1, retry_after_s=1), context_length=64
    )


class TestContextOverflow:
    def test_a_prompt_that_fills_the_context_does_not_blame_max_tokens(self, model):
        """With no max_tokens in the request, the message says the prompt leaves no room
        for a reply; it quotes no max_tokens the client never sent."""
        with pytest.raises(ContextOverflow) as info:
            model.sampling(SamplingFields(max_tokens=None), prompt_tokens=64)
        assert "max_tokens" not in str(info.value)
        assert "no room for a reply" in str(info.value)
        assert info.value.param is None

    def test_a_max_tokens_too_large_is_quoted(self, model):
        """A max_tokens the client sent is quoted with the sum it makes."""
        with pytest.raises(ContextOverflow) as info:
            model.sampling(SamplingFields(max_tokens=50), prompt_tokens=20)
        assert "max_tokens (50) = 70 exceeds the context length of 64" in str(info.value)
        assert info.value.param == "max_tokens"


class TestModelNotFound:
    def test_with_no_model_at_all_it_reads_as_a_sentence(self):
        """With nothing installed or offered, the message says so once, plainly."""
        message = str(ModelNotFound("m", [], what="installed or offered"))
        assert message == "model 'm' not found; no model is installed or offered"

    def test_the_models_there_are_are_listed(self):
        """With models, the message lists them."""
        message = str(ModelNotFound("m", ["a", "b"]))
        assert message == "model 'm' not found; loaded: a, b"

    def test_a_huge_model_name_is_cut_short(self):
        """A megabyte-long model name is quoted, not echoed whole."""
        assert len(str(ModelNotFound("x" * 1_000_000, []))) < 200


class TestShown:
    def test_short_values_are_their_repr(self):
        """A short value is quoted as repr shows it."""
        assert shown("abc") == "'abc'"
        assert shown(12) == "12"

    def test_long_values_are_cut(self):
        """A long string is cut to the limit, with an ellipsis."""
        assert len(shown("x" * 10_000)) == 40
        assert shown("x" * 10_000).endswith("…")

    def test_huge_integers_are_described_not_printed(self):
        """A 400-digit integer is described by its length."""
        assert shown(10**400) == "an integer of 401 digits"
