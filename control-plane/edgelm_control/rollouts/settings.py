"""The settings a rollout is created with and stored with: its thresholds, margin and clocks.

The model, the selector and the wave plan are stored beside these; they have their own value
objects (:mod:`~edgelm_control.rollouts.selection`, :mod:`~edgelm_control.rollouts.waves`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum

from edgelm_control.rollouts.errors import InvalidRolloutSettings

SEVEN_DAYS_S = 7 * 24 * 3600


class OnFailure(StrEnum):
    """What a failed wave does to its rollout."""

    PAUSE = "pause"  # hold the rollout for the operator; nothing is rolled back
    ABORT = "abort"  # the rollout fails, with the device effects of an abort


@dataclass(frozen=True)
class RolloutSettings:
    """A rollout's thresholds and clocks, validated when built.

    Shares are fractions of a wave's *eligible* devices (see
    :mod:`~edgelm_control.rollouts.gates`), written as numbers from 0 to 1.
    """

    #: A settled wave passes when at least this share of its eligible devices succeeded.
    success_threshold: float = 1.0
    #: A wave fails as soon as more than this share of its eligible devices failed or timed out.
    failure_threshold: float = 0.2
    #: What a failed wave does: pause the rollout for the operator, or abort it.
    on_failure: OnFailure = OnFailure.PAUSE
    #: The health gate's margin, e.g. 0.2: the new model's median tokens/s must reach
    #: 0.8 x the previous model's on the same hardware class, and its median TTFT stay within
    #: 1.2 x. ``None`` turns the health gate off.
    health_margin: float | None = None
    #: An online device that was notified and stays silent this long is ``timed_out``.
    device_timeout_s: int = 1800
    #: A device still ``pending`` (and offline) this long after its wave started is ``expired``.
    pending_expiry_s: int = SEVEN_DAYS_S
    #: After each wave that passes (but the last), pause the rollout: the next wave starts
    #: only when the operator resumes it, e.g. after looking at the canary themselves.
    pause_between_waves: bool = False

    def __post_init__(self) -> None:
        share = "a number from 0 to 1"
        _set(self, "success_threshold", _number(self.success_threshold, "success_threshold"))
        _set(self, "failure_threshold", _number(self.failure_threshold, "failure_threshold"))
        for name in ("success_threshold", "failure_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidRolloutSettings(name, share, getattr(self, name))
        try:
            _set(self, "on_failure", OnFailure(self.on_failure))
        except ValueError:
            raise InvalidRolloutSettings(
                "on_failure", "'pause' or 'abort'", self.on_failure
            ) from None
        if self.health_margin is not None:
            margin = _number(self.health_margin, "health_margin")
            if not 0.0 <= margin < 1.0:  # a margin of 1 would let any tokens/s pass
                raise InvalidRolloutSettings(
                    "health_margin", "null or a number from 0 up to (not including) 1", margin
                )
            _set(self, "health_margin", margin)
        if not isinstance(self.pause_between_waves, bool):
            raise InvalidRolloutSettings(
                "pause_between_waves", "true or false", self.pause_between_waves
            )
        for name in ("device_timeout_s", "pending_expiry_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRolloutSettings(name, "a whole number of seconds, at least 1", value)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> RolloutSettings:
        """Build from decoded JSON or CLI options: unknown keys refused, missing ones default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRolloutSettings(
                unknown[0], f"one of the settings {', '.join(sorted(known))}", data[unknown[0]]
            )
        return cls(**data)  # type: ignore[arg-type]  # each value is checked in __post_init__

    def to_json(self) -> dict[str, object]:
        """The settings as stored with the rollout; :meth:`from_mapping` reads it back."""
        return {
            "success_threshold": self.success_threshold,
            "failure_threshold": self.failure_threshold,
            "on_failure": str(self.on_failure),
            "health_margin": self.health_margin,
            "device_timeout_s": self.device_timeout_s,
            "pending_expiry_s": self.pending_expiry_s,
            "pause_between_waves": self.pause_between_waves,
        }


def _number(value: object, name: str) -> float:
    # bool is an int to Python, never a threshold to an operator.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRolloutSettings(name, "a finite number", value)
    return float(value)


def _set(settings: RolloutSettings, name: str, value: object) -> None:
    # Normalise a frozen field once, at construction (1 → 1.0, "pause" → OnFailure.PAUSE).
    object.__setattr__(settings, name, value)
