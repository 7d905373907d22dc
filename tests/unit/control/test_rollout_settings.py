"""Rollout settings (defaults, validation, stored form) and the control plane's error trees."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.errors import (
    Conflict,
    ControlError,
    InvalidRequest,
    NotFound,
    RequestError,
    Unprocessable,
)
from edgelm_control.rollouts.errors import (
    EmptySelection,
    IllegalRolloutTransition,
    IllegalTransition,
    InvalidRolloutSettings,
    InvalidSelector,
    InvalidWavePlan,
)
from edgelm_control.rollouts.settings import SEVEN_DAYS_S, OnFailure, RolloutSettings

VALID = st.builds(
    RolloutSettings,
    success_threshold=st.floats(0, 1),
    failure_threshold=st.floats(0, 1),
    on_failure=st.sampled_from(OnFailure),
    health_margin=st.none() | st.floats(0, 1, exclude_max=True),
    device_timeout_s=st.integers(1, 10**6),
    pending_expiry_s=st.integers(1, 10**8),
)


class TestRolloutSettings:
    def test_defaults_are_documented_values(self) -> None:
        """Defaults: all must succeed, 20% failures fail, pause, no health gate, 30 min, 7 days."""
        settings = RolloutSettings()
        assert settings.success_threshold == 1.0
        assert settings.failure_threshold == 0.2
        assert settings.on_failure is OnFailure.PAUSE
        assert settings.health_margin is None
        assert settings.device_timeout_s == 1800
        assert settings.pending_expiry_s == SEVEN_DAYS_S == 604_800

    def test_values_are_normalised(self) -> None:
        """Whole-number shares become floats and on_failure text becomes its enum."""
        settings = RolloutSettings(success_threshold=1, health_margin=0, on_failure="abort")  # type: ignore[arg-type]
        assert isinstance(settings.success_threshold, float)
        assert isinstance(settings.health_margin, float)
        assert settings.on_failure is OnFailure.ABORT

    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            ("success_threshold", 1.5, "a number from 0 to 1"),
            ("success_threshold", -0.1, "a number from 0 to 1"),
            ("failure_threshold", math.nan, "a finite number"),
            ("failure_threshold", True, "a finite number"),
            ("failure_threshold", "0.2", "a finite number"),
            ("on_failure", "rollback", "'pause' or 'abort'"),
            ("health_margin", 1.0, "null or a number from 0 up to (not including) 1"),
            ("health_margin", -0.2, "null or a number from 0 up to (not including) 1"),
            ("health_margin", math.inf, "a finite number"),
            ("device_timeout_s", 0, "a whole number of seconds, at least 1"),
            ("device_timeout_s", 1800.0, "a whole number of seconds, at least 1"),
            ("pending_expiry_s", False, "a whole number of seconds, at least 1"),
        ],
    )
    def test_out_of_range_setting_is_refused_precisely(
        self, field: str, value: object, expected: str
    ) -> None:
        """A bad setting names itself, what it must be and what came."""
        with pytest.raises(InvalidRolloutSettings) as refused:
            RolloutSettings(**{field: value})  # type: ignore[arg-type]
        assert str(refused.value) == f"{field} must be {expected}, got {value!r}"
        assert (refused.value.param, refused.value.setting) == (field, field)
        assert refused.value.status_code == 400

    def test_unknown_setting_is_refused(self) -> None:
        """from_mapping refuses a key that is not a setting, naming it."""
        with pytest.raises(InvalidRolloutSettings) as refused:
            RolloutSettings.from_mapping({"failure_treshold": 0.1})
        assert refused.value.param == "failure_treshold"
        assert "one of the settings" in str(refused.value)

    def test_missing_settings_default(self) -> None:
        """from_mapping fills what it is not given with the defaults."""
        settings = RolloutSettings.from_mapping({"health_margin": 0.2})
        assert settings == dataclasses.replace(RolloutSettings(), health_margin=0.2)

    @given(settings=VALID)
    def test_stored_form_round_trips(self, settings: RolloutSettings) -> None:
        """Settings stored as JSON read back equal."""
        assert RolloutSettings.from_mapping(settings.to_json()) == settings

    def test_settings_are_frozen(self) -> None:
        """Settings cannot change after the rollout is created."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            RolloutSettings().failure_threshold = 0.5  # type: ignore[misc]


class TestControlErrors:
    def test_request_families_carry_their_status(self) -> None:
        """The operator's errors are 400, 404, 409 and 422; the root is a 500."""
        assert (ControlError.status_code, ControlError.code) == (500, "internal_error")
        expected = {InvalidRequest: 400, NotFound: 404, Conflict: 409, Unprocessable: 422}
        for cls, status in expected.items():
            assert issubclass(cls, RequestError)
            assert cls.status_code == status
        assert NotFound("no rollout ro-1", param="rollout").param == "rollout"

    def test_rollout_errors_sit_in_the_documented_families(self) -> None:
        """Each rollout error derives from the family of who is at fault, with its own code."""
        families: dict[type[ControlError], type[ControlError]] = {
            InvalidSelector: InvalidRequest,
            InvalidWavePlan: InvalidRequest,
            InvalidRolloutSettings: InvalidRequest,
            IllegalRolloutTransition: Conflict,
            EmptySelection: Unprocessable,
            IllegalTransition: ControlError,
        }
        codes = set()
        for cls, family in families.items():
            assert issubclass(cls, family)
            codes.add(cls.code)
        assert len(codes) == len(families)
        assert not issubclass(IllegalTransition, RequestError)
