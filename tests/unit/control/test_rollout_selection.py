"""Selectors: validated value objects, their matching rule, and their JSON and CLI forms."""

from __future__ import annotations

import dataclasses
import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.rollouts.errors import EmptySelection, InvalidSelector
from edgelm_control.rollouts.selection import (
    AllDevices,
    ByClass,
    ByDevices,
    ByLabels,
    Device,
    Selector,
    select_devices,
    selector_from_cli,
    selector_from_json,
)

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True).filter(
    lambda name: name != "control"
)
# What a device may report as a label value or a hardware class: text without controls.
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
SELECTORS: st.SearchStrategy[Selector] = st.one_of(
    st.lists(NAMES, min_size=1, max_size=5).map(lambda ids: ByDevices(tuple(ids))),
    st.dictionaries(NAMES, TEXT, min_size=1, max_size=3).map(ByLabels.of),
    TEXT.filter(bool).map(ByClass),
    st.just(AllDevices()),
)
DEVICES = st.builds(
    Device,
    device_id=NAMES,
    labels=st.dictionaries(NAMES, TEXT, max_size=3),
    hardware_class=st.none() | TEXT.filter(bool),
)
BAD_NAMES = ["", "-lead", "has space", "a/b", "a+b", "a#b", "$share", "x" * 65, "tab\t", "\x00"]
BAD_TEXT = ["nul\x00", "tab\t", "line\n", "del\x7f", "c1\x85", "lone\ud800", "x" * 257]

KIOSK = Device("kiosk-1", {"site": "berlin", "tier": "gold"}, "pi5")
JETSON = Device("jet-2", {"site": "berlin"}, "jetson")
FRESH = Device("new-3", {}, None)  # enrolled, has not reported its state yet


class TestByDevices:
    def test_matches_the_ids_named(self) -> None:
        """A devices selector matches exactly the ids it names."""
        selector = ByDevices(("kiosk-1", "new-3"))
        assert [selector.matches(d) for d in (KIOSK, JETSON, FRESH)] == [True, False, True]

    def test_ids_are_sorted_without_repeats(self) -> None:
        """The stored ids are sorted and repeats collapse, so equal selections compare equal."""
        assert ByDevices(("b", "a", "b")) == ByDevices(("a", "b"))
        assert ByDevices(("b", "a")).to_json() == {"devices": ["a", "b"]}

    @pytest.mark.parametrize("bad", BAD_NAMES)
    def test_malformed_id_is_refused(self, bad: str) -> None:
        """An id outside the fleet's id syntax is refused, naming what came."""
        with pytest.raises(InvalidSelector) as refused:
            ByDevices(("ok", bad))
        assert repr(bad) in str(refused.value)
        assert refused.value.value == bad

    def test_reserved_control_is_no_device(self) -> None:
        """The control plane's own sender name cannot be selected as a device."""
        with pytest.raises(InvalidSelector, match="must not be the reserved 'control'"):
            ByDevices(("kiosk-1", "control"))

    def test_empty_and_string_are_refused(self) -> None:
        """No ids at all, or one string where a sequence belongs, is refused."""
        with pytest.raises(InvalidSelector, match="at least one device"):
            ByDevices(())
        with pytest.raises(InvalidSelector, match="got the string 'kiosk'"):
            ByDevices("kiosk")  # type: ignore[arg-type]

    def test_selector_is_frozen(self) -> None:
        """A selector cannot be changed once built."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            ByDevices(("a",)).device_ids = ("b",)  # type: ignore[misc]


class TestByLabels:
    def test_every_label_must_match(self) -> None:
        """A labels selector matches devices carrying all its pairs, whatever else they carry."""
        both = ByLabels.of({"site": "berlin", "tier": "gold"})
        site = ByLabels.of({"site": "berlin"})
        assert [both.matches(d) for d in (KIOSK, JETSON, FRESH)] == [True, False, False]
        assert [site.matches(d) for d in (KIOSK, JETSON, FRESH)] == [True, True, False]

    def test_conflicting_values_for_one_key_are_refused(self) -> None:
        """The same key with two values can never match, so it is refused."""
        with pytest.raises(InvalidSelector) as refused:
            ByLabels((("site", "berlin"), ("site", "paris")))
        assert "label site given twice, as 'berlin' and 'paris'" in str(refused.value)

    def test_no_labels_is_refused(self) -> None:
        """An empty labels selector would match everything: --all says that instead."""
        with pytest.raises(InvalidSelector, match="use --all"):
            ByLabels(())

    @pytest.mark.parametrize("bad", BAD_NAMES)
    def test_malformed_key_is_refused(self, bad: str) -> None:
        """Label keys follow the id syntax, as the protocol requires of devices."""
        with pytest.raises(InvalidSelector, match="a label key must be"):
            ByLabels(((bad, "v"),))

    @pytest.mark.parametrize("bad", BAD_TEXT)
    def test_malformed_value_is_refused(self, bad: str) -> None:
        """Label values are text of at most 256 characters without control characters."""
        with pytest.raises(InvalidSelector, match="the value of label k must be text of 0-256"):
            ByLabels((("k", bad),))

    def test_any_value_a_device_can_report_is_selectable(self) -> None:
        """Values with spaces, accents or nothing at all select the devices reporting them."""
        device = Device("d1", {"site": "Berlin Mitte", "floor": "", "city": "Zürich"}, None)
        assert ByLabels.of({"site": "Berlin Mitte", "floor": "", "city": "Zürich"}).matches(device)


class TestByClass:
    def test_matches_the_class_only(self) -> None:
        """A class selector matches its class; a device with no reported class never matches."""
        selector = ByClass("pi5")
        assert [selector.matches(d) for d in (KIOSK, JETSON, FRESH)] == [True, False, False]

    @pytest.mark.parametrize("bad", ["", "x" * 65, *BAD_TEXT[:-1]])
    def test_malformed_class_is_refused(self, bad: str) -> None:
        """A class is text of 1-64 characters without control characters."""
        with pytest.raises(InvalidSelector, match="a hardware class must be text of 1-64"):
            ByClass(bad)

    def test_class_with_spaces_is_selectable(self) -> None:
        """A class as devices report it, spaces and all, matches them."""
        assert ByClass("Raspberry Pi 5").matches(Device("d1", {}, "Raspberry Pi 5"))


class TestAllDevices:
    @given(device=DEVICES)
    def test_matches_every_device(self, device: Device) -> None:
        """The all selector matches any device, reported state or not."""
        assert AllDevices().matches(device)


class TestSelectDevices:
    def test_selection_is_sorted_ids(self) -> None:
        """select_devices gives the matching ids, sorted."""
        fleet = [KIOSK, JETSON, FRESH]
        assert select_devices(ByLabels.of({"site": "berlin"}), fleet) == ("jet-2", "kiosk-1")
        assert select_devices(AllDevices(), fleet) == ("jet-2", "kiosk-1", "new-3")

    def test_empty_selection_is_refused(self) -> None:
        """A selector that matches nothing is a 422 naming the selector and the fleet size."""
        with pytest.raises(EmptySelection) as refused:
            select_devices(ByLabels.of({"site": "berln"}), [KIOSK, JETSON])
        assert str(refused.value) == (
            "selector --label site=berln matched none of the 2 enrolled devices"
        )
        assert refused.value.status_code == 422
        assert refused.value.device_count == 2

    @given(selector=SELECTORS, fleet=st.lists(DEVICES, max_size=10), late=DEVICES)
    def test_creation_and_late_joiners_agree(
        self, selector: Selector, fleet: list[Device], late: Device
    ) -> None:
        """A device is matched later (a late joiner) exactly when creation would select it."""
        others = [d for d in fleet if d.device_id != late.device_id]
        try:
            chosen = select_devices(selector, [*others, late])
        except EmptySelection:
            chosen = ()
        assert (late.device_id in chosen) == selector.matches(late)


class TestSelectorFromJson:
    @given(selector=SELECTORS)
    def test_json_round_trips(self, selector: Selector) -> None:
        """Every selector's stored JSON reads back equal."""
        assert selector_from_json(selector.to_json()) == selector

    @pytest.mark.parametrize(
        ("data", "param", "message"),
        [
            ({}, "selector", "exactly one of devices, labels, class, all, got []"),
            ({"all": True, "class": "pi5"}, "selector", "got ['all', 'class']"),
            ([], "selector", "exactly one of devices, labels, class, all, got list"),
            ({"group": "x"}, "selector", "must be one of devices, labels, class, all, got 'group'"),
            ({"devices": "kiosk-1"}, "devices", "devices must be a list of device ids"),
            ({"devices": [7]}, "devices", "a device id must be"),
            ({"labels": ["site=x"]}, "labels", "labels must be an object of key: value"),
            ({"class": 5}, "class", "a hardware class must be"),
            ({"all": False}, "all", "all must be true, got False"),
        ],
    )
    def test_malformed_json_is_refused_precisely(
        self, data: object, param: str, message: str
    ) -> None:
        """Each malformed selector names the field and says what was expected and what came."""
        with pytest.raises(InvalidSelector) as refused:
            selector_from_json(data)
        assert message in str(refused.value)
        assert refused.value.param == param


class TestSelectorFromCli:
    def test_each_option_builds_its_selector(self) -> None:
        """--devices, --label (repeated), --class and --all build the matching selectors."""
        assert selector_from_cli(devices="b, a") == ByDevices(("a", "b"))
        labels = selector_from_cli(labels=["site=berlin", "tier=gold", "room=Hall 2"])
        assert labels == ByLabels.of({"site": "berlin", "tier": "gold", "room": "Hall 2"})
        assert selector_from_cli(hardware_class="Raspberry Pi 5") == ByClass("Raspberry Pi 5")
        assert selector_from_cli(all_devices=True) == AllDevices()

    @given(selector=SELECTORS)
    def test_describe_is_the_cli_form(self, selector: Selector) -> None:
        """A selector described as CLI options reads back equal through selector_from_cli."""
        words = shlex.split(selector.describe())
        if words[0] == "--devices":
            again = selector_from_cli(devices=words[1])
        elif words[0] == "--label":
            again = selector_from_cli(labels=words[1::2])
        elif words[0] == "--class":
            again = selector_from_cli(hardware_class=words[1])
        else:
            again = selector_from_cli(all_devices=True)
        assert again == selector

    @pytest.mark.parametrize(
        ("options", "param", "message"),
        [
            ({}, "selector", "give exactly one of --devices, --label, --class, --all; got none"),
            ({"devices": "a", "all_devices": True}, "selector", "got --devices and --all"),
            ({"devices": "a,,b"}, "--devices", "without empty ones; got 'a,,b'"),
            ({"devices": "a,b c"}, "--devices", "a device id must be"),
            ({"labels": ["site"]}, "--label", "--label takes key=value, got 'site'"),
            ({"labels": ["=x"]}, "--label", "a label key must be"),
            ({"labels": ["a=b", "a=c"]}, "--label", "label a given twice"),
            ({"hardware_class": ""}, "--class", "a hardware class must be"),
        ],
    )
    def test_malformed_options_are_refused_precisely(
        self, options: dict[str, object], param: str, message: str
    ) -> None:
        """Each malformed option is refused with the option's name as ``param``."""
        with pytest.raises(InvalidSelector) as refused:
            selector_from_cli(**options)  # type: ignore[arg-type]
        assert message in str(refused.value)
        assert refused.value.param == param
