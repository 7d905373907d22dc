"""fleet-init: the layout of docs/fleet.md, private modes, keys where they belong, no overwrite."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from edgelm_protocol.repository.writer import load_key
from edgelm_provisioning.errors import FleetDirError, InvalidValue
from edgelm_provisioning.fleet_init import Destination, init_fleet
from edgelm_provisioning.tokens import token_sha256

NOW = 1_795_344_276

LAYOUT = {
    "fleet.toml",
    "root.json",
    "operator-token",
    "keys/",
    "keys/root-0.pem",
    "keys/targets-0.pem",
    "devices/",
    "control/",
    "control/control.toml",
    "control/tokens.json",
    "control/keys/",
    "control/keys/snapshot-0.pem",
    "control/keys/timestamp-0.pem",
    "control/keys/director.pem",
    "control/repository/",
    "control/repository/metadata/",
    "control/repository/metadata/1.root.json",
    "control/repository/metadata/1.targets.json",
    "control/repository/metadata/1.snapshot.json",
    "control/repository/metadata/timestamp.json",
    "control/repository/targets/",
    # the fleet CA (edgelm_provisioning.fleet_ca)
    "keys/fleet-ca.pem",
    "tls/",
    "tls/ca.pem",
    "tls/crl.pem",
    "tls/issued.json",
    "broker/",
    "broker/server.pem",
    "broker/server-key.pem",
    "control/tls/",
    "control/tls/ca.pem",
    "control/tls/client.pem",
    "control/tls/client-key.pem",
    "control/tls/server.pem",
    "control/tls/server-key.pem",
}


def make(root: Path, **overrides: str) -> Path:
    options = {
        "fleet": "acme",
        "control_url": "http://cp.example:8480",
        "broker_url": "mqtt://broker.example:1883",
    } | overrides
    init_fleet(root, now=NOW, **options)
    return root


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    return make(tmp_path / "acme")


class TestLayout:
    def test_the_directory_holds_exactly_the_specified_files(self, fleet):
        """Every file and folder of the fleet directory's layout is there, and nothing else."""
        assert listing(fleet) == LAYOUT

    def test_private_keys_are_0600_and_key_dirs_0700(self, fleet):
        """Private keys and the operator token are 0600; key folders and the fleet dir 0700."""
        for key in [*fleet.glob("keys/*.pem"), *fleet.glob("control/keys/*.pem")]:
            assert mode(key) == 0o600, key
        assert mode(fleet / "operator-token") == 0o600
        for folder in (fleet, fleet / "keys", fleet / "control" / "keys", fleet / "control"):
            assert mode(folder) == 0o700, folder

    def test_each_role_key_is_where_its_role_says(self, fleet):
        """root and targets keys are offline in keys/; snapshot and timestamp online in control."""
        root = Metadata[Root].from_bytes((fleet / "root.json").read_bytes()).signed
        where = {
            "root": fleet / "keys" / "root-0.pem",
            "targets": fleet / "keys" / "targets-0.pem",
            "snapshot": fleet / "control" / "keys" / "snapshot-0.pem",
            "timestamp": fleet / "control" / "keys" / "timestamp-0.pem",
        }
        for role, key in where.items():
            assert root.roles[role].keyids == [load_key(key).public_key.keyid], role

    def test_control_holds_no_offline_key(self, fleet):
        """No key under control/ (the folder copied to the server) is a root or targets key."""
        root = Metadata[Root].from_bytes((fleet / "root.json").read_bytes()).signed
        offline = set(root.roles["root"].keyids) | set(root.roles["targets"].keyids)
        control_keys = {
            load_key(p).public_key.keyid for p in (fleet / "control/keys").glob("*.pem")
        }
        assert control_keys
        assert not control_keys & offline

    def test_tokens_json_holds_only_the_hash(self, fleet):
        """tokens.json lists the operator token by sha256; the plaintext is only in its file."""
        token = (fleet / "operator-token").read_text().strip()
        tokens = (fleet / "control" / "tokens.json").read_text()
        assert token not in tokens
        assert json.loads(tokens) == {
            "tokens": [{"name": "operator", "sha256": token_sha256(token), "created_at": NOW}]
        }
        assert len(token) == 43  # 32 random bytes, URL-safe base64

    def test_root_json_is_the_first_root(self, fleet):
        """root.json is the repository's 1.root.json, byte for byte."""
        first = fleet / "control" / "repository" / "metadata" / "1.root.json"
        assert (fleet / "root.json").read_bytes() == first.read_bytes()

    def test_control_toml_says_where_everything_is(self, fleet):
        """control.toml has exactly these keys, with paths relative to its folder."""
        config = tomllib.loads((fleet / "control" / "control.toml").read_text())
        assert config == {
            "fleet": "acme",
            "http": "0.0.0.0:8480",
            "public_url": "http://cp.example:8480",
            "db": "sqlite:///control.db",
            "broker_url": "mqtt://broker.example:1883",
            "repository_dir": "repository",
            "keys_dir": "keys",
            "tokens_file": "tokens.json",
            "broker_ca": "tls/ca.pem",
            "broker_cert": "tls/client.pem",
            "broker_key": "tls/client-key.pem",
        }
        for key in ("repository_dir", "keys_dir", "tokens_file", "broker_ca", "broker_cert"):
            assert (fleet / "control" / config[key]).exists()

    def test_fleet_toml_has_the_fleet_and_its_urls(self, fleet):
        """fleet.toml has the fleet's id, control URL and broker URL."""
        assert tomllib.loads((fleet / "fleet.toml").read_text()) == {
            "fleet": "acme",
            "control_url": "http://cp.example:8480",
            "broker_url": "mqtt://broker.example:1883",
        }

    def test_the_report_says_what_leaves_the_machine(self, tmp_path):
        """The result says offline keys and the token stay, and control/ goes to the server."""
        result = init_fleet(
            tmp_path / "f",
            fleet="f",
            control_url="http://127.0.0.1:8480",
            broker_url="mqtt://127.0.0.1:1883",
            now=NOW,
        )
        goes = {f.path: f.destination for f in result.files}
        assert goes["keys/root-0.pem"] is Destination.STAYS
        assert goes["keys/targets-0.pem"] is Destination.STAYS
        assert goes["operator-token"] is Destination.STAYS
        assert goes["control/keys/director.pem"] is Destination.SERVER
        assert goes["root.json"] is Destination.DEVICES


class TestRefusals:
    def test_an_existing_fleet_is_never_overwritten(self, fleet):
        """A second fleet-init refuses, and every key stays as it was."""
        keys = {p: p.read_bytes() for p in fleet.rglob("*.pem")}
        with pytest.raises(FleetDirError) as caught:
            make(fleet)
        assert caught.value.reference == "fleet-exists"
        assert {p: p.read_bytes() for p in fleet.rglob("*.pem")} == keys

    def test_a_fleet_missing_a_part_is_still_refused(self, fleet):
        """Even with fleet.toml gone, keys/ marks the folder as a fleet: no new keys over it."""
        (fleet / "fleet.toml").unlink()
        with pytest.raises(FleetDirError) as caught:
            make(fleet)
        assert caught.value.reference == "fleet-exists"

    def test_a_non_empty_directory_is_refused(self, tmp_path):
        """A folder holding anything else is refused; what it holds is left alone."""
        folder = tmp_path / "busy"
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        with pytest.raises(FleetDirError) as caught:
            make(folder)
        assert caught.value.reference == "fleet-dir-not-empty"
        assert listing(folder) == {"notes.txt"}

    def test_an_empty_directory_is_used(self, tmp_path):
        """An existing empty folder becomes the fleet."""
        folder = tmp_path / "empty"
        folder.mkdir()
        assert listing(make(folder)) == LAYOUT

    def test_a_refusal_leaves_no_staging_directory(self, tmp_path):
        """A refused or failed fleet-init leaves nothing beside DIR."""
        with pytest.raises(InvalidValue):
            make(tmp_path / "bad", broker_url="http://not-mqtt")
        with pytest.raises(InvalidValue):
            make(tmp_path / "bad", fleet="a/b")
        assert list(tmp_path.iterdir()) == []

    def test_the_directory_name_is_the_default_fleet_id(self, tmp_path):
        """Without --fleet the folder's name is the fleet id, if it is a valid one."""
        result = init_fleet(
            tmp_path / "plant-7",
            fleet=None,
            control_url="http://127.0.0.1:8480",
            broker_url="mqtt://127.0.0.1:1883",
            now=NOW,
        )
        assert result.config.fleet == "plant-7"

    def test_an_invalid_directory_name_asks_for_fleet(self, tmp_path):
        """A folder name that is no fleet id asks for --fleet rather than inventing one."""
        with pytest.raises(InvalidValue, match="--fleet"):
            init_fleet(
                tmp_path / "my fleet",
                fleet=None,
                control_url="http://127.0.0.1:8480",
                broker_url="mqtt://127.0.0.1:1883",
                now=NOW,
            )
