"""``edgelm fleet models push`` against the fake control plane, checked as a device checks it.

A push is only right if a device accepts what it published, so after each push the agent's
own verification path (``TrustClient``: python-tuf from the fleet's root.json, then the
agent's target parser) reads the repository the control plane now serves. The attacks are a
control plane that serves metadata the fleet's root does not vouch for; the CLI must refuse
before it signs anything, which the fake's upload log shows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.model_target import ModelTarget
from edgelm_agent.registry.trust import TrustClient
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from tests.agent_process import TINY_GGUF, TINY_ONNX
from tests.integration.provisioning.conftest import error_json, ok_json, run_fleet
from tests.integration.provisioning.fake_control_plane import FakeControlPlane


def push(fleet_dir: FleetDir, source: Path, name: str, version: str, *extra: str) -> dict[str, Any]:
    result = run_fleet(
        "models", "push", source, "--name", name, "--version", version,
        "--fleet-dir", fleet_dir.paths.root, "--json", *extra,
    )  # fmt: skip
    return ok_json(result)  # type: ignore[no-any-return]


def device_view(
    fleet_dir: FleetDir, control: FakeControlPlane, where: Path
) -> dict[str, ModelTarget]:
    """What a device enrolled in this fleet verifies and sees in the repository now."""
    client = TrustClient(
        where / "metadata",
        fleet_dir.paths.root_json.read_bytes(),
        [f"{control.url}/repository"],
        LastKnownGoodClock(where / "clock.json"),
    )
    return client.refresh()


def served_targets(control: FakeControlPlane) -> Metadata[Targets]:
    snapshot_version = control.writer.md["snapshot"].signed.meta["targets.json"].version
    path = control.repository_dir / "metadata" / f"{snapshot_version}.targets.json"
    return Metadata[Targets].from_bytes(path.read_bytes())


class TestPushGguf:
    def test_a_device_verifies_and_parses_the_pushed_gguf(self, fleet_dir, control_plane, tmp_path):
        """After a GGUF push, a device verifies the new metadata and parses the target."""
        data = push(fleet_dir, TINY_GGUF, "tiny", "1.0", "--quantization", "Q8_0")
        targets = device_view(fleet_dir, control_plane, tmp_path / "device")
        model = targets["models/tiny/1.0/model.gguf"]
        assert model.format == "gguf"
        assert model.backend == "llama.cpp"
        assert model.quantization == "Q8_0"
        assert model.sha256 == hashlib.sha256(TINY_GGUF.read_bytes()).hexdigest()
        assert data["targets_version"] == 2
        assert data["already_published"] is False

    def test_the_new_version_lists_the_previous_targets_too(self, fleet_dir, control_plane):
        """A second push is version + 1, signed by the root's targets key, and keeps the first."""
        push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        data = push(fleet_dir, TINY_GGUF, "tiny", "1.1")
        targets = served_targets(control_plane)
        root = Metadata[Root].from_bytes(fleet_dir.paths.root_json.read_bytes()).signed
        root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
        assert targets.signed.version == data["targets_version"] == 3
        assert set(targets.signed.targets) == {
            "models/tiny/1.0/model.gguf",
            "models/tiny/1.1/model.gguf",
        }

    def test_the_blob_is_served_under_its_consistent_snapshot_name(self, fleet_dir, control_plane):
        """The uploaded file is stored where devices fetch it: <sha256>.model.gguf."""
        push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        sha = hashlib.sha256(TINY_GGUF.read_bytes()).hexdigest()
        stored = control_plane.repository_dir / "targets" / "models/tiny/1.0" / f"{sha}.model.gguf"
        assert stored.read_bytes() == TINY_GGUF.read_bytes()

    def test_the_same_push_again_uploads_nothing(self, fleet_dir, control_plane):
        """Pushing an identical target again reports it published and uploads nothing."""
        push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        again = push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        assert again["already_published"] is True
        assert len(control_plane.uploads) == 1

    def test_other_content_under_a_published_version_is_refused(
        self, fleet_dir, control_plane, tmp_path
    ):
        """A published version never changes: other bytes under it are refused before upload."""
        push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        changed = tmp_path / "changed.gguf"
        changed.write_bytes(TINY_GGUF.read_bytes() + b"\0")
        result = run_fleet(
            "models", "push", changed, "--name", "tiny", "--version", "1.0",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "model-exists"
        assert len(control_plane.uploads) == 1

    def test_a_file_that_is_not_gguf_is_refused(self, fleet_dir, control_plane, tmp_path):
        """A file without the GGUF magic is refused with its path, nothing uploaded."""
        bogus = tmp_path / "model.bin"
        bogus.write_bytes(b"not a model")
        result = run_fleet(
            "models", "push", bogus, "--name", "tiny", "--version", "1.0",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        error = error_json(result)
        assert error["reference"] == "invalid-model"
        assert str(bogus) in error["context"]
        assert control_plane.uploads == []


class TestPushOnnx:
    def test_a_device_verifies_and_parses_the_pushed_bundle(
        self, fleet_dir, control_plane, tmp_path
    ):
        """An ONNX folder becomes bundle.json; a device verifies it, and every member is served."""
        push(fleet_dir, TINY_ONNX, "tiny-onnx", "2.0")
        model = device_view(fleet_dir, control_plane, tmp_path / "device")[
            "models/tiny-onnx/2.0/bundle.json"
        ]
        assert (model.format, model.backend) == ("onnx", "onnxruntime-genai")
        directory = control_plane.repository_dir / "targets" / "models/tiny-onnx/2.0"
        manifest = json.loads((directory / f"{model.sha256}.bundle.json").read_bytes())
        members = {m["path"]: m for m in manifest["files"]}
        assert set(members) == {p.name for p in TINY_ONNX.iterdir()}
        for name, member in members.items():
            served = (directory / "files" / member["sha256"]).read_bytes()
            assert served == (TINY_ONNX / name).read_bytes()

    def test_a_folder_with_a_link_is_refused(self, fleet_dir, control_plane, tmp_path):
        """A symbolic link inside the folder is refused: a bundle holds regular files only."""
        folder = tmp_path / "model"
        shutil.copytree(TINY_ONNX, folder)
        (folder / "extra.json").symlink_to(folder / "genai_config.json")
        result = run_fleet(
            "models", "push", folder, "--name", "m", "--version", "1",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "invalid-model"
        assert control_plane.uploads == []


class TestTamperedServer:
    def test_a_targets_file_with_a_bad_signature_is_refused_before_signing(
        self, fleet_dir, control_plane
    ):
        """Metadata the targets key did not sign is refused; nothing is signed or uploaded."""
        targets_file = control_plane.repository_dir / "metadata" / "1.targets.json"
        forged = json.loads(targets_file.read_bytes())
        forged["signed"]["targets"]["models/evil/1/model.gguf"] = {
            "length": 1,
            "hashes": {"sha256": "0" * 64},
        }
        control_plane.metadata_overrides["1.targets.json"] = json.dumps(forged).encode()
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.0",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "repository-bad-signature"
        assert control_plane.count("POST", "/api/v1/models") == 0

    def test_a_rollback_to_older_metadata_is_refused_before_signing(self, fleet_dir, control_plane):
        """After a push, a server serving the metadata from before it is refused as a rollback."""
        metadata = control_plane.repository_dir / "metadata"
        before = {
            "timestamp.json": (metadata / "timestamp.json").read_bytes(),
            "1.snapshot.json": (metadata / "1.snapshot.json").read_bytes(),
        }
        push(fleet_dir, TINY_GGUF, "tiny", "1.0")
        control_plane.metadata_overrides.update(before)
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.1",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "repository-rollback"
        assert control_plane.count("POST", "/api/v1/models") == 1

    def test_another_fleets_repository_is_refused(self, fleet_dir, control_plane, tmp_path):
        """A control plane serving another fleet's repository fails the root's signature check."""
        other = tmp_path / "other"
        init_fleet(
            other,
            fleet="other",
            control_url="http://127.0.0.1:8480",
            broker_url="mqtt://127.0.0.1:1883",
            now=0,
        )
        theirs = other / "control" / "repository" / "metadata"
        control_plane.metadata_overrides.update(
            {p.name: p.read_bytes() for p in theirs.iterdir() if "root" not in p.name}
        )
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.0",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "repository-bad-signature"
        assert control_plane.count("POST", "/api/v1/models") == 0


class TestPushTransport:
    def test_an_unreachable_repository_names_the_cause(self, fleet_dir, tmp_path):
        """A control plane nobody answers for is control-unreachable, saying why."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.0",
            "--fleet-dir", fleet_dir.paths.root, "--control", url, "--json",
        )  # fmt: skip
        error = error_json(result)
        assert error["reference"] == "control-unreachable"
        assert "Connection refused" in error["message"]


class TestPushNeedsTheFleetDir:
    def test_push_without_fleet_dir_is_refused(self, control_plane):
        """Without --fleet-dir there is no targets key, so push refuses before any call."""
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.0",
            "--control", control_plane.url, "--token", "t", "--json",
        )  # fmt: skip
        assert error_json(result)["reference"] == "no-fleet-dir"
        assert control_plane.requests == []

    @pytest.mark.parametrize("version", ["../1", "1/2", "", "a b"])
    def test_a_version_that_would_escape_its_path_is_refused(
        self, fleet_dir, control_plane, version
    ):
        """A version that is not a safe path segment is refused before anything is uploaded."""
        result = run_fleet(
            "models", "push", TINY_GGUF, "--name", "tiny", "--version", version,
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        assert error_json(result)["reference"].startswith("invalid-")
        assert control_plane.uploads == []
