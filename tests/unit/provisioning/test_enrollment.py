"""Enrollment bundles and the inventory: the exact format, safe ids, private files, reissues."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from edgelm_protocol.signing import DirectorKeys, key_id
from edgelm_provisioning.enrollment import (
    BUNDLE_FORMAT,
    DeviceRecord,
    IssuedDevice,
    issue_device,
    labels_from_cli,
    parse_label,
)
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue, NotIssued
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet

NOW = 1_795_344_276
BUNDLE_KEYS = {
    "format", "fleet", "device_id", "hardware_class", "labels", "broker", "control_url",
    "repository_url", "root", "director_keys", "issued_at", "tls",
}  # fmt: skip

#: Ids of the CVE-2017-7650 class (a client id or user name that escapes its ACL pattern)
#: and others that would break a topic, a file name or a log line.
UNSAFE_IDS = [
    "+", "#", "kiosk+1", "kiosk#", "a/b", "../x", "$SYS", "kiosk\x00", "kiosk\n", "kiosk\x1b",
    " kiosk", "kiosk 1", "control", "", "-kiosk", ".kiosk", "k" * 65, "kiosk\u2028",
]  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    root = tmp_path / "acme"
    init_fleet(
        root,
        fleet="acme",
        control_url="http://cp.example:8480",
        broker_url="mqtt://broker.example:1883",
        now=NOW,
    )
    return FleetDir.open(root)


def issue(
    fleet: FleetDir,
    device_id: str,
    out: Path,
    *,
    hardware_class: str | None = "pi5",
    labels: dict[str, str] | None = None,
    reissue: bool = False,
    now: int = NOW,
) -> IssuedDevice:
    return issue_device(
        fleet,
        device_id,
        hardware_class=hardware_class,
        labels=labels,
        out=out,
        reissue=reissue,
        now=now,
    )


class TestBundle:
    def test_the_bundle_has_exactly_the_specified_fields(self, fleet, tmp_path):
        """The bundle is the object docs/fleet.md documents, field by field."""
        out = tmp_path / "kiosk-17.json"
        issue(fleet, "kiosk-17", out, labels={"site": "berlin"})
        bundle = json.loads(out.read_bytes())
        assert set(bundle) == BUNDLE_KEYS
        assert bundle["format"] == BUNDLE_FORMAT == "edgelm-enrollment/1"
        assert bundle["fleet"] == "acme"
        assert bundle["device_id"] == "kiosk-17"
        assert bundle["hardware_class"] == "pi5"
        assert bundle["labels"] == {"site": "berlin"}
        assert set(bundle["broker"]) == {"url", "username", "password"}
        assert bundle["broker"]["url"] == "mqtt://broker.example:1883"
        assert bundle["broker"]["username"] == "kiosk-17"
        assert len(bundle["broker"]["password"]) >= 32
        assert bundle["control_url"] == "http://cp.example:8480"
        assert bundle["repository_url"] == "http://cp.example:8480/repository"
        assert bundle["root"] == json.loads(fleet.paths.root_json.read_bytes())
        assert bundle["issued_at"] == NOW
        assert set(bundle["tls"]) == {"ca", "cert", "key"}  # the fleet has a CA

    def test_the_director_key_is_the_control_planes(self, fleet, tmp_path):
        """director_keys holds the PEM public key of control/keys/director.pem, and it loads."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out)
        pems = json.loads(out.read_bytes())["director_keys"]
        private = serialization.load_pem_private_key(
            fleet.paths.director_key.read_bytes(), password=None
        )
        keys = DirectorKeys.from_pem([pem.encode() for pem in pems])
        assert keys.keyids == {key_id(private.public_key())}  # type: ignore[arg-type]

    def test_the_bundle_is_private(self, fleet, tmp_path):
        """The bundle holds a password, so it is written 0600."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out)
        assert stat.S_IMODE(out.stat().st_mode) == 0o600

    def test_passwords_differ_per_device(self, fleet, tmp_path):
        """Each device gets its own random broker password."""
        issue(fleet, "a", tmp_path / "a.json")
        issue(fleet, "b", tmp_path / "b.json")
        passwords = {
            json.loads((tmp_path / f"{d}.json").read_bytes())["broker"]["password"] for d in "ab"
        }
        assert len(passwords) == 2


class TestInventory:
    def test_the_record_holds_no_secret(self, fleet, tmp_path):
        """devices/ID.json has the id, class, labels and times, and not the password."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out, labels={"site": "x"})
        password = json.loads(out.read_bytes())["broker"]["password"]
        record_path = fleet.paths.device_record("k")
        assert password not in record_path.read_text()
        assert json.loads(record_path.read_bytes()) == {
            "id": "k",
            "hardware_class": "pi5",
            "labels": {"site": "x"},
            "issued_at": NOW,
            "first_issued_at": NOW,
            "issue_count": 1,
        }


class TestUnsafeIds:
    @pytest.mark.parametrize("device_id", UNSAFE_IDS)
    def test_an_unsafe_id_is_refused_and_nothing_written(self, fleet, tmp_path, device_id):
        """Wildcards, separators, $, NUL, controls and 'control' are refused; no file appears."""
        out = tmp_path / "bundle.json"
        with pytest.raises(InvalidValue) as caught:
            issue(fleet, device_id, out)
        assert caught.value.reference == "invalid-device-id"
        assert not out.exists()
        assert list(fleet.paths.devices_dir.iterdir()) == []

    def test_ids_that_differ_only_by_case_are_refused(self, fleet, tmp_path):
        """Kiosk-1 after kiosk-1 is refused: one record on a case-insensitive disk."""
        issue(fleet, "kiosk-1", tmp_path / "a.json")
        with pytest.raises(AlreadyIssued, match="case"):
            issue(fleet, "Kiosk-1", tmp_path / "b.json")


class TestReissue:
    def test_an_issued_id_is_refused_without_reissue(self, fleet, tmp_path):
        """Issuing the same id twice is refused, and the first bundle is untouched."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out)
        before = out.read_bytes()
        with pytest.raises(AlreadyIssued) as caught:
            issue(fleet, "k", tmp_path / "k2.json")
        assert caught.value.reference == "device-exists"
        assert out.read_bytes() == before
        assert not (tmp_path / "k2.json").exists()

    def test_reissue_makes_new_credentials_and_keeps_class_and_labels(self, fleet, tmp_path):
        """--reissue replaces the password, keeps class and labels, and counts the issue."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out, hardware_class="jetson", labels={"site": "x"})
        old = json.loads(out.read_bytes())["broker"]["password"]
        issued = issue(fleet, "k", out, hardware_class=None, reissue=True, now=NOW + 60)
        bundle = json.loads(out.read_bytes())
        assert bundle["broker"]["password"] != old
        assert (bundle["hardware_class"], bundle["labels"]) == ("jetson", {"site": "x"})
        assert issued.reissued
        record = DeviceRecord.load(fleet.paths.device_record("k"))
        assert (record.first_issued_at, record.issued_at, record.issue_count) == (
            NOW,
            NOW + 60,
            2,
        )

    def test_reissue_with_labels_replaces_them(self, fleet, tmp_path):
        """Labels given on a reissue replace the old ones as a whole."""
        out = tmp_path / "k.json"
        issue(fleet, "k", out, labels={"site": "x", "floor": "2"})
        issue(fleet, "k", out, labels={"site": "y"}, reissue=True)
        assert json.loads(out.read_bytes())["labels"] == {"site": "y"}

    def test_reissue_of_an_unknown_id_is_refused(self, fleet, tmp_path):
        """--reissue for an id never issued is refused: a typo must not create a device."""
        with pytest.raises(NotIssued):
            issue(fleet, "ghost", tmp_path / "g.json", reissue=True)

    def test_reissue_never_overwrites_another_file(self, fleet, tmp_path):
        """Even with --reissue, --out may only replace that device's previous bundle."""
        issue(fleet, "k", tmp_path / "k.json")
        other = tmp_path / "notes.txt"
        other.write_text("keep me")
        with pytest.raises(AlreadyIssued):
            issue(fleet, "k", other, reissue=True)
        assert other.read_text() == "keep me"

    def test_a_new_device_needs_a_class(self, fleet, tmp_path):
        """A first issue without a hardware class is refused, naming --class."""
        with pytest.raises(InvalidValue, match="--class"):
            issue(fleet, "k", tmp_path / "k.json", hardware_class=None)


class TestLabels:
    def test_a_value_may_hold_equals_and_be_empty(self):
        """KEY=VALUE splits at the first '='; an empty value is allowed."""
        assert parse_label("note=a=b") == ("note", "a=b")
        assert parse_label("flag=") == ("flag", "")

    @pytest.mark.parametrize("text", ["novalue", "=x", "a b=x", "k=\x00", "k=" + "v" * 257])
    def test_malformed_labels_are_refused(self, text):
        """No '=', a key outside the id alphabet, control characters or a long value: refused."""
        with pytest.raises(InvalidValue):
            parse_label(text)

    def test_a_key_given_twice_is_refused(self):
        """--label site=a --label site=b is a mistake, not an update."""
        with pytest.raises(InvalidValue, match="twice"):
            labels_from_cli(["site=a", "site=b"])
