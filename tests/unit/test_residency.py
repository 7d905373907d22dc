"""The residency policy: which models to unload for a new one, under a RAM budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.inference.gguf_shape import read_shape
from edgelm_agent.residency import (
    RUNTIME_OVERHEAD_BYTES,
    UNKNOWN_SHAPE_FACTOR,
    InsufficientMemory,
    LoadNow,
    ModelShape,
    MustWait,
    Resident,
    estimate_bytes,
    expired,
    next_expiry,
    parse_keep_alive,
    plan_load,
    plan_trim,
)
from tests.agent_process import FIXTURES, TINY_GGUF

residents_st = st.lists(
    st.builds(
        Resident,
        ref=st.text("abcdefgh", min_size=1, max_size=3),
        size_bytes=st.integers(1, 100),
        last_used_s=st.floats(0, 1000),
        leases=st.integers(0, 2),
        pinned=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda r: r.ref,
)


class TestPlanLoad:
    @given(residents_st, st.integers(0, 400), st.integers(1, 150))
    def test_never_over_budget_never_a_busy_or_pinned_model(self, residents, budget, wanted):
        """Whatever it plans keeps the rest plus the new model within the budget, and never
        unloads a pinned model or one with a request in flight."""
        pinned = sum(r.size_bytes for r in residents if r.pinned)
        if pinned + wanted > budget:
            with pytest.raises(InsufficientMemory) as caught:
                plan_load(budget, residents, "new", wanted)
            assert (caught.value.needed_bytes, caught.value.budget_bytes) == (wanted, budget)
            return
        plan = plan_load(budget, residents, "new", wanted)
        if isinstance(plan, MustWait):
            assert plan.busy
            assert all(r.leases > 0 and not r.pinned for r in residents if r.ref in plan.busy)
            return
        by_ref = {r.ref: r for r in residents}
        assert all(by_ref[ref].evictable for ref in plan.unload)
        kept = sum(r.size_bytes for r in residents if r.ref not in plan.unload)
        assert kept + wanted <= budget

    @given(residents_st, st.integers(0, 400), st.integers(1, 150))
    def test_least_recently_used_first_and_no_more_than_needed(self, residents, budget, wanted):
        """Unloads go oldest first, and dropping the last one planned was necessary."""
        try:
            plan = plan_load(budget, residents, "new", wanted)
        except InsufficientMemory:
            return
        if not isinstance(plan, LoadNow) or not plan.unload:
            return
        by_ref = {r.ref: r for r in residents}
        times = [by_ref[ref].last_used_s for ref in plan.unload]
        assert times == sorted(times)
        idle = [r for r in residents if r.evictable and r.ref not in plan.unload]
        assert all(r.last_used_s >= times[-1] for r in idle)
        held = sum(r.size_bytes for r in residents if r.ref not in plan.unload[:-1])
        assert held + wanted > budget

    def test_refuses_with_the_figures_when_pinned_models_leave_no_room(self):
        """The error says what was needed, the budget, and which models stay."""
        active = Resident("chat@1", 60, 0.0, pinned=True)
        with pytest.raises(InsufficientMemory) as caught:
            plan_load(100, [active, Resident("old@1", 10, 1.0)], "big@1", 50)
        assert caught.value.loaded == {"chat@1": 60}
        assert "needs about 50 bytes" in str(caught.value)
        assert "the budget is 100 bytes" in str(caught.value)

    def test_waits_for_a_busy_model_rather_than_refusing(self):
        """When only a model serving a request stands in the way, the plan is to wait."""
        busy = Resident("other@1", 50, 0.0, leases=1)
        plan = plan_load(100, [Resident("chat@1", 40, 0.0, pinned=True), busy], "new@1", 50)
        assert plan == MustWait(("other@1",))

    def test_a_model_already_resident_is_not_counted_twice(self):
        """Planning for a model that is in memory needs no room."""
        me = Resident("me@1", 80, 0.0)
        assert plan_load(100, [me], "me@1", 80) == LoadNow(())

    def test_a_copy_beside_a_pinned_model_of_the_same_ref_counts_and_may_go(self):
        """A copy loaded on demand of the model that is now the active one takes memory
        too: it is counted, and it is what makes room, never the pinned model."""
        active = Resident("m@1", 50, 0.0, pinned=True)
        copy, busy = Resident("m@1", 50, 1.0), Resident("m@1", 50, 1.0, leases=1)
        assert plan_load(100, [active, copy], "new@1", 40) == LoadNow(("m@1",))
        assert plan_load(100, [active, busy], "new@1", 40) == MustWait(("m@1",))
        assert plan_trim(60, [active, copy]) == ("m@1",)
        assert plan_trim(60, [active, busy]) == ()


class TestTrimAndExpiry:
    def test_trim_unloads_the_oldest_idle_models_until_within_budget(self):
        """After the active model grew, the oldest idle models go until the rest fits."""
        residents = [
            Resident("active@2", 70, 0.0, pinned=True),
            Resident("a@1", 20, 5.0),
            Resident("b@1", 20, 1.0),
            Resident("c@1", 20, 9.0, leases=1),
        ]
        assert plan_trim(100, residents) == ("b@1", "a@1")

    def test_expired_skips_busy_pinned_and_kept_models(self):
        """Only idle models whose keep-alive has passed are due; the next expiry is known."""
        residents = [
            Resident("due@1", 1, 0.0, expires_at_s=10.0),
            Resident("busy@1", 1, 0.0, leases=1, expires_at_s=5.0),
            Resident("kept@1", 1, 0.0, expires_at_s=None),
            Resident("later@1", 1, 0.0, expires_at_s=30.0),
        ]
        assert expired(residents, 20.0) == ("due@1",)
        assert next_expiry(residents) == 10.0


class TestKeepAlive:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            (0, 0.0),
            (30, 30.0),
            (2.5, 2.5),
            ("300", 300.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("250ms", 0.25),
            (-1, None),
            ("-1", None),
            ("-5m", None),
        ],
    )
    def test_seconds_and_durations(self, value, seconds):
        """Numbers are seconds, strings may carry Ollama's units, negative keeps for good."""
        assert parse_keep_alive(value) == seconds

    @pytest.mark.parametrize("value", ["soon", "", "5 minutes", True, None, [], float("nan")])
    def test_anything_else_is_a_400_naming_the_field(self, value):
        """A keep_alive that is not a duration says what was expected and what came."""
        with pytest.raises(InvalidRequest) as caught:
            parse_keep_alive(value)
        assert caught.value.param == "keep_alive"
        assert "5m" in str(caught.value)


class TestEstimate:
    def test_a_gguf_counts_file_kv_cache_and_overhead(self):
        """KV cache: layers x kv width x context x 2 (keys and values) x 2 bytes (f16)."""
        shape = ModelShape(layers=30, kv_width=192)
        size = estimate_bytes(file_bytes=1000, context_length=4096, shape=shape)
        assert size == 1000 + 30 * 192 * 4096 * 4 + RUNTIME_OVERHEAD_BYTES

    def test_an_unknown_shape_counts_twice_the_file_and_min_ram_wins_when_larger(self):
        """Without a shape the estimate is conservative; a larger signed min_ram wins."""
        size = estimate_bytes(file_bytes=1000, context_length=4096, shape=None)
        assert size == 1000 * UNKNOWN_SHAPE_FACTOR + RUNTIME_OVERHEAD_BYTES
        assert (
            estimate_bytes(file_bytes=1000, context_length=4096, shape=None, min_ram_bytes=1 << 40)
            == 1 << 40
        )


class TestGgufShape:
    def test_reads_the_shape_of_the_tiny_models(self):
        """Layer count and kv heads x head size, as the fixtures' headers say."""
        assert read_shape(TINY_GGUF) == ModelShape(layers=2, kv_width=2 * 16)
        assert read_shape(FIXTURES / "tiny-phi3.gguf") is not None

    def test_not_a_gguf_or_a_cut_header_has_no_shape(self, tmp_path):
        """A file that is not GGUF, or whose header ends early, gives None, not an error."""
        other = tmp_path / "model.onnx"
        other.write_bytes(b"not a gguf at all")
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(TINY_GGUF.read_bytes()[:200])
        assert read_shape(other) is None
        assert read_shape(cut) is None
        assert read_shape(tmp_path / "missing.gguf") is None
