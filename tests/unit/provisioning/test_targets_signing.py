"""The next targets metadata: what the agent accepts, signed by the root's targets key, v + 1.

The inputs are a real fleet's first targets metadata and its real offline key; no network.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from edgelm_agent.registry.model_target import parse_model_target
from edgelm_protocol.repository.writer import load_key
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, InvalidValue
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.model_source import PreparedModel, prepare_model
from edgelm_provisioning.targets_signing import (
    TARGETS_EXPIRY,
    ModelSettings,
    already_published,
    check_targets_key,
    new_target,
    next_targets,
    verify_against_root,
)
from tests.agent_process import TINY_GGUF, TINY_ONNX

NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)


def make_fleet(root: Path) -> FleetDir:
    init_fleet(
        root,
        fleet=root.name,
        control_url="http://127.0.0.1:8480",
        broker_url="mqtt://127.0.0.1:1883",
        now=0,
    )
    return FleetDir.open(root)


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    return make_fleet(tmp_path / "acme")


def first_targets(fleet: FleetDir) -> Metadata[Targets]:
    path = fleet.paths.repository_dir / "metadata" / "1.targets.json"
    return Metadata[Targets].from_bytes(path.read_bytes())


def root_of(fleet: FleetDir) -> Root:
    return Metadata[Root].from_bytes(fleet.paths.root_json.read_bytes()).signed


def agent_parses(metadata: Metadata[Targets], path: str):
    info = metadata.signed.targets[path]
    return parse_model_target(
        path, info.length, dict(info.hashes), info.unrecognized_fields.get("custom")
    )


@pytest.fixture(scope="module")
def gguf() -> PreparedModel:
    return prepare_model(TINY_GGUF)


@pytest.fixture(scope="module")
def onnx() -> PreparedModel:
    return prepare_model(TINY_ONNX)


class TestNextTargets:
    def test_the_new_metadata_verifies_against_the_roots_targets_key(self, fleet, gguf):
        """Signed with DIR/keys/targets-0.pem, it meets the root's targets threshold."""
        signer = load_key(fleet.paths.targets_key)
        target = new_target(gguf, ModelSettings("tiny", "1.0"))
        following = next_targets(first_targets(fleet), target, signer, now=NOW)
        result = root_of(fleet).get_verification_result(
            Targets.type, following.signed_bytes, following.signatures
        )
        assert result.verified
        assert set(result.signed) == {signer.public_key.keyid}
        verify_against_root(root_of(fleet), following)  # the CLI's own check agrees

    def test_it_is_version_plus_one_with_the_previous_targets(self, fleet, gguf, onnx):
        """Each push bumps the version by one and keeps every earlier target."""
        signer = load_key(fleet.paths.targets_key)
        v1 = first_targets(fleet)
        v2 = next_targets(v1, new_target(gguf, ModelSettings("tiny", "1.0")), signer, now=NOW)
        v3 = next_targets(v2, new_target(onnx, ModelSettings("tiny-onnx", "1.0")), signer, now=NOW)
        assert (v1.signed.version, v2.signed.version, v3.signed.version) == (1, 2, 3)
        assert set(v3.signed.targets) == {
            "models/tiny/1.0/model.gguf",
            "models/tiny-onnx/1.0/bundle.json",
        }
        assert (
            v3.signed.targets["models/tiny/1.0/model.gguf"]
            == (v2.signed.targets["models/tiny/1.0/model.gguf"])
        )
        assert v1.signed.targets == {}  # the input is not changed

    def test_the_expiry_is_renewed(self, fleet, gguf):
        """A push re-signs targets for TARGETS_EXPIRY from now."""
        signer = load_key(fleet.paths.targets_key)
        following = next_targets(
            first_targets(fleet), new_target(gguf, ModelSettings("t", "1")), signer, now=NOW
        )
        assert following.signed.expires == NOW + TARGETS_EXPIRY

    def test_another_fleets_key_does_not_verify(self, fleet, gguf, tmp_path):
        """Metadata signed with another fleet's targets key fails the root's check."""
        other = make_fleet(tmp_path / "other")
        signer = load_key(other.paths.targets_key)
        following = next_targets(
            first_targets(fleet), new_target(gguf, ModelSettings("t", "1")), signer, now=NOW
        )
        with pytest.raises(InvalidValue):
            verify_against_root(root_of(fleet), following)
        with pytest.raises(FleetDirError) as caught:
            check_targets_key(root_of(fleet), signer, other.paths.targets_key)
        assert caught.value.reference == "wrong-targets-key"


class TestNewTarget:
    def test_the_agent_parses_a_gguf_target(self, fleet, gguf):
        """The agent's parse_model_target accepts the GGUF target's custom fields."""
        signer = load_key(fleet.paths.targets_key)
        settings = ModelSettings("tiny", "1.0", context_length=2048, quantization="Q8_0")
        following = next_targets(first_targets(fleet), new_target(gguf, settings), signer, now=NOW)
        model = agent_parses(following, "models/tiny/1.0/model.gguf")
        assert (model.format, model.backend, model.context_length) == ("gguf", "llama.cpp", 2048)
        assert model.quantization == "Q8_0"
        assert model.sha256 == gguf.sha256
        assert model.min_ram_bytes == int(gguf.model_bytes * 1.2)

    def test_the_agent_parses_an_onnx_bundle_target(self, fleet, onnx):
        """The agent's parse_model_target accepts the ONNX bundle target's custom fields."""
        signer = load_key(fleet.paths.targets_key)
        target = new_target(onnx, ModelSettings("tiny-onnx", "2.0", min_ram_bytes=1 << 20))
        following = next_targets(first_targets(fleet), target, signer, now=NOW)
        model = agent_parses(following, "models/tiny-onnx/2.0/bundle.json")
        assert (model.format, model.backend) == ("onnx", "onnxruntime-genai")
        assert model.length == onnx.length
        assert model.min_ram_bytes == 1 << 20

    @pytest.mark.parametrize(
        ("name", "version", "param"),
        [("Tiny", "1", "name"), ("../x", "1", "name"), ("tiny", "1/2", "version"),
         ("tiny", "..", "version")],
    )  # fmt: skip
    def test_a_name_or_version_outside_the_schema_is_refused(self, gguf, name, version, param):
        """Names and versions become path segments; the offending option is named."""
        with pytest.raises(InvalidValue) as caught:
            new_target(gguf, ModelSettings(name, version))
        assert caught.value.param == param

    def test_a_context_the_agent_would_refuse_is_refused(self, gguf):
        """A context length below the agent's minimum never gets signed."""
        with pytest.raises(InvalidValue, match="agent would refuse"):
            new_target(gguf, ModelSettings("tiny", "1", context_length=16))


class TestAlreadyPublished:
    def test_the_identical_target_is_already_published(self, fleet, gguf):
        """The same target under the same path counts as published, not as a conflict."""
        signer = load_key(fleet.paths.targets_key)
        target = new_target(gguf, ModelSettings("tiny", "1.0"))
        following = next_targets(first_targets(fleet), target, signer, now=NOW)
        assert already_published(following.signed, target)
        assert not already_published(first_targets(fleet).signed, target)

    def test_other_settings_under_the_same_version_conflict(self, fleet, gguf, onnx):
        """Other bytes, another format or other settings under name@version are refused."""
        signer = load_key(fleet.paths.targets_key)
        target = new_target(gguf, ModelSettings("tiny", "1.0"))
        following = next_targets(first_targets(fleet), target, signer, now=NOW)
        for other in (
            new_target(gguf, ModelSettings("tiny", "1.0", context_length=8192)),
            new_target(onnx, ModelSettings("tiny", "1.0")),
        ):
            with pytest.raises(AlreadyIssued) as caught:
                already_published(following.signed, other)
            assert caught.value.reference == "model-exists"
