"""Values typed on the fleet command line: durations, shares, selectors, model refs."""

from __future__ import annotations

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_provisioning.cli_values import (
    Share,
    check_model_ref,
    parse_duration_s,
    selector_from_options,
)
from edgelm_provisioning.errors import InvalidValue


class TestDuration:
    @given(
        st.integers(1, 10**6),
        st.sampled_from([("", 1), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
    )
    def test_a_number_with_a_unit_is_whole_seconds(self, number, unit):
        """N, Ns, Nm, Nh and Nd are N times the unit's seconds."""
        suffix, seconds = unit
        assert parse_duration_s(f"{number}{suffix}") == number * seconds

    @pytest.mark.parametrize("text", ["", "0", "0s", "1.5h", "-1m", "5w", "m", "1 2"])
    def test_anything_else_is_refused(self, text):
        """Zero, fractions, negatives and unknown units are refused."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration_s(text)


class TestShare:
    @pytest.mark.parametrize(
        ("text", "share"), [("0.2", 0.2), ("20%", 0.2), ("1", 1.0), ("0", 0.0)]
    )
    def test_decimals_and_percentages_read_the_same(self, text, share):
        """0.2 and 20% are the same share."""
        assert Share().convert(text, None, None) == pytest.approx(share)

    @pytest.mark.parametrize("text", ["1.5", "-0.1", "150%", "lots"])
    def test_out_of_range_is_a_usage_error(self, text):
        """A share outside 0..1 is a usage error (exit 2)."""
        with pytest.raises(click.BadParameter):
            Share().convert(text, None, None)

    def test_a_margin_must_stay_below_one(self):
        """A health margin of 1 would let anything pass, so it is refused."""
        with pytest.raises(click.BadParameter):
            Share(below_one=True).convert("1", None, None)


class TestSelector:
    def test_device_ids_are_checked_sorted_and_deduplicated(self):
        """--devices b,a,b gives each valid id once, sorted."""
        selector = selector_from_options(
            devices="b, a,b", labels=(), hardware_class=None, all_devices=False
        )
        assert selector == {"devices": ["a", "b"]}

    def test_a_wildcard_device_id_is_refused(self):
        """An id like '#' never reaches the server as a selector."""
        with pytest.raises(InvalidValue):
            selector_from_options(devices="a,#", labels=(), hardware_class=None, all_devices=False)

    def test_labels_class_and_all(self):
        """--label, --class and --all give the REST API's selector objects."""
        assert selector_from_options(
            devices=None, labels=("site=x", "floor=2"), hardware_class=None, all_devices=False
        ) == {"labels": {"site": "x", "floor": "2"}}
        assert selector_from_options(
            devices=None, labels=(), hardware_class="pi5", all_devices=False
        ) == {"class": "pi5"}
        assert selector_from_options(
            devices=None, labels=(), hardware_class=None, all_devices=True
        ) == {"all": True}

    @pytest.mark.parametrize(
        "options",
        [
            {"devices": None, "labels": (), "hardware_class": None, "all_devices": False},
            {"devices": "a", "labels": (), "hardware_class": None, "all_devices": True},
            {"devices": None, "labels": ("k=v",), "hardware_class": "pi5", "all_devices": False},
        ],
    )
    def test_exactly_one_kind_is_required(self, options):
        """None or two kinds of selector is a usage error."""
        with pytest.raises(click.UsageError, match="exactly one"):
            selector_from_options(**options)


class TestModelRef:
    def test_name_at_version_passes(self):
        """tiny@1.0 is a model ref."""
        assert check_model_ref("tiny@1.0") == "tiny@1.0"

    @pytest.mark.parametrize("ref", ["tiny", "tiny@", "@1", "a@b@c", "Tiny@1", "../x@1"])
    def test_anything_else_is_refused(self, ref):
        """A ref without exactly one @, or with a bad name or version, is refused."""
        with pytest.raises(InvalidValue):
            check_model_ref(ref)
