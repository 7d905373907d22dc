"""Wave planning: how a rollout's selected devices are split into waves. Pure.

The operator says how big the waves are, in one of two textual forms::

    --canary 5          a canary of 5 devices, then the rest
    --canary 10%        a canary of 10% of the selection (at least 1 device), then the rest
    --waves 1,10,50,rest    explicit sizes; each a count, a share (25%) or ``rest`` (last only)

Both parse to a :class:`WaveSpec`; :func:`plan_waves` turns a spec and the selected ids into a
:class:`WavePlan`, the concrete device ids of each wave, which is what the rollout stores (so
a restart re-plans nothing). Planning rules:

- the ids are sorted, then cut in order: the same selection always gives the same plan;
- a share is of the whole selection, rounded up (10% of 15 is 2), computed exactly (10% of 30
  is 3, never the 4 that ``ceil(0.1 * 30)`` gives in floating point);
- a wave bigger than what is left takes what is left; empty waves are dropped;
- sizes without a trailing ``rest`` get one: the selection says who gets the model and the
  waves only its pace, so every selected device is in exactly one wave.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from edgelm_control.rollouts.errors import InvalidWavePlan

_COUNT_RE = re.compile(r"[0-9]+")
_SHARE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")
_FORMS = "a count like 10, a share like 10% or rest"


@dataclass(frozen=True)
class Count:
    """A wave of ``devices`` devices (fewer if fewer are left)."""

    devices: int

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise InvalidWavePlan(
                f"a wave must hold at least 1 device, got {self.devices!r}",
                param="waves",
                value=self.devices,
            )

    def size_of(self, total: int) -> int:
        return self.devices

    def __str__(self) -> str:
        return str(self.devices)


@dataclass(frozen=True)
class Share:
    """A wave of ``percent`` % of the whole selection, rounded up."""

    percent: Decimal

    def __post_init__(self) -> None:
        if not isinstance(self.percent, Decimal) or not 0 < self.percent <= 100:
            raise InvalidWavePlan(
                f"a share must be more than 0% and at most 100%, got {self.percent}%",
                param="waves",
                value=self.percent,
            )

    def size_of(self, total: int) -> int:
        return max(1, math.ceil(Fraction(self.percent) * total / 100))

    def __str__(self) -> str:
        return f"{self.percent.normalize():f}%"


@dataclass(frozen=True)
class Rest:
    """Every device not in an earlier wave."""

    def size_of(self, total: int) -> int:
        return total

    def __str__(self) -> str:
        return "rest"


WaveSize = Count | Share | Rest


@dataclass(frozen=True)
class WaveSpec:
    """Wave sizes in order; always ends with :class:`Rest`, which appears nowhere else."""

    sizes: tuple[WaveSize, ...]

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        for position, size in enumerate(sizes[:-1], start=1):
            if isinstance(size, Rest):
                raise InvalidWavePlan(
                    f"rest must be the last wave, but wave {position} of {len(sizes)} is rest",
                    param="waves",
                    value=",".join(map(str, sizes)),
                )
        if not sizes or not isinstance(sizes[-1], Rest):
            sizes = (*sizes, Rest())
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def canary(cls, size: Count | Share) -> WaveSpec:
        return cls((size, Rest()))

    def __str__(self) -> str:
        return ",".join(map(str, self.sizes))


def parse_canary(text: str) -> WaveSpec:
    """Read ``--canary``: a count (``5``) or a share (``10%``); the rest follow it."""
    size = _parse_size(text.strip(), param="canary", where=f"canary {text!r}")
    if isinstance(size, Rest):
        raise InvalidWavePlan(
            f"canary must be a count like 5 or a share like 10%, got {text!r}",
            param="canary",
            value=text,
        )
    return WaveSpec.canary(size)


def parse_waves(text: str) -> WaveSpec:
    """Read ``--waves``: sizes separated by commas, like ``1,10,50,rest``."""
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        raise InvalidWavePlan(
            f"waves must list sizes separated by commas, like 1,10,50,rest; got {text!r}",
            param="waves",
            value=text,
        )
    sizes = []
    for position, part in enumerate(parts, start=1):
        where = f"wave {position} of {text!r}"
        size = _parse_size(part, param="waves", where=where)
        if isinstance(size, Rest) and position < len(parts):
            raise InvalidWavePlan(
                f"rest must be the last wave, but {where} is rest", param="waves", value=text
            )
        sizes.append(size)
    return WaveSpec(tuple(sizes))


def _parse_size(part: str, *, param: str, where: str) -> WaveSize:
    if part.lower() == "rest":
        return Rest()
    if _COUNT_RE.fullmatch(part):
        if int(part) == 0:
            raise InvalidWavePlan(
                f"{where} must hold at least 1 device, got 0", param=param, value=part
            )
        return Count(int(part))
    share = _SHARE_RE.fullmatch(part)
    if share:
        percent = Decimal(share.group(1))
        if not 0 < percent <= 100:
            raise InvalidWavePlan(
                f"{where} must be a share more than 0% and at most 100%, got {part}",
                param=param,
                value=part,
            )
        return Share(percent)
    got = repr(part) if part else "nothing"
    raise InvalidWavePlan(f"{where} must be {_FORMS}; got {got}", param=param, value=part)


@dataclass(frozen=True)
class WavePlan:
    """The device ids of each wave, in order: sorted, non-empty, each id in one wave only."""

    waves: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        waves = tuple(tuple(wave) for wave in self.waves)
        seen: set[str] = set()
        for index, wave in enumerate(waves):
            if not wave:
                raise ValueError(f"wave {index} of the plan is empty")
            if list(wave) != sorted(set(wave)) or seen & set(wave):
                raise ValueError(f"wave {index} repeats a device or is not sorted: {wave}")
            seen.update(wave)
        object.__setattr__(self, "waves", waves)

    @property
    def canary(self) -> tuple[str, ...]:
        """The first wave, which the gate holds to the canary rule; empty only if the plan is."""
        return self.waves[0] if self.waves else ()

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(sorted(d for wave in self.waves for d in wave))

    def wave_of(self, device_id: str) -> int:
        """The 0-based index of the wave ``device_id`` is in; :class:`KeyError` if none."""
        for index, wave in enumerate(self.waves):
            if device_id in wave:
                return index
        raise KeyError(device_id)

    def with_late_joiner(self, device_id: str) -> WavePlan:
        """The plan with a device enrolled after planning added to the last wave."""
        if any(device_id in wave for wave in self.waves):
            return self
        if not self.waves:
            return WavePlan(((device_id,),))
        last = tuple(sorted((*self.waves[-1], device_id)))
        return WavePlan((*self.waves[:-1], last))

    def to_json(self) -> list[list[str]]:
        return [list(wave) for wave in self.waves]

    @classmethod
    def from_json(cls, data: list[list[str]]) -> WavePlan:
        return cls(tuple(tuple(wave) for wave in data))


def plan_waves(device_ids: Iterable[str], spec: WaveSpec) -> WavePlan:
    """Split the selected ids (sorted, repeats ignored) into waves as ``spec`` says."""
    ordered = sorted(set(device_ids))
    total = len(ordered)
    waves: list[tuple[str, ...]] = []
    start = 0
    for size in spec.sizes:
        end = min(total, start + size.size_of(total))
        if end > start:
            waves.append(tuple(ordered[start:end]))
        start = end
    return WavePlan(tuple(waves))
