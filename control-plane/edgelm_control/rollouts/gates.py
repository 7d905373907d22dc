"""Wave gates: is the current wave still running, has it passed, or has it failed? Pure.

Inputs are plain values: each device's row state, whether it is online, its hardware class
and the health figures it reported for the new model; the previous model's figures per
hardware class (the baselines); and the rollout's settings. The rules, in the order
:func:`evaluate_wave` applies them:

1. ``eligible`` is the wave's devices minus those ``pending`` and offline, ``expired``,
   ``superseded``, ``cancelled`` or ``revoked`` (and the rollback states, which exist only
   after an abort).
   An offline device never blocks a wave; it updates when it comes back.
2. ``failures`` (``failed`` + ``timed_out``) over ``eligible`` above ``failure_threshold``
   fails the wave at once, without waiting for the devices still at work.
3. While an eligible device is in progress (``pending`` online, ``downloading``,
   ``activating``, or ``waiting`` in a wave that has not started), the wave is running.
4. A settled wave with no eligible device passes, except the first wave (the canary): it
   needs a success, so it waits while devices are pending offline (they expire in time) and
   fails with ``no_canary_reported`` once none of them can report.
5. A settled wave fails if ``succeeded / eligible`` is below ``success_threshold``, and a
   canary also fails (or waits, as above) without a single success.
6. With ``health_margin`` set, for each hardware class and figure where both sides are known,
   the median of the new model's figure on the wave's succeeded devices is held to the
   baseline: tokens/s >= (1 - margin) x baseline, TTFT <= (1 + margin) x baseline. A class (or
   a figure) without a baseline passes. The gate is checked once the wave has otherwise
   passed, so it judges the whole wave's medians rather than the first few devices'.

The engine records a verdict when it is reached and does not evaluate a decided wave again:
a ``timed_out`` device that revives later updates its row, not a wave that already failed.

Shares compare as ``count / eligible`` against the threshold in floating point, which agrees
with the operator's decimal at the boundary (3 of 10 against 0.3 is exactly 0.3 either way).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from edgelm_control.rollouts.device_states import FAILURES, NOT_ELIGIBLE, DeviceState
from edgelm_control.rollouts.settings import RolloutSettings


class Verdict(StrEnum):
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


class GateCode(StrEnum):
    """Why the gate said what it said; every reason text starts with its code."""

    IN_PROGRESS = "in_progress"  # running
    AWAITING_CANARY = "awaiting_canary"  # running
    SUCCESS_THRESHOLD_MET = "success_threshold_met"  # passed
    NO_ELIGIBLE_DEVICE = "no_eligible_device"  # passed (never for the canary)
    FAILURE_THRESHOLD = "failure_threshold"  # failed
    SUCCESS_THRESHOLD = "success_threshold"  # failed
    NO_CANARY_REPORTED = "no_canary_reported"  # failed
    HEALTH = "health"  # failed


@dataclass(frozen=True)
class HealthFigures:
    """Health-check figures: a device's for the new model, or a class's baseline (medians)."""

    tokens_per_s: float | None = None
    ttft_ms: float | None = None


@dataclass(frozen=True)
class WaveDevice:
    """One device of the wave, as the gate sees it."""

    device_id: str
    state: DeviceState
    online: bool
    hardware_class: str | None = None
    health: HealthFigures | None = None  # from its health check of the new model


@dataclass(frozen=True)
class WaveTally:
    devices: int
    eligible: int
    succeeded: int
    failures: int
    in_progress: int  # eligible and not settled
    pending_offline: int


Metric = Literal["tokens_per_s", "ttft_ms"]


@dataclass(frozen=True)
class HealthFinding:
    """One hardware class and figure held to its baseline."""

    hardware_class: str
    metric: Metric
    new_median: float
    baseline: float
    factor: float  # 1 - margin for tokens/s, 1 + margin for TTFT
    devices: int  # succeeded devices that reported the figure
    passed: bool

    def describe(self) -> str:
        """E.g. ``pi5 new model 41.0 tokens/s < 0.8 x 60.0``."""
        if self.metric == "tokens_per_s":
            figure, op = f"{self.new_median:.1f} tokens/s", ">=" if self.passed else "<"
        else:
            figure, op = f"{self.new_median:.1f} ms TTFT", "<=" if self.passed else ">"
        return (
            f"{self.hardware_class} new model {figure} {op} {self.factor:g} x {self.baseline:.1f}"
        )


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    code: GateCode
    reason: str  # "<code>: <figures>", for the operator and the log
    tally: WaveTally
    health: tuple[HealthFinding, ...] = ()


def tally_wave(devices: Iterable[WaveDevice]) -> WaveTally:
    """Count a wave's devices by what they mean to the gate."""
    total = eligible = succeeded = failures = in_progress = pending_offline = 0
    for device in devices:
        total += 1
        if device.state is DeviceState.PENDING and not device.online:
            pending_offline += 1
        elif device.state not in NOT_ELIGIBLE:
            eligible += 1
            if device.state is DeviceState.SUCCEEDED:
                succeeded += 1
            elif device.state in FAILURES:
                failures += 1
            else:  # waiting, pending online, downloading, activating
                in_progress += 1
    return WaveTally(total, eligible, succeeded, failures, in_progress, pending_offline)


def evaluate_wave(
    devices: Iterable[WaveDevice],
    settings: RolloutSettings,
    *,
    canary: bool,
    baselines: Mapping[str, HealthFigures] | None = None,
) -> GateResult:
    """The verdict on one wave; ``canary`` is true for the rollout's first wave."""
    wave = list(devices)
    tally = tally_wave(wave)

    def result(
        verdict: Verdict, code: GateCode, detail: str, health: tuple[HealthFinding, ...] = ()
    ) -> GateResult:
        return GateResult(verdict, code, f"{code}: {detail}", tally, health)

    of_eligible = f"of {tally.eligible} eligible devices"
    if tally.eligible and tally.failures / tally.eligible > settings.failure_threshold:
        share = tally.failures / tally.eligible
        return result(
            Verdict.FAILED,
            GateCode.FAILURE_THRESHOLD,
            f"{tally.failures} {of_eligible} failed or timed out "
            f"({share:.3g} > {settings.failure_threshold:g})",
        )
    if tally.in_progress:
        return result(
            Verdict.RUNNING, GateCode.IN_PROGRESS, f"{tally.in_progress} {of_eligible} at work"
        )
    # A canary without a single success waits for its offline devices, or fails. When some
    # eligible devices settled without success the success threshold below names it better,
    # unless the operator set that threshold to 0.
    if canary and tally.succeeded == 0 and (tally.eligible == 0 or settings.success_threshold == 0):
        if tally.pending_offline:
            return result(
                Verdict.RUNNING,
                GateCode.AWAITING_CANARY,
                f"no canary device succeeded yet; {tally.pending_offline} pending offline",
            )
        return result(
            Verdict.FAILED,
            GateCode.NO_CANARY_REPORTED,
            f"the canary has no success and none of its {tally.devices} devices can still report",
        )
    if tally.eligible == 0:
        return result(
            Verdict.PASSED,
            GateCode.NO_ELIGIBLE_DEVICE,
            f"none of the {tally.devices} devices is eligible "
            f"({tally.pending_offline} pending offline, "
            "the rest expired, superseded, cancelled or revoked)",
        )
    share = tally.succeeded / tally.eligible
    if share < settings.success_threshold:
        return result(
            Verdict.FAILED,
            GateCode.SUCCESS_THRESHOLD,
            f"{tally.succeeded} {of_eligible} succeeded "
            f"({share:.3g} < {settings.success_threshold:g})",
        )
    findings: tuple[HealthFinding, ...] = ()
    if settings.health_margin is not None:
        findings = health_findings(wave, baselines or {}, settings.health_margin)
        failed = [finding.describe() for finding in findings if not finding.passed]
        if failed:
            return result(Verdict.FAILED, GateCode.HEALTH, "; ".join(failed), findings)
    return result(
        Verdict.PASSED,
        GateCode.SUCCESS_THRESHOLD_MET,
        f"{tally.succeeded} {of_eligible} succeeded "
        f"({share:.3g} >= {settings.success_threshold:g})",
        findings,
    )


def health_findings(
    devices: Iterable[WaveDevice], baselines: Mapping[str, HealthFigures], margin: float
) -> tuple[HealthFinding, ...]:
    """Hold each class's medians on the succeeded devices to its baseline, sorted by class."""
    figures: dict[tuple[str, Metric], list[float]] = {}
    for device in devices:
        if device.state is not DeviceState.SUCCEEDED or device.health is None:
            continue
        if device.hardware_class is None:
            continue
        for metric in ("tokens_per_s", "ttft_ms"):
            value = getattr(device.health, metric)
            if value is not None:
                figures.setdefault((device.hardware_class, metric), []).append(value)
    findings = []
    for (hardware_class, metric), values in sorted(figures.items()):
        known = baselines.get(hardware_class)
        baseline = None if known is None else getattr(known, metric)
        if baseline is None:  # nothing to compare with: the class passes
            continue
        median = statistics.median(values)
        if metric == "tokens_per_s":
            factor = 1.0 - margin
            passed = median >= factor * baseline
        else:
            factor = 1.0 + margin
            passed = median <= factor * baseline
        findings.append(
            HealthFinding(hardware_class, metric, median, baseline, factor, len(values), passed)
        )
    return tuple(findings)
