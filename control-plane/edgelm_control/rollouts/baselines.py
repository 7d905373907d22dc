"""The health gate's baselines: the previous model's figures per hardware class. Pure.

A rollout's devices ran some model before it (their ``previous_model``, recorded when the
rollout was created). For each hardware class, the baseline is the median of the health-check
figures that the class's previous models reported when they were activated (earlier
``activated`` events, on devices of that class). Computed once, at creation, and stored with
the rollout, so the gate judges every wave against the same numbers, also after a restart.

A class whose devices ran no model before, or whose previous models never reported figures,
has no baseline, and the health gate passes it (there is nothing to be worse than).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgelm_control.rollouts.gates import HealthFigures


@dataclass(frozen=True)
class HealthSample:
    """One ``activated`` event's health-check figures, with its device's class."""

    hardware_class: str
    model: str
    tokens_per_s: float | None
    ttft_ms: float | None


def previous_models_by_class(
    devices: Iterable[tuple[str | None, str | None]],
) -> dict[str, set[str]]:
    """From (hardware class, previous model) pairs: each class's set of previous models."""
    found: dict[str, set[str]] = {}
    for hardware_class, model in devices:
        if hardware_class is not None and model is not None:
            found.setdefault(hardware_class, set()).add(model)
    return found


def compute_baselines(
    samples: Iterable[HealthSample], previous: Mapping[str, set[str]]
) -> dict[str, HealthFigures]:
    """Median tokens/s and TTFT per class, over samples of that class's previous models."""
    tokens: dict[str, list[float]] = {}
    ttft: dict[str, list[float]] = {}
    for sample in samples:
        if sample.model not in previous.get(sample.hardware_class, set()):
            continue
        if sample.tokens_per_s is not None:
            tokens.setdefault(sample.hardware_class, []).append(sample.tokens_per_s)
        if sample.ttft_ms is not None:
            ttft.setdefault(sample.hardware_class, []).append(sample.ttft_ms)
    baselines = {}
    for hardware_class in sorted(set(tokens) | set(ttft)):
        t = tokens.get(hardware_class)
        f = ttft.get(hardware_class)
        baselines[hardware_class] = HealthFigures(
            tokens_per_s=statistics.median(t) if t else None,
            ttft_ms=statistics.median(f) if f else None,
        )
    return baselines
