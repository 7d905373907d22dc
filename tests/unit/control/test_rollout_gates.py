"""Wave gates: eligibility, early failure, the canary's one success and the health gate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.rollouts.device_states import DeviceState
from edgelm_control.rollouts.gates import (
    GateCode,
    GateResult,
    HealthFigures,
    Verdict,
    WaveDevice,
    WaveTally,
    evaluate_wave,
    health_findings,
    tally_wave,
)
from edgelm_control.rollouts.settings import RolloutSettings

S = DeviceState
DEFAULTS = RolloutSettings()  # success 1.0, failure 0.2, no health gate
HEALTH = RolloutSettings(health_margin=0.2)


def wave(*states: DeviceState, online: bool = True) -> list[WaveDevice]:
    return [WaveDevice(f"d{i:03}", state, online) for i, state in enumerate(states)]


def ran(
    hardware_class: str, tokens_per_s: float | None, ttft_ms: float | None = None
) -> WaveDevice:
    """A device of ``hardware_class`` that succeeded with these health figures."""
    figures = HealthFigures(tokens_per_s, ttft_ms)
    device_id = f"{hardware_class}-{tokens_per_s}-{ttft_ms}"
    return WaveDevice(device_id, S.SUCCEEDED, True, hardware_class, figures)


def gate(
    devices: list[WaveDevice],
    settings: RolloutSettings = DEFAULTS,
    *,
    canary: bool = False,
    baselines: dict[str, HealthFigures] | None = None,
) -> GateResult:
    return evaluate_wave(devices, settings, canary=canary, baselines=baselines)


class TestTallyWave:
    def test_counts_each_device_by_what_it_means_to_the_gate(self) -> None:
        """Offline pending, not eligible, successes, failures and work at hand are told apart."""
        devices = [
            *wave(S.WAITING, S.PENDING, S.DOWNLOADING, S.ACTIVATING, S.SUCCEEDED),
            *wave(S.FAILED, S.TIMED_OUT, S.EXPIRED, S.CANCELLED, S.SUPERSEDED),
            *wave(S.ROLLING_BACK, S.ROLLED_BACK),
            *wave(S.PENDING, S.DOWNLOADING, online=False),
        ]
        assert tally_wave(devices) == WaveTally(
            devices=14, eligible=8, succeeded=1, failures=2, in_progress=5, pending_offline=1
        )


class TestEvaluateWave:
    def test_all_succeeded_passes(self) -> None:
        """A wave whose eligible devices all succeeded passes and says so with the figures."""
        result = gate(wave(S.SUCCEEDED, S.SUCCEEDED))
        assert result.verdict is Verdict.PASSED
        assert result.code is GateCode.SUCCESS_THRESHOLD_MET
        assert result.reason == "success_threshold_met: 2 of 2 eligible devices succeeded (1 >= 1)"

    def test_offline_pending_devices_do_not_block(self) -> None:
        """Devices pending and offline are left out: the rest decide, canary or not."""
        devices = wave(S.SUCCEEDED, S.SUCCEEDED) + wave(S.PENDING, S.PENDING, online=False)
        for canary in (False, True):
            result = gate(devices, canary=canary)
            assert result.verdict is Verdict.PASSED
            assert result.tally.eligible == 2
            assert result.tally.pending_offline == 2

    def test_online_pending_device_keeps_the_wave_running(self) -> None:
        """A pending device that is online was notified: the wave waits for it."""
        result = gate(wave(S.SUCCEEDED) + wave(S.PENDING, online=True))
        assert result.verdict is Verdict.RUNNING
        assert result.code is GateCode.IN_PROGRESS
        assert result.reason == "in_progress: 1 of 2 eligible devices at work"

    @pytest.mark.parametrize("state", [S.WAITING, S.DOWNLOADING, S.ACTIVATING])
    def test_work_in_progress_keeps_the_wave_running(self, state: DeviceState) -> None:
        """Waiting, downloading and activating devices keep the wave running, online or not."""
        for online in (True, False):
            assert gate(wave(S.SUCCEEDED) + wave(state, online=online)).verdict is Verdict.RUNNING

    def test_failures_over_the_threshold_fail_the_wave_early(self) -> None:
        """3 failures of 10 eligible fail the wave at once, with 7 devices still at work."""
        result = gate(wave(S.FAILED, S.TIMED_OUT, S.FAILED, *[S.DOWNLOADING] * 7))
        assert result.verdict is Verdict.FAILED
        assert result.code is GateCode.FAILURE_THRESHOLD
        assert result.reason == (
            "failure_threshold: 3 of 10 eligible devices failed or timed out (0.3 > 0.2)"
        )

    def test_failures_at_the_threshold_do_not_fail_early(self) -> None:
        """2 failures of 10 is not more than 0.2: the wave keeps running."""
        result = gate(wave(S.FAILED, S.TIMED_OUT, *[S.DOWNLOADING] * 8))
        assert result.verdict is Verdict.RUNNING

    def test_timed_out_counts_as_a_failure(self) -> None:
        """A timed-out device counts against the failure threshold like a failed one."""
        result = gate(wave(S.TIMED_OUT, S.SUCCEEDED))
        assert result.code is GateCode.FAILURE_THRESHOLD
        assert result.tally.failures == 1

    def test_settled_wave_below_the_success_threshold_fails(self) -> None:
        """9 of 10 succeeded is below a success threshold of 1: the settled wave fails."""
        result = gate(wave(S.FAILED, *[S.SUCCEEDED] * 9))
        assert result.verdict is Verdict.FAILED
        assert result.code is GateCode.SUCCESS_THRESHOLD
        assert result.reason == "success_threshold: 9 of 10 eligible devices succeeded (0.9 < 1)"

    def test_lower_success_threshold_lets_a_failure_pass(self) -> None:
        """With success_threshold 0.8, 9 of 10 succeeded passes."""
        result = gate(wave(S.FAILED, *[S.SUCCEEDED] * 9), RolloutSettings(success_threshold=0.8))
        assert result.verdict is Verdict.PASSED

    @pytest.mark.parametrize("state", [S.EXPIRED, S.SUPERSEDED, S.CANCELLED])
    def test_expired_superseded_cancelled_are_not_eligible(self, state: DeviceState) -> None:
        """Expired, superseded and cancelled devices count neither for nor against the wave."""
        result = gate(wave(S.SUCCEEDED, S.SUCCEEDED, state, state))
        assert result.verdict is Verdict.PASSED
        assert result.tally.eligible == 2
        assert result.tally.devices == 4

    def test_later_wave_with_no_eligible_device_passes(self) -> None:
        """A wave after the canary whose devices are all away or gone passes."""
        result = gate(wave(S.EXPIRED) + wave(S.PENDING, online=False))
        assert result.verdict is Verdict.PASSED
        assert result.code is GateCode.NO_ELIGIBLE_DEVICE

    def test_canary_waits_for_a_success_from_offline_devices(self) -> None:
        """A canary with no eligible device but devices pending offline waits for them."""
        result = gate(wave(S.EXPIRED) + wave(S.PENDING, online=False), canary=True)
        assert result.verdict is Verdict.RUNNING
        assert result.code is GateCode.AWAITING_CANARY
        assert result.reason == (
            "awaiting_canary: no canary device succeeded yet; 1 pending offline"
        )

    def test_canary_with_no_device_left_to_report_fails(self) -> None:
        """A canary whose devices all expired, were superseded or cancelled fails."""
        result = gate(wave(S.EXPIRED, S.SUPERSEDED, S.CANCELLED), canary=True)
        assert result.verdict is Verdict.FAILED
        assert result.code is GateCode.NO_CANARY_REPORTED
        assert result.reason.startswith("no_canary_reported: ")

    def test_canary_needs_a_success_even_with_no_success_threshold(self) -> None:
        """With success_threshold 0 a later wave of failures passes, a canary of them fails."""
        lenient = RolloutSettings(success_threshold=0.0, failure_threshold=1.0)
        failures = wave(S.FAILED, S.TIMED_OUT)
        assert gate(failures, lenient).verdict is Verdict.PASSED
        result = gate(failures, lenient, canary=True)
        assert result.code is GateCode.NO_CANARY_REPORTED
        waiting = gate(failures + wave(S.PENDING, online=False), lenient, canary=True)
        assert waiting.code is GateCode.AWAITING_CANARY

    def test_canary_of_failures_names_the_success_threshold(self) -> None:
        """A settled canary with failures only fails on the success threshold, the clearer why."""
        lenient = RolloutSettings(failure_threshold=1.0)
        result = gate(wave(S.FAILED) + wave(S.PENDING, online=False), lenient, canary=True)
        assert result.code is GateCode.SUCCESS_THRESHOLD


class TestHealthGate:
    def test_slow_class_fails_naming_the_class_and_figures(self) -> None:
        """Median tokens/s under (1 - margin) x baseline fails the wave, figures in the reason."""
        devices = [ran("pi5", 41.0), ran("pi5", 40.0), ran("pi5", 42.0)]
        result = gate(devices, HEALTH, baselines={"pi5": HealthFigures(60.0, None)})
        assert result.verdict is Verdict.FAILED
        assert result.code is GateCode.HEALTH
        assert result.reason == "health: pi5 new model 41.0 tokens/s < 0.8 x 60.0"
        (finding,) = result.health
        assert (finding.hardware_class, finding.metric, finding.devices) == (
            "pi5",
            "tokens_per_s",
            3,
        )
        assert (finding.new_median, finding.baseline, finding.passed) == (41.0, 60.0, False)

    def test_slow_first_token_fails_naming_the_class_and_figures(self) -> None:
        """Median TTFT over (1 + margin) x baseline fails the wave, figures in the reason."""
        devices = [ran("jetson", 50.0, 900.0)]
        result = gate(devices, HEALTH, baselines={"jetson": HealthFigures(50.0, 500.0)})
        assert result.reason == "health: jetson new model 900.0 ms TTFT > 1.2 x 500.0"

    def test_class_without_a_baseline_passes(self) -> None:
        """A hardware class the previous model has no figures for passes the health gate."""
        result = gate([ran("x86", 1.0, 10_000.0)], HEALTH, baselines={"pi5": HealthFigures(60, 1)})
        assert result.verdict is Verdict.PASSED
        assert result.health == ()

    def test_figure_without_a_baseline_passes(self) -> None:
        """A baseline with tokens/s but no TTFT judges tokens/s only."""
        result = gate([ran("pi5", 59.0, 10_000.0)], HEALTH, baselines={"pi5": HealthFigures(60.0)})
        assert result.verdict is Verdict.PASSED
        assert [f.metric for f in result.health] == ["tokens_per_s"]

    def test_the_median_decides(self) -> None:
        """One slow device does not fail a class whose median is within the margin."""
        devices = [ran("pi5", 10.0), ran("pi5", 50.0), ran("pi5", 60.0)]
        result = gate(devices, HEALTH, baselines={"pi5": HealthFigures(60.0)})
        assert result.verdict is Verdict.PASSED
        assert result.health[0].describe() == "pi5 new model 50.0 tokens/s >= 0.8 x 60.0"

    def test_classes_are_judged_separately(self) -> None:
        """Each class is held to its own baseline; the reason names only the one that failed."""
        devices = [ran("pi5", 30.0), ran("jetson", 200.0)]
        baselines = {"pi5": HealthFigures(60.0), "jetson": HealthFigures(100.0)}
        result = gate(devices, HEALTH, baselines=baselines)
        assert result.reason == "health: pi5 new model 30.0 tokens/s < 0.8 x 60.0"
        assert [(f.hardware_class, f.passed) for f in result.health] == [
            ("jetson", True),
            ("pi5", False),
        ]

    def test_only_succeeded_devices_report_health(self) -> None:
        """Figures of devices that did not succeed are not part of the medians."""
        slow = WaveDevice("slow", S.FAILED, True, "pi5", HealthFigures(1.0))
        findings = health_findings([slow, ran("pi5", 60.0)], {"pi5": HealthFigures(60.0)}, 0.2)
        assert [f.devices for f in findings] == [1]
        assert findings[0].passed

    def test_health_gate_off_ignores_figures(self) -> None:
        """Without health_margin, figures however bad do not fail the wave."""
        result = gate([ran("pi5", 1.0)], baselines={"pi5": HealthFigures(60.0)})
        assert result.verdict is Verdict.PASSED
        assert result.health == ()


WAVES = st.lists(
    st.builds(
        WaveDevice,
        device_id=st.just("d"),
        state=st.sampled_from(DeviceState),
        online=st.booleans(),
    ),
    max_size=30,
)
THRESHOLDS = st.builds(
    RolloutSettings,
    success_threshold=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    failure_threshold=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
)


class TestGateProperties:
    @given(devices=WAVES, settings=THRESHOLDS, canary=st.booleans())
    def test_verdicts_agree_with_the_rules(
        self, devices: list[WaveDevice], settings: RolloutSettings, canary: bool
    ) -> None:
        """Any wave's verdict follows from its tally exactly as the rules say."""
        result = gate(devices, settings, canary=canary)
        tally = result.tally
        assert result.reason.startswith(f"{result.code}: ")
        too_many = tally.eligible > 0 and tally.failures / tally.eligible > (
            settings.failure_threshold
        )
        assert (result.code is GateCode.FAILURE_THRESHOLD) == too_many
        if result.verdict is Verdict.PASSED:
            assert tally.in_progress == 0
            assert not canary or tally.succeeded >= 1
            assert tally.eligible == 0 or (
                tally.succeeded / tally.eligible >= settings.success_threshold
            )
        if result.verdict is Verdict.RUNNING:
            waiting_canary = canary and tally.succeeded == 0 and tally.pending_offline > 0
            assert tally.in_progress > 0 or waiting_canary

    @given(devices=WAVES, settings=THRESHOLDS, away=st.integers(1, 5))
    def test_offline_pending_devices_never_change_a_later_wave(
        self, devices: list[WaveDevice], settings: RolloutSettings, away: int
    ) -> None:
        """Adding devices pending offline to a wave after the canary never changes its verdict."""
        more = devices + wave(*[S.PENDING] * away, online=False)
        before, after = gate(devices, settings), gate(more, settings)
        assert (after.verdict, after.code) == (before.verdict, before.code)
