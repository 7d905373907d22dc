"""Creating a rollout: the request body and the health gate's baselines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.errors import InvalidRequest
from edgelm_control.rollouts.baselines import (
    HealthSample,
    compute_baselines,
    previous_models_by_class,
)
from edgelm_control.rollouts.errors import InvalidRolloutSettings, InvalidSelector, InvalidWavePlan
from edgelm_control.rollouts.gates import HealthFigures
from edgelm_control.rollouts.request import parse_rollout_request
from edgelm_control.rollouts.selection import AllDevices, ByLabels
from edgelm_control.rollouts.settings import OnFailure
from edgelm_control.rollouts.waves import Count, Rest, Share


def parse(body: object):
    return parse_rollout_request(body, device_timeout_s=1800, pending_expiry_s=604800)


class TestRolloutRequest:
    def test_the_minimal_request_gets_a_ten_percent_canary_and_the_defaults(self):
        """model and selector suffice; waves default to a 10% canary, clocks to the config."""
        request = parse({"model": "m@1", "selector": {"all": True}})
        assert request.model == "m@1"
        assert isinstance(request.selector, AllDevices)
        assert isinstance(request.waves.sizes[0], Share)
        assert isinstance(request.waves.sizes[1], Rest)
        assert (request.settings.device_timeout_s, request.settings.pending_expiry_s) == (
            1800,
            604800,
        )

    def test_every_field_is_read(self):
        """Explicit waves, thresholds, on_failure, margin and clocks all arrive."""
        request = parse(
            {
                "model": "m@1",
                "selector": {"labels": {"site": "berlin"}},
                "waves": "1,10,rest",
                "success_threshold": 0.9,
                "failure_threshold": 0.1,
                "on_failure": "abort",
                "health_margin": 0.2,
                "device_timeout_s": 60,
                "pending_expiry_s": 3600,
            }
        )
        assert isinstance(request.selector, ByLabels)
        assert request.waves.sizes == (Count(1), Count(10), Rest())
        assert request.settings.on_failure is OnFailure.ABORT
        assert request.settings.health_margin == 0.2

    @pytest.mark.parametrize(
        ("body", "error", "param"),
        [
            ([], InvalidRequest, "body"),
            ({"selector": {"all": True}}, InvalidRequest, "model"),
            ({"model": "m@1"}, InvalidRequest, "selector"),
            ({"model": "m", "selector": {"all": True}}, InvalidRequest, "model"),
            ({"model": "m@1", "selector": {"all": True}, "colour": 1}, InvalidRequest, "colour"),
            ({"model": "m@1", "selector": {"all": 1}}, InvalidSelector, "all"),
            ({"model": "m@1", "selector": {"all": True}, "canary": "5", "waves": "1,rest"},
             InvalidRequest, "waves"),
            ({"model": "m@1", "selector": {"all": True}, "canary": True}, InvalidRequest, "canary"),
            ({"model": "m@1", "selector": {"all": True}, "waves": 3}, InvalidRequest, "waves"),
            ({"model": "m@1", "selector": {"all": True}, "waves": "rest,1"}, InvalidWavePlan,
             "waves"),
            ({"model": "m@1", "selector": {"all": True}, "on_failure": "explode"},
             InvalidRolloutSettings, "on_failure"),
        ],
    )  # fmt: skip
    def test_a_bad_request_names_the_field(self, body: object, error: type, param: str):
        """Each mistake is a 400 family error with ``param`` set to what is wrong."""
        with pytest.raises(error) as caught:
            parse(body)
        assert caught.value.param == param  # type: ignore[attr-defined]
        assert caught.value.status_code == 400  # type: ignore[attr-defined]


class TestBaselines:
    def test_the_baseline_is_the_median_of_each_class_previous_models(self):
        """Per class, the median of the previous models' activation figures; other models'
        figures and other classes' do not count."""
        previous = previous_models_by_class([("pi5", "m@1"), ("pi5", "m@1"), ("x86", "n@1")])
        samples = [
            HealthSample("pi5", "m@1", 40.0, 100.0),
            HealthSample("pi5", "m@1", 60.0, None),
            HealthSample("pi5", "m@1", 50.0, 120.0),
            HealthSample("pi5", "other@9", 1.0, 1.0),
            HealthSample("x86", "m@1", 999.0, 1.0),
            HealthSample("x86", "n@1", None, 30.0),
        ]
        assert compute_baselines(samples, previous) == {
            "pi5": HealthFigures(50.0, 110.0),
            "x86": HealthFigures(None, 30.0),
        }

    def test_a_class_that_ran_nothing_has_no_baseline(self):
        """Devices without a previous model, or without a class, set no baseline."""
        assert previous_models_by_class([("pi5", None), (None, "m@1")]) == {}
        assert compute_baselines([HealthSample("pi5", "m@1", 1.0, 1.0)], {}) == {}

    @given(st.lists(st.floats(0.1, 1000), min_size=1, max_size=30))
    def test_the_baseline_lies_within_the_samples(self, figures: list[float]):
        """A median is never outside the figures it summarises."""
        samples = [HealthSample("pi5", "m@1", f, f) for f in figures]
        baseline = compute_baselines(samples, {"pi5": {"m@1"}})["pi5"]
        assert baseline.tokens_per_s is not None
        assert min(figures) <= baseline.tokens_per_s <= max(figures)
