"""Wave planning: the operator's textual forms, the spec they parse to, and the plans cut."""

from __future__ import annotations

import math
import random
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.rollouts.errors import InvalidWavePlan
from edgelm_control.rollouts.waves import (
    Count,
    Rest,
    Share,
    WavePlan,
    WaveSpec,
    parse_canary,
    parse_waves,
    plan_waves,
)

IDS = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), max_size=120)
SIZES = st.one_of(
    st.integers(1, 150).map(Count),
    st.decimals(Decimal("0.5"), Decimal(100), places=1).map(Share),
)
SPECS = st.lists(SIZES, max_size=6).map(lambda sizes: WaveSpec(tuple(sizes)))


class TestParseCanary:
    def test_count_then_the_rest(self) -> None:
        """--canary 5 is a canary of five devices followed by the rest."""
        assert parse_canary("5") == WaveSpec((Count(5), Rest()))
        assert str(parse_canary(" 5 ")) == "5,rest"

    def test_share_then_the_rest(self) -> None:
        """--canary 10% is a share of the selection followed by the rest."""
        assert parse_canary("10%") == WaveSpec((Share(Decimal(10)), Rest()))
        assert str(parse_canary("12.5%")) == "12.5%,rest"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("rest", "canary must be a count like 5 or a share like 10%, got 'rest'"),
            ("0", "canary '0' must hold at least 1 device, got 0"),
            ("0%", "canary '0%' must be a share more than 0% and at most 100%, got 0%"),
            ("101%", "canary '101%' must be a share more than 0% and at most 100%, got 101%"),
            ("five", "canary 'five' must be a count like 10, a share like 10% or rest; got 'five'"),
            ("-1", "must be a count like 10, a share like 10% or rest; got '-1'"),
            ("", "canary '' must be a count like 10, a share like 10% or rest; got nothing"),
        ],
    )
    def test_malformed_canary_is_refused_precisely(self, text: str, message: str) -> None:
        """A canary that is not a positive count or a share in (0, 100] says what came."""
        with pytest.raises(InvalidWavePlan) as refused:
            parse_canary(text)
        assert message in str(refused.value)
        assert refused.value.param == "canary"
        assert refused.value.status_code == 400


class TestParseWaves:
    def test_explicit_sizes(self) -> None:
        """--waves 1,10,50,rest reads as three counts and the rest."""
        spec = parse_waves("1,10,50,rest")
        assert spec.sizes == (Count(1), Count(10), Count(50), Rest())

    def test_mixed_forms_and_spaces(self) -> None:
        """Counts and shares mix, spaces around entries are ignored and REST is rest."""
        assert str(parse_waves(" 1 , 25% , REST ")) == "1,25%,rest"

    def test_missing_rest_is_added(self) -> None:
        """Sizes without a trailing rest get one: every selected device is in a wave."""
        assert parse_waves("1,10") == parse_waves("1,10,rest")
        assert parse_waves("rest") == WaveSpec((Rest(),))

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "waves must list sizes separated by commas, like 1,10,50,rest; got ''"),
            ("1,,rest", "wave 2 of '1,,rest' must be a count like 10, a share like 10% or rest"),
            ("1,x", "wave 2 of '1,x' must be a count like 10, a share like 10% or rest; got 'x'"),
            ("1,0,rest", "wave 2 of '1,0,rest' must hold at least 1 device, got 0"),
            ("1,rest,5", "rest must be the last wave, but wave 2 of '1,rest,5' is rest"),
            ("rest,rest", "rest must be the last wave, but wave 1 of 'rest,rest' is rest"),
            ("150%", "wave 1 of '150%' must be a share more than 0% and at most 100%, got 150%"),
            ("1.5", "got '1.5'"),
        ],
    )
    def test_malformed_waves_are_refused_precisely(self, text: str, message: str) -> None:
        """Each malformed --waves names the wave, the text and what it must be."""
        with pytest.raises(InvalidWavePlan) as refused:
            parse_waves(text)
        assert message in str(refused.value)
        assert refused.value.param == "waves"

    @given(spec=SPECS)
    def test_text_round_trips(self, spec: WaveSpec) -> None:
        """A spec's text parses back to the same spec."""
        assert parse_waves(str(spec)) == spec


class TestWaveSpec:
    def test_value_objects_validate_themselves(self) -> None:
        """Count, Share and WaveSpec refuse sizes the parser would refuse."""
        with pytest.raises(InvalidWavePlan, match="at least 1 device"):
            Count(0)
        with pytest.raises(InvalidWavePlan, match="at least 1 device"):
            Count(True)
        with pytest.raises(InvalidWavePlan, match="at most 100%"):
            Share(Decimal("100.5"))
        with pytest.raises(InvalidWavePlan, match="rest must be the last wave"):
            WaveSpec((Rest(), Count(1)))

    @given(spec=SPECS)
    def test_spec_always_ends_with_a_single_rest(self, spec: WaveSpec) -> None:
        """Whatever it is built from, a spec ends with rest and has no other."""
        assert isinstance(spec.sizes[-1], Rest)
        assert sum(isinstance(size, Rest) for size in spec.sizes) == 1


class TestPlanWaves:
    @given(ids=IDS, spec=SPECS)
    def test_plan_partitions_the_selection(self, ids: list[str], spec: WaveSpec) -> None:
        """Every selected device is in exactly one wave, and no wave is empty."""
        plan = plan_waves(ids, spec)
        flat = [d for wave in plan.waves for d in wave]
        assert sorted(flat) == sorted(set(ids))
        assert len(flat) == len(set(flat))
        assert all(plan.waves)
        assert len(plan.waves) <= len(spec.sizes)

    @given(ids=IDS, spec=SPECS)
    def test_canary_is_never_empty_when_devices_are_selected(
        self, ids: list[str], spec: WaveSpec
    ) -> None:
        """With at least one device selected, the first wave holds at least one."""
        plan = plan_waves(ids, spec)
        assert bool(plan.canary) == bool(ids)

    @given(ids=IDS, spec=SPECS, seed=st.randoms(use_true_random=False))
    def test_plan_is_deterministic(
        self, ids: list[str], spec: WaveSpec, seed: random.Random
    ) -> None:
        """Order and repeats of the input ids do not change the plan: ids are sorted."""
        shuffled = [*ids, *ids[:3]]
        seed.shuffle(shuffled)
        plan = plan_waves(shuffled, spec)
        assert plan == plan_waves(ids, spec)
        assert [d for wave in plan.waves for d in wave] == sorted(set(ids))

    @given(total=st.integers(1, 500), percent=st.decimals(Decimal("0.1"), 100, places=1))
    def test_share_is_rounded_up_and_exact(self, total: int, percent: Decimal) -> None:
        """A share's canary is ceil(share x total) in exact arithmetic, at least 1."""
        ids = [f"d{i:04}" for i in range(total)]
        canary = plan_waves(ids, WaveSpec.canary(Share(percent))).canary
        exact = percent * total / 100  # Decimal: no binary rounding
        assert len(canary) == max(1, math.ceil(exact))

    def test_ten_percent_of_thirty_is_three(self) -> None:
        """10% of 30 devices is 3, not the 4 that floating point rounding up would give."""
        ids = [f"d{i:02}" for i in range(30)]
        assert len(plan_waves(ids, parse_canary("10%")).canary) == 3

    def test_explicit_sizes_cut_in_sorted_order(self) -> None:
        """1,2,rest over five devices cuts them in sorted order, in waves of 1, 2 and 2."""
        plan = plan_waves(["e", "c", "a", "d", "b"], parse_waves("1,2,rest"))
        assert plan.waves == (("a",), ("b", "c"), ("d", "e"))

    def test_waves_beyond_the_selection_are_dropped(self) -> None:
        """A wave bigger than what is left takes the rest and later waves are dropped."""
        plan = plan_waves(["a", "b", "c"], parse_waves("1,10,50,rest"))
        assert plan.waves == (("a",), ("b", "c"))

    def test_no_devices_gives_an_empty_plan(self) -> None:
        """An empty selection plans no wave at all (the selector refuses it before)."""
        plan = plan_waves([], parse_canary("5"))
        assert plan.waves == ()
        assert plan.canary == ()


class TestWavePlan:
    def test_plan_refuses_broken_invariants(self) -> None:
        """A stored plan with an empty wave, a repeat or an unsorted wave is refused."""
        for waves in [(("a",), ()), (("a",), ("a", "b")), (("b", "a"),)]:
            with pytest.raises(ValueError, match="wave"):
                WavePlan(waves)

    def test_wave_of_finds_a_device(self) -> None:
        """wave_of gives a device's 0-based wave and raises KeyError for a stranger."""
        plan = WavePlan((("a",), ("b", "c")))
        assert [plan.wave_of(d) for d in "abc"] == [0, 1, 1]
        with pytest.raises(KeyError):
            plan.wave_of("z")
        assert plan.device_ids == ("a", "b", "c")

    def test_late_joiner_joins_the_last_wave(self) -> None:
        """A late joiner goes to the last wave, sorted in; one already planned changes nothing."""
        plan = WavePlan((("b",), ("c", "e")))
        assert plan.with_late_joiner("d").waves == (("b",), ("c", "d", "e"))
        assert plan.with_late_joiner("b") == plan
        assert WavePlan(()).with_late_joiner("a").waves == (("a",),)

    @given(ids=IDS, spec=SPECS)
    def test_json_round_trips(self, ids: list[str], spec: WaveSpec) -> None:
        """A plan stored as JSON lists reads back equal."""
        plan = plan_waves(ids, spec)
        assert WavePlan.from_json(plan.to_json()) == plan
